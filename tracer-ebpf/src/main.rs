//! Kernel probes.
//!
//! Syscall tracepoints only (no kprobes, no fentry: many production kernels lack them). For each
//! data syscall the entry probe decides whether the file descriptor is a TCP socket and remembers
//! the user buffer; the exit probe copies a bounded prefix of what was actually moved into one
//! ring-buffer record stamped with kernel timestamps. The agent reassembles messages and pairs
//! requests with responses.
//!
//! The hot path is: one hash lookup on entry (the connection is already known), one insert of the
//! in-flight syscall, and on exit one lookup, one reserve/copy/commit. The ring buffer wakes the
//! agent only past a byte threshold; the agent drains on a timer otherwise.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_user as read_user_raw},
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use tracer_common::{
    conn_key, counter, direction, kind, role_hint, syscall, CloseRecord, ConnState, ConnTuple,
    DataRecord, KernelOffsets, RecordHeader, MAX_CAPTURE, MESSAGE_CAPTURE_BUDGET,
    WAKEUP_THRESHOLD_BYTES,
};

/// Filled by the agent from BTF before load (see `KernelOffsets`).
#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// The agent's own process: never traced, or its export traffic would trace itself.
#[no_mangle]
static AGENT_TGID: u32 = 0;

/// Records for the agent. The size is set by the agent at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Tracked TCP connections, keyed by `conn_key(tgid, fd)`. LRU so connections whose close we
/// never saw (process killed) age out instead of filling the table.
#[map]
static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// Syscalls between entry and exit, keyed by pid_tgid (one in flight per thread).
/// Preallocated (~1.5 MiB): every traced syscall inserts and deletes an entry, and the
/// preallocated table's per-CPU free lists are cheaper than allocating each entry.
#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(16384, 0);

/// `counter::*`, per CPU.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// What the entry probe leaves for the exit probe.
#[repr(C)]
#[derive(Clone, Copy)]
struct Inflight {
    ts_enter: u64,
    /// Start of the user buffer the payload is in (first iovec for vectored calls).
    buf: u64,
    /// Bytes available at `buf` (the first iovec's length for vectored calls).
    buf_len: u64,
    fd: u32,
    syscall: u32,
    direction: u32,
    /// For accept/connect: which role hint a new connection gets.
    role: u32,
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const MSG_PEEK: u64 = 2;
const EINPROGRESS: i64 = 115;

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record, and of `ret` in
/// `sys_exit_*` (see /sys/kernel/tracing/events/syscalls/*/format).
const ARG0: usize = 16;
const RET: usize = 16;

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall tracepoint records have six 8-byte argument slots from ARG0.
    unsafe { ctx_u64(ctx, ARG0 + 8 * n) }
}

/// A direct load from the tracepoint record: the verifier allows aligned reads of the context,
/// and a load is cheaper than a `bpf_probe_read_kernel` call (`read_at`) on every syscall.
#[inline(always)]
unsafe fn ctx_u64(ctx: &TracePointContext, offset: usize) -> u64 {
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
unsafe fn read_at<T>(base: u64, off: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

/// Follows `current->files->fdt->fd[fd]` to the socket and, if it is a TCP socket (an inet
/// stream socket), returns its endpoints.
#[inline(always)]
fn tcp_tuple(fd: u32) -> Option<ConnTuple> {
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
            return None;
        }
        let socket: u64 = read_at(file, o.file_private_data)?;
        let sock_type: u16 = read_at(socket, o.socket_type)?;
        if sock_type != SOCK_STREAM {
            return None;
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
            return None;
        }
        Some(t)
    }
}

/// Starts tracking `fd` of `tgid` if it is a TCP socket. Returns whether it is tracked now.
#[inline(always)]
fn track(tgid: u32, fd: u32, role: u32) -> bool {
    let Some(tuple) = tcp_tuple(fd) else {
        return false;
    };
    let state = ConnState {
        conn_id: unsafe { bpf_ktime_get_ns() },
        tuple,
        comm: bpf_get_current_comm().unwrap_or_default(),
        role_hint: role,
        ..ConnState::default()
    };
    if CONNS.insert(conn_key(tgid, fd), state, 0).is_err() {
        bump(counter::CONN_TABLE_FULL);
        return false;
    }
    true
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
}

#[inline(always)]
fn first_iovec(iov: u64) -> (u64, u64) {
    // struct iovec { void *iov_base; size_t iov_len; }
    let v: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.unwrap_or([0, 0]);
    (v[0], v[1])
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext, sc: u32, dir: u32, buffer: Buffer) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == agent_tgid() {
        return 0;
    }
    let fd = arg(ctx, 0) as u32;
    match CONNS.get_ptr(conn_key(tgid, fd)) {
        Some(state) => {
            if unsafe { (*state).muted } != 0 {
                return 0;
            }
        }
        None => {
            if !track(tgid, fd, role_hint::UNKNOWN) {
                return 0;
            }
        }
    }
    let (buf, buf_len) = match buffer {
        Buffer::Plain => (arg(ctx, 1), arg(ctx, 2)),
        Buffer::Iovec => first_iovec(arg(ctx, 1)),
        Buffer::Msghdr => {
            // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
            let iov: u64 =
                unsafe { bpf_probe_read_user((arg(ctx, 1) + 16) as *const u64) }.unwrap_or(0);
            first_iovec(iov)
        }
        Buffer::None => (0, 0),
    };
    let inflight = Inflight {
        ts_enter: unsafe { bpf_ktime_get_ns() },
        buf,
        buf_len,
        fd,
        syscall: sc,
        direction: dir,
        role: 0,
    };
    if INFLIGHT.insert(pid_tgid, inflight, 0).is_err() {
        bump(counter::INFLIGHT_FULL);
    }
    0
}

#[inline(always)]
fn header(
    k: u32,
    pid_tgid: u64,
    fd: u32,
    state: &ConnState,
    ts_enter: u64,
    ts_exit: u64,
) -> RecordHeader {
    RecordHeader {
        kind: k,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        conn_id: state.conn_id,
        ts_enter,
        ts_exit,
        tuple: state.tuple,
        role_hint: state.role_hint,
        _pad: 0,
        comm: state.comm,
    }
}

/// Submit flags for a reserved record of `size` bytes: wake the agent only for the record that
/// takes the unread data past the threshold.
///
/// Waking is an inter-processor interrupt, which in a VM is a trap to the hypervisor: measured
/// here, ~5 µs a record. Waking on every record while more than the threshold waits (while the
/// agent is already draining) made half of all records pay that at 20k requests/s. A crossing
/// missed under a race between CPUs costs at most the agent's drain interval (10 ms).
#[inline(always)]
fn wake_flags(size: u64) -> u64 {
    // What the record takes in the ring: 8-byte aligned, after an 8-byte header.
    let in_ring = size.div_ceil(8) * 8 + 8;
    // BPF_RB_AVAIL_DATA = 0; it counts reserved records too, this one included.
    let avail = EVENTS.query(0);
    if avail >= WAKEUP_THRESHOLD_BYTES && avail < WAKEUP_THRESHOLD_BYTES + in_ring {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inflight) = (unsafe { INFLIGHT.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = INFLIGHT.remove(pid_tgid);
    let ret = unsafe { ctx_u64(ctx, RET) } as i64;
    if ret <= 0 {
        return 0;
    }
    let ts_exit = unsafe { bpf_ktime_get_ns() };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(state) = CONNS.get_ptr_mut(conn_key(tgid, inflight.fd)) else {
        return 0;
    };
    let state = unsafe { &mut *state };
    bump(counter::DATA_SYSCALLS);
    if state.direction != inflight.direction {
        state.direction = inflight.direction;
        state.message_seq = state.message_seq.wrapping_add(1);
        state.message_captured = 0;
    }

    let Some(mut entry) = EVENTS.reserve::<DataRecord>(0) else {
        bump(counter::RINGBUF_FULL);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    // How much payload to copy: what moved, within the first buffer, within this record, within
    // the message's budget.
    let mut n = ret as u64;
    if n > inflight.buf_len {
        n = inflight.buf_len;
    }
    let budget = MESSAGE_CAPTURE_BUDGET.saturating_sub(state.message_captured) as u64;
    if n > budget {
        n = budget;
    }
    if n > MAX_CAPTURE as u64 {
        n = MAX_CAPTURE as u64;
    }
    unsafe {
        (*rec).header = header(
            kind::DATA,
            pid_tgid,
            inflight.fd,
            state,
            inflight.ts_enter,
            ts_exit,
        );
        (*rec).direction = inflight.direction;
        (*rec).syscall = inflight.syscall;
        (*rec).len = ret as u64;
        (*rec).message_seq = state.message_seq;
        let mut captured = 0u32;
        if n > 0 && inflight.buf != 0 {
            // The mask restates the bound for the verifier (n <= MAX_CAPTURE already).
            let len = (n as u32) & (2 * MAX_CAPTURE as u32 - 1);
            let len = if len > MAX_CAPTURE as u32 {
                MAX_CAPTURE as u32
            } else {
                len
            };
            if read_user_raw(
                (*rec).data.as_mut_ptr().cast(),
                len,
                inflight.buf as *const _,
            ) == 0
            {
                captured = len;
            } else {
                bump(counter::PAYLOAD_READ_FAILED);
            }
        }
        (*rec).captured = captured;
        state.message_captured += captured;
    }
    let flags = wake_flags(core::mem::size_of::<DataRecord>() as u64);
    entry.submit(flags);
    bump(counter::RECORDS_SENT);
    0
}

macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $sc:expr, $dir:expr, $buf:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            on_enter(&ctx, $sc, $dir, $buf)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_exit(&ctx)
        }
    };
}

data_syscall!(
    sys_enter_read,
    sys_exit_read,
    syscall::READ,
    direction::INGRESS,
    Buffer::Plain
);
data_syscall!(
    sys_enter_write,
    sys_exit_write,
    syscall::WRITE,
    direction::EGRESS,
    Buffer::Plain
);
data_syscall!(
    sys_enter_readv,
    sys_exit_readv,
    syscall::READV,
    direction::INGRESS,
    Buffer::Iovec
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
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    syscall::RECVMSG,
    direction::INGRESS,
    Buffer::Msghdr
);
data_syscall!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    syscall::SENDMSG,
    direction::EGRESS,
    Buffer::Msghdr
);

/// recvfrom is `data_syscall!` but for MSG_PEEK, which reads without consuming: the same bytes
/// would be seen twice.
#[tracepoint]
pub fn sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 3) & MSG_PEEK != 0 {
        return 0;
    }
    on_enter(&ctx, syscall::RECVFROM, direction::INGRESS, Buffer::Plain)
}
#[tracepoint]
pub fn sys_exit_recvfrom(ctx: TracePointContext) -> u32 {
    on_exit(&ctx)
}

/// sendfile(out_fd, in_fd, ...): the socket is the first argument, the payload is a file the
/// probes do not read. Counted so response lengths and end times stay right.
#[tracepoint]
pub fn sys_enter_sendfile64(ctx: TracePointContext) -> u32 {
    on_enter(&ctx, syscall::SENDFILE, direction::EGRESS, Buffer::None)
}
#[tracepoint]
pub fn sys_exit_sendfile64(ctx: TracePointContext) -> u32 {
    on_exit(&ctx)
}

/// Remembers the fd of a connect() so the exit probe can start tracking it as a client.
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return 0;
    }
    let inflight = Inflight {
        ts_enter: 0,
        buf: 0,
        buf_len: 0,
        fd: arg(&ctx, 0) as u32,
        syscall: 0,
        direction: 0,
        role: role_hint::CONNECTED,
    };
    if INFLIGHT.insert(pid_tgid, inflight, 0).is_err() {
        bump(counter::INFLIGHT_FULL);
    }
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inflight) = (unsafe { INFLIGHT.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = INFLIGHT.remove(pid_tgid);
    let ret = unsafe { ctx_u64(&ctx, RET) } as i64;
    if ret == 0 || ret == -EINPROGRESS {
        // A new connection on this fd: forget whatever the fd was before.
        track((pid_tgid >> 32) as u32, inflight.fd, role_hint::CONNECTED);
    }
    0
}

#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == agent_tgid() {
        return 0;
    }
    let ret = unsafe { ctx_u64(ctx, RET) } as i64;
    if ret >= 0 {
        track(tgid, ret as u32, role_hint::ACCEPTED);
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

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let fd = arg(&ctx, 0) as u32;
    let key = conn_key(tgid, fd);
    let Some(state) = (unsafe { CONNS.get(key) }).copied() else {
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
                (*entry.as_mut_ptr()).header = header(kind::CLOSE, pid_tgid, fd, &state, now, now);
            }
            let flags = wake_flags(core::mem::size_of::<CloseRecord>() as u64);
            entry.submit(flags);
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
