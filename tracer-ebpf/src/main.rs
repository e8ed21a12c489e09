//! Kernel probes.
//!
//! Syscall tracepoints only (no kprobes, no fentry: many production kernels lack them), one per
//! syscall so the kernel itself skips every syscall we do not follow. The exit probe of a data
//! syscall does the work: the syscall's arguments are still in the thread's saved user registers
//! (`bpf_task_pt_regs`), so nothing has to be carried from entry to exit; for a TCP socket it
//! copies a bounded prefix of what was actually moved into one ring-buffer record stamped with
//! kernel timestamps. Entry probes exist only for writes, to stamp when a request starts, in a
//! per-CPU slot. The agent reassembles messages and pairs requests with responses.
//!
//! Measured on this project's 2-core test VM (docs/ARCHITECTURE.md): the previous design, an
//! in-flight hash table filled on every entry and emptied on every exit, was a third of the
//! programs' time; attaching to `raw_syscalls` instead would have taxed every other syscall of
//! the host (~200 ns for a `getppid`).
//!
//! The hot path is: register and task fields read with plain loads through BTF pointers, one
//! hash lookup (the connection is already known), one clock read, one copy into the ring. Each
//! helper call counts: on this project's VM every kernel return pays a speculation mitigation
//! (docs/ARCHITECTURE.md, "Fewer calls into the kernel per syscall"). The ring buffer wakes the
//! agent only past a byte threshold; the agent drains on a timer otherwise.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_comm as current_comm_raw, bpf_get_current_task,
            bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_user as read_user_raw,
            bpf_task_pt_regs,
        },
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use tracer_common::{
    conn_key, counter, data_flags, direction, kind, syscall, CloseRecord, ConnRecord, ConnState,
    ConnTuple, DataRecord, KernelOffsets, RecordHeader, MAX_CAPTURE, MESSAGE_CAPTURE_BUDGET,
    WAKEUP_THRESHOLD_BYTES,
};

/// Filled by the agent from BTF before load (see `KernelOffsets`).
#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// The agent's own process: never traced, or its export traffic would trace itself.
#[no_mangle]
static AGENT_TGID: u32 = 0;

/// Trace only sockets of this network namespace (its inode number); 0 traces all. One agent per
/// namespace is how containers and the test's namespace "hosts" each get their own agent.
#[no_mangle]
static NETNS_FILTER: u32 = 0;

/// Records for the agent. The size is set by the agent at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Tracked TCP connections, keyed by `conn_key(tgid, fd)`. LRU so connections whose close we
/// never saw (process killed) age out instead of filling the table.
#[map]
static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// File descriptors known not to be TCP sockets (files, pipes, UDP and Unix sockets), keyed like
/// `CONNS`. Without it every read and write of a file on the host would walk
/// `task -> files -> fdtable -> file -> inode` again (~1 µs measured); with it, one lookup.
/// An entry goes when its fd is closed or replaced by dup2/dup3; a TCP socket always arrives
/// through connect or accept, which track it first. A separate LRU so files never evict
/// connections.
#[map]
static NOT_TCP: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// The entry time of the last write-type syscall on each CPU, for the exit probe of the same
/// thread on the same CPU (see `entry_time`). A per-CPU slot costs no lock and no hashing.
#[map]
static ENTRY_TIMES: PerCpuArray<EntryTime> = PerCpuArray::with_max_entries(1, 0);

/// Where a data record is built before `bpf_ringbuf_output` copies it into `EVENTS` at its
/// real size. Reserved in the ring at its largest, a record with ~100 bytes of payload took
/// 584 bytes; the payload copy also landed in cold ring lines, and reserve plus submit are two
/// helper calls against one. Measured with bpf_stats, builds alternated: see
/// docs/ARCHITECTURE.md, "Small records". One slot per CPU is enough: syscall tracepoint
/// programs run with preemption off and never nest on a CPU (as for `ENTRY_TIMES`).
#[map]
static SCRATCH: PerCpuArray<DataWithPayload> = PerCpuArray::with_max_entries(1, 0);

/// `counter::*`, per CPU.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// What a data record takes in the ring: the record, then room for its payload.
#[repr(C)]
struct DataWithPayload {
    record: DataRecord,
    data: [u8; MAX_CAPTURE],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct EntryTime {
    pid_tgid: u64,
    ts: u64,
}

/// The calling thread's saved user registers (`struct pt_regs`), where a syscall's arguments
/// are. `bpf_task_pt_regs` returns a BTF pointer, so each register is one plain load the
/// verifier checks against the kernel's BTF (and the JIT guards against faults): no helper call.
/// Copying the registers with `bpf_probe_read_kernel` instead cost ~100 ns a syscall here, three
/// nested kernel calls each paying for the return-stack mitigations of this CPU.
#[derive(Clone, Copy)]
struct SyscallRegs(*const u8);

/// Where syscall arguments 1-4 (di, si, dx, r10) are in `struct pt_regs` (x86-64 UAPI,
/// arch/x86/include/uapi/asm/ptrace.h).
const PT_REGS_ARGS: [usize; 4] = [112, 104, 96, 56];

impl SyscallRegs {
    #[inline(always)]
    fn of(task: Task) -> Self {
        // SAFETY: bpf_task_pt_regs takes the BTF task pointer bpf_get_current_task_btf returns.
        SyscallRegs(unsafe { bpf_task_pt_regs(task.0 as *mut _) } as *const u8)
    }

    /// Syscall argument `n` (0-based, a constant at every call site).
    #[inline(always)]
    fn arg(self, n: usize) -> u64 {
        // SAFETY: a BTF pointer to pt_regs; the verifier checks the offset against its type.
        unsafe { core::ptr::read_volatile(self.0.add(PT_REGS_ARGS[n]).cast::<u64>()) }
    }
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const SOCK_DGRAM: u16 = 2;
/// UDP is followed only to this remote port: DNS, whose stub resolvers (glibc, dig) connect
/// their UDP sockets to the server. Other UDP (QUIC, metrics) is not read.
const DNS_PORT: u16 = 53;
/// `sizeof(struct mmsghdr)` on x86-64 (a `user_msghdr`, then `msg_len`, padded), and where its
/// `msg_len` is.
const MMSGHDR_SIZE: u64 = 64;
const MMSGHDR_LEN: u64 = 56;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const MSG_PEEK: u64 = 2;
const EINPROGRESS: i64 = 115;

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record, and of `ret` in
/// `sys_exit_*` (see /sys/kernel/tracing/events/syscalls/*/format).
const ARG0: usize = 16;
const RET: usize = 16;

/// A direct load from the tracepoint record: the verifier allows aligned reads of the context,
/// and a load is cheaper than a helper call.
#[inline(always)]
fn ctx_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: syscall tracepoint records have `ret` / six argument slots at these offsets.
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<u64>() }
}

#[inline(always)]
fn bump(which: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(which) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn offsets() -> KernelOffsets {
    // read_volatile: the compiler must not fold the zero initialiser; the agent rewrites it.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn agent_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

#[inline(always)]
fn netns_filter() -> u32 {
    unsafe { core::ptr::read_volatile(&NETNS_FILTER) }
}

/// The calling thread's `task_struct`, as the BTF pointer `bpf_get_current_task_btf` returns:
/// its fields are plain loads at offsets from BTF, which the verifier sees as constants (they
/// are in the frozen read-only data) and checks against the kernel's type.
#[derive(Clone, Copy)]
struct Task(*const u8);

impl Task {
    #[inline(always)]
    fn current() -> Self {
        // SAFETY: no preconditions.
        Task(unsafe { bpf_get_current_task_btf() } as *const u8)
    }

    /// `pid_tgid` as `bpf_get_current_pid_tgid` would return it, without the call.
    #[inline(always)]
    fn pid_tgid(self) -> u64 {
        // SAFETY: field offsets of task_struct from the running kernel's BTF (read_volatile:
        // the agent rewrites the zero initialiser before load).
        unsafe {
            let pid = core::ptr::read_volatile(&raw const OFFSETS.task_pid) as usize;
            let tgid = core::ptr::read_volatile(&raw const OFFSETS.task_tgid) as usize;
            let pid = core::ptr::read_volatile(self.0.add(pid).cast::<u32>());
            let tgid = core::ptr::read_volatile(self.0.add(tgid).cast::<u32>());
            (u64::from(tgid) << 32) | u64::from(pid)
        }
    }
}

/// The calling thread and its pid_tgid, unless it belongs to the agent (or the agent has not
/// filled in the offsets yet).
#[inline(always)]
fn caller() -> Option<(Task, u64)> {
    // SAFETY: read_volatile as in `offsets`.
    if unsafe { core::ptr::read_volatile(&raw const OFFSETS.valid) } == 0 {
        return None;
    }
    let task = Task::current();
    let pid_tgid = task.pid_tgid();
    ((pid_tgid >> 32) as u32 != agent_tgid()).then_some((task, pid_tgid))
}

#[inline(always)]
unsafe fn read_at<T>(base: u64, off: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

/// A TCP socket as the probes first see it.
struct TcpSocket {
    tuple: ConnTuple,
    /// The kernel's `struct sock *`.
    sk: u64,
    /// A UDP socket connected to a DNS server.
    datagram: bool,
}

/// What an fd is, as far as the probes care.
enum FdKind {
    Tcp(TcpSocket),
    /// Open, and certainly not a TCP socket.
    NotTcp,
}

/// Follows `current->files->fdt->fd[fd]` to the socket and, if it is a TCP socket (an inet
/// stream socket), returns its endpoints. `None`: not open, or not readable; decide again next
/// time.
#[inline(always)]
fn fd_kind(fd: u32) -> Option<FdKind> {
    let o = offsets();
    if o.valid == 0 {
        return None;
    }
    unsafe {
        let task = bpf_get_current_task();
        let files: u64 = read_at(task, o.task_files)?;
        if files == 0 {
            return None;
        }
        let fdt: u64 = read_at(files, o.files_fdt)?;
        let max_fds: u32 = read_at(fdt, o.fdtable_max_fds)?;
        if fd >= max_fds {
            return None;
        }
        let fd_array: u64 = read_at(fdt, o.fdtable_fd)?;
        let file: u64 = bpf_probe_read_kernel((fd_array + 8 * fd as u64) as *const u64).ok()?;
        if file == 0 {
            return None;
        }
        let inode: u64 = read_at(file, o.file_inode)?;
        let mode: u16 = read_at(inode, o.inode_mode)?;
        if mode & S_IFMT != S_IFSOCK {
            return Some(FdKind::NotTcp);
        }
        let socket: u64 = read_at(file, o.file_private_data)?;
        let sock_type: u16 = read_at(socket, o.socket_type)?;
        if sock_type != SOCK_STREAM && sock_type != SOCK_DGRAM {
            return Some(FdKind::NotTcp);
        }
        let sk: u64 = read_at(socket, o.socket_sk)?;
        if sk == 0 {
            return None;
        }
        let family: u16 = read_at(sk, o.sock_family)?;
        let mut t = ConnTuple {
            family,
            local_port: read_at(sk, o.sock_num)?,
            remote_port: u16::from_be(read_at(sk, o.sock_dport)?),
            ..ConnTuple::default()
        };
        if family == AF_INET {
            let l: [u8; 4] = read_at(sk, o.sock_rcv_saddr)?;
            let r: [u8; 4] = read_at(sk, o.sock_daddr)?;
            t.local_addr[..4].copy_from_slice(&l);
            t.remote_addr[..4].copy_from_slice(&r);
        } else if family == AF_INET6 {
            t.local_addr = read_at(sk, o.sock_v6_rcv_saddr)?;
            t.remote_addr = read_at(sk, o.sock_v6_daddr)?;
        } else {
            return Some(FdKind::NotTcp);
        }
        let datagram = sock_type == SOCK_DGRAM;
        if datagram && t.remote_port != DNS_PORT {
            return Some(FdKind::NotTcp);
        }
        Some(FdKind::Tcp(TcpSocket {
            tuple: t,
            sk,
            datagram,
        }))
    }
}

/// The calling thread's command name, read into 8-byte-aligned storage. aya's
/// `bpf_get_current_comm()` zeroes a byte array with a call to `memset`, a BPF-to-BPF call whose
/// frame Linux 6.1's verifier adds, rounded up to 32 bytes, to the caller's 488: "combined stack
/// size of 2 calls is 544. Too large", and no probe loaded on Debian 12's kernel (`cargo xtask
/// kernels`). Zeroing two u64s is two stores.
#[inline(always)]
fn current_comm() -> [u8; 16] {
    let mut comm = [0u64; 2];
    // SAFETY: the helper writes at most the 16 bytes it is given.
    unsafe { current_comm_raw(comm.as_mut_ptr().cast(), 16) };
    // SAFETY: same size, and any 16 bytes are a valid [u8; 16].
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(comm) }
}

/// The network namespace (inode number) of a socket: `sk->__sk_common.skc_net.net->ns.inum`.
/// Read only when the agent filters by namespace (two kernel reads per new connection).
#[inline(always)]
fn netns_of(sk: u64) -> u32 {
    let o = offsets();
    // SAFETY: bounded kernel reads at offsets from BTF; a failed read gives 0 (no namespace).
    unsafe {
        match read_at::<u64>(sk, o.sock_net) {
            Some(net) if net != 0 => read_at(net, o.net_ns_inum).unwrap_or(0),
            _ => 0,
        }
    }
}

/// Starts tracking `fd` of the calling thread's process if it is a TCP socket (of the traced
/// network namespace) and tells the agent its endpoints. Returns its state if it is tracked
/// now; remembers an fd that is not one.
#[inline(always)]
fn track(pid_tgid: u64, fd: u32) -> Option<*mut ConnState> {
    let tgid = (pid_tgid >> 32) as u32;
    let key = conn_key(tgid, fd);
    let socket = match fd_kind(fd)? {
        FdKind::Tcp(socket) => socket,
        FdKind::NotTcp => {
            let _ = NOT_TCP.insert(key, 0, 0);
            return None;
        }
    };
    let wanted_netns = netns_filter();
    if wanted_netns != 0 && netns_of(socket.sk) != wanted_netns {
        // Another namespace's socket is, for this agent, as good as a file.
        let _ = NOT_TCP.insert(key, 0, 0);
        return None;
    }
    let state = ConnState {
        conn_id: unsafe { bpf_ktime_get_ns() },
        sk: socket.sk,
        datagram: u32::from(socket.datagram),
        tuple: socket.tuple,
        comm: current_comm(),
        ..ConnState::default()
    };
    if CONNS.insert(key, state, 0).is_err() {
        bump(counter::CONN_TABLE_FULL);
        return None;
    }
    // Lost when the ring is full; the agent then reads the same facts from CONNS.
    match EVENTS.reserve::<ConnRecord>(0) {
        Some(mut entry) => {
            let ts = state.conn_id;
            let rec = ConnRecord {
                header: header(kind::CONNECTION, pid_tgid, fd, ts, ts, ts),
                tuple: state.tuple,
                comm: state.comm,
            };
            // SAFETY: a reserved record of the right size.
            unsafe { *entry.as_mut_ptr() = rec };
            entry.submit(wake_flags(core::mem::size_of::<ConnRecord>() as u64));
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
    CONNS.get_ptr_mut(key)
}

/// Where the payload of a data syscall lives in user memory.
#[derive(Clone, Copy)]
enum Buffer {
    /// `buf, len` arguments (read, write, recvfrom, sendto).
    Plain,
    /// `iov, iovcnt` arguments (readv, writev): the first iovec is captured.
    Iovec,
    /// a `struct user_msghdr *` (recvmsg, sendmsg): its first iovec is captured.
    Msghdr,
    /// no user buffer (sendfile): only the length is recorded.
    None,
    /// message `n` of a `struct mmsghdr *` array (sendmmsg): its first iovec is captured.
    Mmsg(u64),
}

#[inline(always)]
fn first_iovec(iov: u64) -> (u64, u64) {
    // struct iovec { void *iov_base; size_t iov_len; }
    let v: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.unwrap_or([0, 0]);
    (v[0], v[1])
}

/// The user buffer of a data syscall and its size, from the syscall's arguments. Read at exit:
/// the kernel writes back into a `msghdr` only its lengths and flags, never `msg_iov`.
#[inline(always)]
fn buffer_of(regs: SyscallRegs, buffer: Buffer) -> (u64, u64) {
    match buffer {
        Buffer::Plain => (regs.arg(1), regs.arg(2)),
        Buffer::Iovec => first_iovec(regs.arg(1)),
        Buffer::Msghdr => {
            // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
            let iov: u64 =
                unsafe { bpf_probe_read_user((regs.arg(1) + 16) as *const u64) }.unwrap_or(0);
            first_iovec(iov)
        }
        Buffer::Mmsg(n) => {
            let msghdr = regs.arg(1) + n * MMSGHDR_SIZE;
            let iov: u64 = unsafe { bpf_probe_read_user((msghdr + 16) as *const u64) }.unwrap_or(0);
            first_iovec(iov)
        }
        Buffer::None => (0, 0),
    }
}

/// When the calling thread entered the write-type syscall it is leaving, if `sys_enter` stamped
/// it on this CPU. The slot is cleared so a later call cannot reuse it. A thread that moved to
/// another CPU mid-call (it blocked, or was preempted and migrated) misses.
#[inline(always)]
fn entry_time(pid_tgid: u64) -> Option<u64> {
    let slot = ENTRY_TIMES.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; programs do not nest on one CPU for these tracepoints.
    unsafe {
        if (*slot).pid_tgid != pid_tgid {
            return None;
        }
        (*slot).pid_tgid = 0;
        Some((*slot).ts)
    }
}

#[inline(always)]
fn header(
    k: u32,
    pid_tgid: u64,
    fd: u32,
    conn_id: u64,
    ts_enter: u64,
    ts_exit: u64,
) -> RecordHeader {
    RecordHeader {
        kind: k,
        tgid: (pid_tgid >> 32) as u32,
        fd,
        tid: pid_tgid as u32,
        conn_id,
        ts_enter,
        ts_exit,
    }
}

/// Submit flags for a reserved record of `size` bytes: wake the agent only for the record that
/// takes the unread data past the threshold, or past a multiple of it.
///
/// Waking is an inter-processor interrupt, which in a VM is a trap to the hypervisor: measured
/// here, ~5 µs a record. Waking on every record while more than the threshold waits (while the
/// agent is already draining) made half of all records pay that at 20k requests/s. A crossing
/// can be missed under a race between CPUs (another CPU reserves between this one's reserve
/// and its query); the next multiple wakes the agent then. That matters when the agent is
/// starved: its priority watchdog waits for these wake-ups while traffic is light.
#[inline(always)]
fn wake_flags(size: u64) -> u64 {
    // What the record takes in the ring: 8-byte aligned, after an 8-byte header.
    let in_ring = size.div_ceil(8) * 8 + 8;
    // BPF_RB_AVAIL_DATA = 0; it counts reserved records too, this one included.
    let avail = EVENTS.query(0);
    let shift = WAKEUP_THRESHOLD_BYTES.trailing_zeros();
    if avail >= WAKEUP_THRESHOLD_BYTES
        && (avail >> shift) != (avail.saturating_sub(in_ring) >> shift)
    {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// A data syscall returned `ret`: if its socket is a tracked (or new) TCP connection, send what
/// moved.
#[inline(always)]
fn on_data(
    pid_tgid: u64,
    regs: SyscallRegs,
    ret: i64,
    (sc, dir, buffer): (u32, u32, Buffer),
    ts_enter: Option<u64>,
) -> u32 {
    let tgid = (pid_tgid >> 32) as u32;
    let fd = regs.arg(0) as u32;
    let key = conn_key(tgid, fd);
    let state = match CONNS.get_ptr_mut(key) {
        Some(state) => state,
        None => {
            if NOT_TCP.get_ptr(key).is_some() {
                return 0;
            }
            match track(pid_tgid, fd) {
                Some(state) => state,
                None => return 0,
            }
        }
    };
    // SAFETY: a map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    if state.muted != 0 {
        return 0;
    }
    let ts_exit = unsafe { bpf_ktime_get_ns() };
    let ts_enter = match ts_enter {
        Some(ts) => ts,
        None => {
            if dir == direction::EGRESS {
                bump(counter::ENTRY_TIME_MISSED);
            }
            ts_exit
        }
    };
    bump(counter::DATA_SYSCALLS);
    // Where the message starts in the TCP stream: read once a message, the agent counts bytes
    // from there (one kernel read per message rather than per syscall).
    let mut tcp_seq = 0u32;
    let mut flags = 0u32;
    if state.direction != dir {
        state.direction = dir;
        state.message_seq = state.message_seq.wrapping_add(1);
        state.message_captured = 0;
        // A datagram socket has no sequence numbers (and no `tcp_sock` to read them from).
        if state.datagram == 0 {
            let o = offsets();
            let field = if dir == direction::EGRESS {
                o.tcp_write_seq
            } else {
                o.tcp_copied_seq
            };
            // The syscall has moved `ret` bytes already: its first byte was `ret` before the end.
            if let Some(after) = unsafe { read_at::<u32>(state.sk, field) } {
                tcp_seq = after.wrapping_sub(ret as u32);
                flags = data_flags::TCP_SEQ;
            }
        }
    }

    // The record is built in this CPU's scratch slot, always in cache, and copied into the
    // ring at its real size by one helper call (see `SCRATCH`).
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let (buf, buf_len) = buffer_of(regs, buffer);
    // How much payload to copy: what moved, within the first buffer, within this record, within
    // the message's budget.
    let mut n = ret as u64;
    if n > buf_len {
        n = buf_len;
    }
    let budget = MESSAGE_CAPTURE_BUDGET.saturating_sub(state.message_captured) as u64;
    if n > budget {
        n = budget;
    }
    if n > MAX_CAPTURE as u64 {
        n = MAX_CAPTURE as u64;
    }
    unsafe {
        let h = header(kind::DATA, pid_tgid, fd, state.conn_id, ts_enter, ts_exit);
        (*rec).record.header = h;
        (*rec).record.tcp_seq = tcp_seq;
        (*rec).record.flags = flags;
        (*rec).record.direction = dir;
        (*rec).record.syscall = sc;
        (*rec).record.len = ret as u64;
        (*rec).record.message_seq = state.message_seq;
        let mut captured = 0u32;
        if n > 0 && buf != 0 {
            // The mask restates the bound for the verifier (n <= MAX_CAPTURE already).
            let len = (n as u32) & (2 * MAX_CAPTURE as u32 - 1);
            let len = if len > MAX_CAPTURE as u32 {
                MAX_CAPTURE as u32
            } else {
                len
            };
            if read_user_raw((*rec).data.as_mut_ptr().cast(), len, buf as *const _) == 0 {
                captured = len;
            } else {
                bump(counter::PAYLOAD_READ_FAILED);
            }
        }
        (*rec).record.captured = captured;
        // Restated for the verifier: the size is within the scratch slot.
        let captured = captured & (2 * MAX_CAPTURE as u32 - 1);
        let captured = if captured > MAX_CAPTURE as u32 {
            MAX_CAPTURE as u32
        } else {
            captured
        };
        let size = core::mem::size_of::<DataRecord>() + captured as usize;
        let bytes = core::slice::from_raw_parts(rec.cast::<u8>(), size);
        if EVENTS
            .output::<[u8]>(bytes, wake_flags(size as u64))
            .is_err()
        {
            bump(counter::RINGBUF_FULL);
            return 0;
        }
        state.message_captured += captured;
    }
    bump(counter::RECORDS_SENT);
    0
}

/// `fd` was released (close, or replaced by dup2/dup3): forget it, and tell the agent if it
/// was a connection.
#[inline(always)]
fn on_close(pid_tgid: u64, fd: u32) -> u32 {
    let key = conn_key((pid_tgid >> 32) as u32, fd);
    let Some(state) = (unsafe { CONNS.get(key) }).copied() else {
        let _ = NOT_TCP.remove(key);
        return 0;
    };
    let _ = CONNS.remove(key);
    if state.muted != 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<CloseRecord>(0) {
        Some(mut entry) => {
            unsafe {
                (*entry.as_mut_ptr()).header =
                    header(kind::CLOSE, pid_tgid, fd, state.conn_id, now, now);
            }
            let flags = wake_flags(core::mem::size_of::<CloseRecord>() as u64);
            entry.submit(flags);
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
    0
}

/// Stamps the entry time of a write-type syscall for its exit (see `entry_time`). Every call is
/// stamped, writes to files included: skipping those took a connection lookup, which cost more
/// than the clock read (~100 ns against ~60 ns, measured here).
#[inline(always)]
fn stamp_entry() -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(0) {
        let ts = unsafe { bpf_ktime_get_ns() };
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot = EntryTime { pid_tgid, ts } };
    }
    0
}

/// The exit of a data syscall.
#[inline(always)]
fn on_exit(ctx: &TracePointContext, sc: u32, dir: u32, buffer: Buffer) -> u32 {
    let ret = ctx_u64(ctx, RET) as i64;
    let Some((task, pid_tgid)) = caller() else {
        return 0;
    };
    // Requests a process writes start when it issues the write; what it reads exists once the
    // read returns, so reads need no entry time (the agent uses `ts_exit` for them). Taken
    // first, whatever this call turns out to be, so a stamp never outlives its call.
    let ts_enter = if dir == direction::EGRESS {
        entry_time(pid_tgid)
    } else {
        None
    };
    if ret <= 0 {
        return 0;
    }
    let regs = SyscallRegs::of(task);
    // MSG_PEEK reads without consuming: the same bytes would be seen twice.
    if sc == syscall::RECVFROM && regs.arg(3) & MSG_PEEK != 0 {
        return 0;
    }
    on_data(pid_tgid, regs, ret, (sc, dir, buffer), ts_enter)
}

macro_rules! data_syscall {
    ($exit:ident, $sc:expr, $dir:expr, $buf:expr) => {
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_exit(&ctx, $sc, $dir, $buf)
        }
    };
    ($enter:ident, $exit:ident, $sc:expr, $dir:expr, $buf:expr) => {
        #[tracepoint]
        pub fn $enter(_ctx: TracePointContext) -> u32 {
            stamp_entry()
        }
        data_syscall!($exit, $sc, $dir, $buf);
    };
}

data_syscall!(
    sys_exit_read,
    syscall::READ,
    direction::INGRESS,
    Buffer::Plain
);
data_syscall!(
    sys_exit_readv,
    syscall::READV,
    direction::INGRESS,
    Buffer::Iovec
);
data_syscall!(
    sys_exit_recvfrom,
    syscall::RECVFROM,
    direction::INGRESS,
    Buffer::Plain
);
data_syscall!(
    sys_exit_recvmsg,
    syscall::RECVMSG,
    direction::INGRESS,
    Buffer::Msghdr
);
data_syscall!(
    sys_enter_write,
    sys_exit_write,
    syscall::WRITE,
    direction::EGRESS,
    Buffer::Plain
);
data_syscall!(
    sys_enter_writev,
    sys_exit_writev,
    syscall::WRITEV,
    direction::EGRESS,
    Buffer::Iovec
);
data_syscall!(
    sys_enter_sendto,
    sys_exit_sendto,
    syscall::SENDTO,
    direction::EGRESS,
    Buffer::Plain
);
data_syscall!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    syscall::SENDMSG,
    direction::EGRESS,
    Buffer::Msghdr
);
// sendfile(out_fd, in_fd, ...): the socket is the first argument, the payload is a file the
// probes do not read. Counted so response lengths and end times stay right.
data_syscall!(
    sys_enter_sendfile64,
    sys_exit_sendfile64,
    syscall::SENDFILE,
    direction::EGRESS,
    Buffer::None
);

#[tracepoint]
pub fn sys_enter_sendmmsg(_ctx: TracePointContext) -> u32 {
    stamp_entry()
}

/// sendmmsg(fd, msgvec, vlen, flags) sent `ret` datagrams: the first two become records of
/// their own (a stub resolver sends the A and AAAA queries of a lookup in one call).
#[tracepoint]
pub fn sys_exit_sendmmsg(ctx: TracePointContext) -> u32 {
    let ret = ctx_u64(&ctx, RET) as i64;
    let Some((task, pid_tgid)) = caller() else {
        return 0;
    };
    let ts_enter = entry_time(pid_tgid);
    if ret <= 0 {
        return 0;
    }
    let regs = SyscallRegs::of(task);
    for n in 0..2u64 {
        if n as i64 >= ret {
            break;
        }
        let at = regs.arg(1) + n * MMSGHDR_SIZE + MMSGHDR_LEN;
        let len: u32 = unsafe { bpf_probe_read_user(at as *const u32) }.unwrap_or(0);
        if len > 0 {
            on_data(
                pid_tgid,
                regs,
                i64::from(len),
                (syscall::SENDMMSG, direction::EGRESS, Buffer::Mmsg(n)),
                ts_enter,
            );
        }
    }
    0
}

/// A connect that succeeded or is in progress: a new client connection on this fd (whatever
/// the fd was before is forgotten).
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let ret = ctx_u64(&ctx, RET) as i64;
    if ret != 0 && ret != -EINPROGRESS {
        return 0;
    }
    if let Some((task, pid_tgid)) = caller() {
        let fd = SyscallRegs::of(task).arg(0) as u32;
        track(pid_tgid, fd);
    }
    0
}

#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) -> u32 {
    let ret = ctx_u64(ctx, RET) as i64;
    if ret < 0 {
        return 0;
    }
    if let Some((_, pid_tgid)) = caller() {
        track(pid_tgid, ret as u32);
    }
    0
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx)
}
#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx)
}

/// At entry, while the fd still names the connection (after it, another thread may already
/// have the number for a new file).
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    on_close(pid_tgid, ctx_u64(&ctx, ARG0) as u32)
}

/// dup2/dup3(old, new) closed whatever `new` was: the returned fd is now a copy of `old`, which
/// the next data syscall classifies afresh. `dup2(fd, fd)` closes nothing (dup3 refuses it).
#[inline(always)]
fn on_dup_exit(ctx: &TracePointContext, may_be_same: bool) -> u32 {
    let ret = ctx_u64(ctx, RET) as i64;
    if ret < 0 {
        return 0;
    }
    let Some((task, pid_tgid)) = caller() else {
        return 0;
    };
    if may_be_same && SyscallRegs::of(task).arg(0) as i64 == ret {
        return 0;
    }
    on_close(pid_tgid, ret as u32)
}

#[tracepoint]
pub fn sys_exit_dup2(ctx: TracePointContext) -> u32 {
    on_dup_exit(&ctx, true)
}
#[tracepoint]
pub fn sys_exit_dup3(ctx: TracePointContext) -> u32 {
    on_dup_exit(&ctx, false)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
