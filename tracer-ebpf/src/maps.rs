//! The probes' maps and the agent's load-time settings (read-only globals), and the small
//! accessors the programs use on them.
use aya_ebpf::{
    macros::map,
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap,
        ProgramArray, RingBuf,
    },
};
use tracer_common::{
    counter, ConnState, DataRecord, KernelOffsets, RedCounts, RedKey, Serving, MAX_CAPTURE,
};

/// Filled by the agent from BTF before load (see `KernelOffsets`).
#[no_mangle]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// The agent's own process: never traced, or its export traffic would trace itself.
#[no_mangle]
pub(crate) static AGENT_TGID: u32 = 0;

/// Trace only sockets of this network namespace (its inode number); 0 traces all. One agent per
/// namespace is how containers and the test's namespace "hosts" each get their own agent.
#[no_mangle]
pub(crate) static NETNS_FILTER: u32 = 0;

/// Non-zero with `--inject-context`: the probes count the requests each thread serves, and the
/// injector (`inject.rs`) inserts `traceparent` into outgoing HTTP/1 requests.
#[no_mangle]
pub(crate) static INJECT: u32 = 0;

/// Whose incoming `traceparent` the injector carries on to the calls made while serving the
/// request: 0 nobody, 1 everybody, 2 the networks in `TRUSTED_NETS` (`--trust-context`).
#[no_mangle]
pub(crate) static TRUST_CONTEXT: u32 = 1;

/// Non-zero with `--metrics-only`: HTTP/1 exchanges are counted here (red.rs), not recorded.
#[no_mangle]
pub(crate) static RED_IN_KERNEL: u32 = 0;

#[inline(always)]
pub(crate) fn red_enabled() -> bool {
    unsafe { core::ptr::read_volatile(&RED_IN_KERNEL) != 0 }
}

/// Non-zero with `--sample-in-kernel` (with `RED_IN_KERNEL`): the framed exchanges the probes
/// keep are recorded too, the others only counted (red.rs).
#[no_mangle]
pub(crate) static SAMPLE_IN_KERNEL: u32 = 0;

/// `--sample-in-kernel`: a request is kept when a 32-bit hash of its TCP sequence number is
/// below this (the share of `--sample` times 2^32).
#[no_mangle]
pub(crate) static KEEP_BELOW: u64 = 0;

#[inline(always)]
pub(crate) fn sampling_in_kernel() -> bool {
    unsafe { core::ptr::read_volatile(&SAMPLE_IN_KERNEL) != 0 }
}

#[inline(always)]
pub(crate) fn keep_below() -> u64 {
    unsafe { core::ptr::read_volatile(&KEEP_BELOW) }
}

/// Non-zero with `--sample-in-kernel` when `carry_decisions` (carry.rs) is attached: a call's
/// decision is made at its write's entry, for the TCP option that carries it to another host.
#[no_mangle]
pub(crate) static CARRY_DECISIONS: u32 = 0;

/// The namespace (its cookie) whose connections carry decisions; 0 for every namespace.
#[no_mangle]
pub(crate) static CARRY_NETNS_COOKIE: u64 = 0;

/// Non-zero when decisions are exchanged with every remote address, else only with those in
/// `CARRY_NETS` (`--tcp-option-networks`).
#[no_mangle]
pub(crate) static CARRY_EVERYWHERE: u32 = 0;

/// The networks decisions are exchanged with, keyed as `TRUSTED_NETS`.
#[map]
pub(crate) static CARRY_NETS: LpmTrie<[u8; 20], u8> = LpmTrie::with_max_entries(256, 0);

#[inline(always)]
pub(crate) fn carrying_decisions() -> bool {
    unsafe { core::ptr::read_volatile(&CARRY_DECISIONS) != 0 }
}

/// With the framing in the kernel: the processes a connection was announced for (conns.rs);
/// their later connections are announced before their first record only.
#[map]
pub(crate) static ANNOUNCED_PROCESSES: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// `--sample-in-kernel`: the framed requests each process is serving (red.rs), by tgid; the
/// agent removes the entries of ended processes.
#[map]
pub(crate) static SERVING: HashMap<u32, Serving> = HashMap::with_max_entries(16384, 0);

/// `--sample-in-kernel`: the framed requests each thread is serving (red.rs), in a slot by tid:
/// a call made by a thread serving exactly one takes that request's decision, where its
/// process's counts would only say "kept and dropped both in flight". An array, not a hash:
/// a thread-per-connection server starts a thread a request, and an LRU hash's insert of each
/// new thread cost more than the rest of the request's decision. A slot names its thread; a
/// thread finding another's there takes it over, and the one it was taken from no longer
/// finds itself there (its calls then follow no thread: a missing link, never another's).
#[map]
pub(crate) static THREAD_SERVING: Array<ThreadServing> = Array::with_max_entries(THREAD_SLOTS, 0);

/// Slots of `THREAD_SERVING` (a power of two).
pub(crate) const THREAD_SLOTS: u32 = 65536;

/// A value of `THREAD_SERVING`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ThreadServing {
    /// Requests read and not answered (atomic adds: the answer may come from another thread).
    pub(crate) count: u64,
    /// The decision (`data_flags`) of the request the thread started last, on `conn_id`.
    pub(crate) keep: u32,
    /// `keep` is that of a request still in flight.
    pub(crate) known: u32,
    pub(crate) conn_id: u64,
    /// The thread's process: a process that ends while serving never answers, and its
    /// threads' numbers are given to other processes' threads later.
    pub(crate) tgid: u32,
    /// The thread whose slot this is.
    pub(crate) tid: u32,
}

/// `--sample-in-kernel`: the framed requests being served, counted by slot, a slot being a hash
/// of process, method and path (red.rs, `line_slot`): a call whose slot counts exactly one
/// request in flight most likely forwards that request's line. An array, so no count is ever
/// evicted or lost between CPUs; two lines sharing a slot only make a count larger (the rule
/// then does not apply) or point a call at a request of another line, which the agent, linking
/// such calls by the exact request line only, does not link.
#[map]
pub(crate) static SERVING_LINES: Array<Serving> = Array::with_max_entries(LINE_SLOTS, 0);

/// Slots of `SERVING_LINES` (a power of two).
pub(crate) const LINE_SLOTS: u32 = 16384;

/// `--sample-in-kernel`: calls whose decision followed their parent rather than their own
/// sequence number, for their server end on this host to take (red.rs), by sequence number and
/// ports; and decisions read from the TCP option of a request from another host (carry.rs).
/// Taken once; one never taken (its server end is elsewhere) is overwritten in time. An array
/// of slots by a hash of the key, not an LRU hash: the LRU's insert cost a call's decision
/// more than the rest of it. Two requests in flight in one slot lose the first's hand-over
/// (its server end decides by the number: a trace in two pieces, never a wrong parent).
#[map]
pub(crate) static FOLLOWED: Array<Followed> = Array::with_max_entries(FOLLOWED_SLOTS, 0);

/// Slots of `FOLLOWED` (a power of two).
pub(crate) const FOLLOWED_SLOTS: u32 = 16384;

/// A slot of `FOLLOWED`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Followed {
    /// The request's key (`red::edge_key`), 0 for none.
    pub(crate) key: u64,
    /// The decision (`data_flags`).
    pub(crate) keep: u32,
    pub(crate) _pad: u32,
}

/// `--metrics-only`: the histograms of the exchanges counted in the kernel (red.rs), per CPU.
/// Full, an exchange goes to the agent as a record instead.
#[map]
pub(crate) static RED: PerCpuHashMap<RedKey, RedCounts> = PerCpuHashMap::with_max_entries(4096, 0);

/// An empty histogram to insert a new `RED` key with (never written).
#[map]
pub(crate) static RED_ZERO: PerCpuArray<RedCounts> = PerCpuArray::with_max_entries(1, 0);

/// Paths the agent was sent, by `tgid << 32 | path hash` (red.rs). Evicted, a path is sent
/// again.
#[map]
pub(crate) static PATHS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// Records for the agent. The size is set by the agent at load time.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Tracked TCP connections, keyed by `conn_key(tgid, fd)`. LRU so connections whose close we
/// never saw (process killed) age out instead of filling the table.
#[map]
pub(crate) static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// File descriptors known not to be followed (files, pipes, Unix sockets, UDP but to DNS), keyed like
/// `CONNS`. Without it every read and write of a file on the host would walk
/// `task -> files -> fdtable -> file -> inode` again (~1 µs measured); with it, one lookup.
/// An entry goes when its fd is closed or replaced by dup2/dup3; a TCP socket always arrives
/// through connect or accept, which track it first. A separate LRU so files never evict
/// connections.
#[map]
pub(crate) static NOT_TCP: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// The entry time of the last write-type syscall on each CPU, for the exit probe of the same
/// thread on the same CPU (see `entry_time`). A per-CPU slot costs no lock and no hashing.
#[map]
pub(crate) static ENTRY_TIMES: PerCpuArray<EntryTime> = PerCpuArray::with_max_entries(1, 0);

/// Where a data record is built before `bpf_ringbuf_output` copies it into `EVENTS` at its
/// real size. Reserved in the ring at its largest, a record with ~100 bytes of payload took
/// 584 bytes; the payload copy also landed in cold ring lines, and reserve plus submit are two
/// helper calls against one. Measured with bpf_stats, builds alternated: see
/// docs/ARCHITECTURE.md, "Small records". One slot per CPU is enough: syscall tracepoint
/// programs run with preemption off and never nest on a CPU (as for `ENTRY_TIMES`).
#[map]
pub(crate) static SCRATCH: PerCpuArray<DataWithPayload> = PerCpuArray::with_max_entries(1, 0);

/// Where `track` builds a new connection's state before inserting it.
#[map]
pub(crate) static NEW_CONN: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

/// `counter::*`, per CPU.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// What a data record takes in the ring: the record, then room for its payload.
#[repr(C)]
pub(crate) struct DataWithPayload {
    pub(crate) record: DataRecord,
    /// Twice the capture: a copy at an offset below `MAX_CAPTURE` of at most `MAX_CAPTURE`
    /// bytes stays inside, which the verifier can check (the iovecs' copies).
    pub(crate) data: [u8; 2 * MAX_CAPTURE],
    /// A request path's hash and length (red.rs), passed through memory: the verifier then
    /// walks what follows the hashing loop once, not once for each place it can stop.
    pub(crate) path_hash: u32,
    pub(crate) path_len: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct EntryTime {
    pub(crate) pid_tgid: u64,
    pub(crate) ts: u64,
}

#[inline(always)]
pub(crate) fn bump(which: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(which) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // read_volatile: the compiler must not fold the zero initialiser; the agent rewrites it.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub(crate) fn agent_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

#[inline(always)]
pub(crate) fn netns_filter() -> u32 {
    unsafe { core::ptr::read_volatile(&NETNS_FILTER) }
}

pub(crate) use crate::flow::FlowKey;

/// Per thread: the server requests it is serving (read, not yet answered) and the trace the
/// latest one belongs to, for the calls it makes meanwhile.
#[map]
pub(crate) static THREADS: LruHashMap<u32, ThreadContext> = LruHashMap::with_max_entries(16384, 0);

/// `inject_finish`, the injector's second half (see there).
#[map]
pub(crate) static JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// A first send in progress and its injection, which the exit probe of the same syscall
/// reports and forgets (by thread id).
#[map]
pub(crate) static PENDING: LruHashMap<u32, Pending> = LruHashMap::with_max_entries(4096, 0);

/// A request head read for inspection, and the line being inserted.
#[map]
pub(crate) static INJECT_SCRATCH: PerCpuArray<InjectScratch> = PerCpuArray::with_max_entries(1, 0);

/// Callers whose context is trusted when `TRUST_CONTEXT` is 2. Key: 32 bits of address family
/// then the 16 address bytes (IPv4 in the first 4), so a prefix length is 32 + the CIDR's.
#[map]
pub(crate) static TRUSTED_NETS: LpmTrie<[u8; 20], u8> = LpmTrie::with_max_entries(256, 0);

pub(crate) type TrustKey = Key<[u8; 20]>;

/// Bytes of an outgoing message the injector reads to find the request head's end (and any
/// `traceparent` in it): a longer head, or one split over several sends, is not injected.
pub(crate) const HEAD_WINDOW: usize = 1024;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ThreadContext {
    /// Server requests this thread read and that are not answered yet.
    pub(crate) serving: u32,
    /// `trace_hex` holds the trace of the request read last, on `conn_id`.
    pub(crate) has_trace: u32,
    /// `inject_flags::FROM_INCOMING_HEADER` if the trace came with the request.
    pub(crate) flags: u32,
    pub(crate) _pad: u32,
    pub(crate) conn_id: u64,
    pub(crate) trace_hex: [u8; 32],
}

/// A thread's first send on a new outgoing connection, from its sk_msg run(s) to the exit
/// probe of the syscall: marks the connection as seen (a large send reaches sk_msg in several
/// parts, of which only the first may be a head) and, if a line was inserted, its ids.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Pending {
    pub(crate) key: FlowKey,
    pub(crate) trace_hex: [u8; 32],
    pub(crate) span_hex: [u8; 16],
    pub(crate) offset: u32,
    pub(crate) flags: u32,
    /// A line was inserted (the rest is meaningful).
    pub(crate) injected: u32,
    pub(crate) _pad: u32,
}

#[repr(C)]
pub(crate) struct InjectScratch {
    pub(crate) head: [u8; HEAD_WINDOW],
    pub(crate) line: [u8; 72],
    // Here rather than on the stack, which the unrolled loops of the injector fill.
    pub(crate) pending: Pending,
    pub(crate) scan: HeadScan,
    pub(crate) found: Found,
}

/// What `inject_finish` found among the head's lines.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Found {
    /// Just past the blank line (0: not found).
    pub(crate) end: u32,
    pub(crate) traceparent: u32,
}

/// Where the lines of a request head start, found by `inject_context` for `inject_finish`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct HeadScan {
    /// Bytes read.
    pub(crate) n: u32,
    /// Lines found (at most `MAX_LINES`).
    pub(crate) lines: u32,
    /// Just past each '\n'.
    pub(crate) line_at: [u32; MAX_LINES as usize],
}

/// Lines of a request head the injector looks at: a head with more is not injected.
pub(crate) const MAX_LINES: u32 = 32;

#[inline(always)]
pub(crate) fn inject_enabled() -> bool {
    unsafe { core::ptr::read_volatile(&INJECT) != 0 }
}

#[inline(always)]
pub(crate) fn trust_context() -> u32 {
    unsafe { core::ptr::read_volatile(&TRUST_CONTEXT) }
}
