//! Reading the kernel: a syscall's arguments from the saved registers, the calling task, and
//! `task -> files -> fdtable -> file -> socket -> sock` to a socket's endpoints, at offsets the
//! agent read from BTF.
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_comm as current_comm_raw, bpf_get_current_task,
            bpf_get_current_task_btf, bpf_task_pt_regs,
        },
    },
    programs::TracePointContext,
    EbpfContext as _,
};
use tracer_common::ConnTuple;

use crate::maps::*;

/// The calling thread's saved user registers (`struct pt_regs`), where a syscall's arguments
/// are. `bpf_task_pt_regs` returns a BTF pointer, so each register is one plain load the
/// verifier checks against the kernel's BTF (and the JIT guards against faults): no helper call.
/// Copying the registers with `bpf_probe_read_kernel` instead cost ~100 ns a syscall here, three
/// nested kernel calls each paying for the return-stack mitigations of this CPU.
#[derive(Clone, Copy)]
pub(crate) struct SyscallRegs(*const u8);

/// Where syscall arguments 1-4 (di, si, dx, r10) are in `struct pt_regs` (x86-64 UAPI,
/// arch/x86/include/uapi/asm/ptrace.h).
pub(crate) const PT_REGS_ARGS: [usize; 4] = [112, 104, 96, 56];

impl SyscallRegs {
    #[inline(always)]
    pub(crate) fn of(task: Task) -> Self {
        // SAFETY: bpf_task_pt_regs takes the BTF task pointer bpf_get_current_task_btf returns.
        SyscallRegs(unsafe { bpf_task_pt_regs(task.0 as *mut _) } as *const u8)
    }

    /// Syscall argument `n` (0-based, a constant at every call site).
    #[inline(always)]
    pub(crate) fn arg(self, n: usize) -> u64 {
        // SAFETY: a BTF pointer to pt_regs; the verifier checks the offset against its type.
        unsafe { core::ptr::read_volatile(self.0.add(PT_REGS_ARGS[n]).cast::<u64>()) }
    }
}

pub(crate) const S_IFMT: u16 = 0o170000;
pub(crate) const S_IFSOCK: u16 = 0o140000;
pub(crate) const SOCK_STREAM: u16 = 1;
pub(crate) const SOCK_DGRAM: u16 = 2;
/// UDP is followed only to or from this port: DNS. Stub resolvers (glibc, dig) connect their
/// sockets to the server; servers answer on an unconnected socket bound to it. Other UDP
/// (QUIC, metrics) is not read.
pub(crate) const DNS_PORT: u16 = 53;
/// `sizeof(struct mmsghdr)` on x86-64 (a `user_msghdr`, then `msg_len`, padded), and where its
/// `msg_len` is.
pub(crate) const MMSGHDR_SIZE: u64 = 64;
pub(crate) const MMSGHDR_LEN: u64 = 56;
pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;
pub(crate) const MSG_PEEK: u64 = 2;
pub(crate) const EINPROGRESS: i64 = 115;

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record, and of `ret` in
/// `sys_exit_*` (see /sys/kernel/tracing/events/syscalls/*/format).
pub(crate) const ARG0: usize = 16;
pub(crate) const RET: usize = 16;

/// A direct load from the tracepoint record: the verifier allows aligned reads of the context,
/// and a load is cheaper than a helper call.
#[inline(always)]
pub(crate) fn ctx_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: syscall tracepoint records have `ret` / six argument slots at these offsets.
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<u64>() }
}

/// The calling thread's `task_struct`, as the BTF pointer `bpf_get_current_task_btf` returns:
/// its fields are plain loads at offsets from BTF, which the verifier sees as constants (they
/// are in the frozen read-only data) and checks against the kernel's type.
#[derive(Clone, Copy)]
pub(crate) struct Task(*const u8);

impl Task {
    #[inline(always)]
    pub(crate) fn current() -> Self {
        // SAFETY: no preconditions.
        Task(unsafe { bpf_get_current_task_btf() } as *const u8)
    }

    /// `pid_tgid` as `bpf_get_current_pid_tgid` would return it, without the call.
    #[inline(always)]
    pub(crate) fn pid_tgid(self) -> u64 {
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
pub(crate) fn caller() -> Option<(Task, u64)> {
    // SAFETY: read_volatile as in `offsets`.
    if unsafe { core::ptr::read_volatile(&raw const OFFSETS.valid) } == 0 {
        return None;
    }
    let task = Task::current();
    let pid_tgid = task.pid_tgid();
    ((pid_tgid >> 32) as u32 != agent_tgid()).then_some((task, pid_tgid))
}

#[inline(always)]
pub(crate) unsafe fn read_at<T>(base: u64, off: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

/// A TCP socket as the probes first see it.
pub(crate) struct TcpSocket {
    pub(crate) tuple: ConnTuple,
    /// The kernel's `struct sock *`.
    pub(crate) sk: u64,
    /// A UDP socket connected to a DNS server.
    pub(crate) datagram: bool,
}

/// What an fd is, as far as the probes care.
pub(crate) enum FdKind {
    Tcp(TcpSocket),
    /// Open, and certainly not a TCP socket.
    NotTcp,
}

/// Follows `current->files->fdt->fd[fd]` to the socket and, if it is a TCP socket (an inet
/// stream socket), returns its endpoints. `None`: not open, or not readable; decide again next
/// time.
#[inline(always)]
pub(crate) fn fd_kind(fd: u32) -> Option<FdKind> {
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
        // A DNS client's socket, connected to the server, or a DNS server's (unconnected: each
        // datagram has its own peer).
        if datagram && t.remote_port != DNS_PORT && t.local_port != DNS_PORT {
            return Some(FdKind::NotTcp);
        }
        Some(FdKind::Tcp(TcpSocket {
            tuple: t,
            sk,
            datagram,
        }))
    }
}

/// The calling process's command name: its main thread's (`current->group_leader->comm`), so a
/// runtime's worker thread (grpcio's `event_engine`, dig's `isc-net-0000`) does not name the
/// service of a process that exits before the agent reads /proc. The calling thread's own name
/// if that cannot be read.
#[inline(always)]
pub(crate) fn current_comm() -> [u8; 16] {
    let o = offsets();
    // SAFETY: bounded kernel reads at offsets from BTF.
    unsafe {
        let task = bpf_get_current_task();
        if let Some(leader) = read_at::<u64>(task, o.task_group_leader) {
            if leader != 0 {
                if let Some(comm) = read_at::<[u64; 2]>(leader, o.task_comm) {
                    return core::mem::transmute::<[u64; 2], [u8; 16]>(comm);
                }
            }
        }
    }
    thread_comm()
}

/// The calling thread's command name, read into 8-byte-aligned storage. aya's
/// `bpf_get_current_comm()` zeroes a byte array with a call to `memset`, a BPF-to-BPF call whose
/// frame Linux 6.1's verifier adds, rounded up to 32 bytes, to the caller's 488: "combined stack
/// size of 2 calls is 544. Too large", and no probe loaded on Debian 12's kernel (`cargo xtask
/// kernels`). Zeroing two u64s is two stores.
#[inline(always)]
fn thread_comm() -> [u8; 16] {
    let mut comm = [0u64; 2];
    // SAFETY: the helper writes at most the 16 bytes it is given.
    unsafe { current_comm_raw(comm.as_mut_ptr().cast(), 16) };
    // SAFETY: same size, and any 16 bytes are a valid [u8; 16].
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(comm) }
}

/// The network namespace (inode number) of a socket: `sk->__sk_common.skc_net.net->ns.inum`.
/// Read only when the agent filters by namespace (two kernel reads per new connection).
#[inline(always)]
pub(crate) fn netns_of(sk: u64) -> u32 {
    let o = offsets();
    // SAFETY: bounded kernel reads at offsets from BTF; a failed read gives 0 (no namespace).
    unsafe {
        match read_at::<u64>(sk, o.sock_net) {
            Some(net) if net != 0 => read_at(net, o.net_ns_inum).unwrap_or(0),
            _ => 0,
        }
    }
}
