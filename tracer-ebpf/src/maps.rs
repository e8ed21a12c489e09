//! The probes' maps and the agent's load-time settings (read-only globals), and the small
//! accessors the programs use on them.
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{counter, ConnState, DataRecord, KernelOffsets, MAX_CAPTURE};

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

/// `counter::*`, per CPU.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// What a data record takes in the ring: the record, then room for its payload.
#[repr(C)]
pub(crate) struct DataWithPayload {
    pub(crate) record: DataRecord,
    pub(crate) data: [u8; MAX_CAPTURE],
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
