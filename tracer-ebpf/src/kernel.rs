//! Reading the kernel: a syscall's arguments from the saved registers, the calling task, and
//! `task -> files -> fdtable -> file -> socket -> sock` to a socket's endpoints, at offsets the
//! agent read from BTF.
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_comm as current_comm_raw, bpf_get_current_task_btf,
            bpf_probe_read_kernel_str, bpf_task_pt_regs,
        },
    },
    programs::TracePointContext,
    EbpfContext as _,
};
use tracer_common::{ConnTuple, EXE_NAME_LEN, SOCKET_HEAD, SOCK_HEAD};

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
            let pid: u32 = field(
                self.0,
                core::ptr::read_volatile(&raw const OFFSETS.task_pid),
            );
            let tgid: u32 = field(
                self.0,
                core::ptr::read_volatile(&raw const OFFSETS.task_tgid),
            );
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

/// A field of a kernel structure reached through a BTF pointer (`bpf_get_current_task_btf`
/// and the pointers read from it): one plain load the verifier checks against the kernel's type
/// (the offset is a constant of the frozen read-only data) and the JIT guards against faults.
/// A pointer field read this way is a BTF pointer too, so `task -> files -> fdtable` and
/// `task -> group_leader` are walked without a helper call.
#[inline(always)]
unsafe fn field<T>(base: *const u8, off: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(off as usize).cast::<T>()) }
}

/// The `T` at `off` inside `b`. The agent refuses a kernel whose fields are not where these
/// reads expect them (`btf::kernel_offsets`); the check here is for the verifier.
#[inline(always)]
fn within<T: Copy, const N: usize>(b: &[u8; N], off: u32) -> Option<T> {
    let off = off as usize;
    if off + core::mem::size_of::<T>() > N {
        return None;
    }
    // SAFETY: in bounds, checked above; any bytes are a valid integer.
    Some(unsafe { core::ptr::read_unaligned(b.as_ptr().add(off).cast::<T>()) })
}

/// `struct socket`'s `type` and `sk`: one read of its first `SOCKET_HEAD` bytes.
#[inline(always)]
unsafe fn socket_type_and_sk(socket: u64) -> Option<(u16, u64)> {
    let o = offsets();
    // One helper read for both fields (`read_at` of the whole head).
    let b: [u8; SOCKET_HEAD] = unsafe { read_at(socket, 0)? };
    Some((within(&b, o.socket_type)?, within(&b, o.socket_sk)?))
}

/// The start of `sock_common`: IPv4 addresses, ports and family, `SOCK_HEAD` bytes from
/// `skc_daddr` (one read instead of five).
#[inline(always)]
unsafe fn sock_head(sk: u64) -> Option<ConnTuple> {
    let o = offsets();
    let rel = |f: u32| f.wrapping_sub(o.sock_daddr);
    let b: [u8; SOCK_HEAD] = unsafe { read_at(sk, o.sock_daddr)? };
    let mut t = ConnTuple {
        family: within(&b, rel(o.sock_family))?,
        local_port: within(&b, rel(o.sock_num))?,
        remote_port: u16::from_be(within(&b, rel(o.sock_dport))?),
        ..ConnTuple::default()
    };
    let l: [u8; 4] = within(&b, rel(o.sock_rcv_saddr))?;
    let r: [u8; 4] = within(&b, 0)?;
    t.local_addr[..4].copy_from_slice(&l);
    t.remote_addr[..4].copy_from_slice(&r);
    Some(t)
}

/// Follows `current->files->fdt->fd[fd]` to the socket and, if it is a TCP socket (an inet
/// stream socket), returns its endpoints. `None`: not open, or not readable; decide again next
/// time. The walk to the fd array is plain loads through BTF pointers; from there, six helper
/// reads (the fd array's slot, the file's inode and private data, the inode's mode, the
/// socket's head, the sock's head) where one a field took seventeen: ~300 ns less a new
/// connection, docs/PERFORMANCE.md ("What a new connection costs the probes").
#[inline(always)]
pub(crate) fn fd_kind(fd: u32) -> Option<FdKind> {
    let o = offsets();
    if o.valid == 0 {
        return None;
    }
    unsafe {
        let task = Task::current().0;
        let files: *const u8 = field(task, o.task_files);
        if files.is_null() {
            return None;
        }
        let fdt: *const u8 = field(files, o.files_fdt);
        if fdt.is_null() {
            return None;
        }
        let max_fds: u32 = field(fdt, o.fdtable_max_fds);
        if fd >= max_fds {
            return None;
        }
        let fd_array: u64 = field(fdt, o.fdtable_fd);
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
        let (sock_type, sk) = socket_type_and_sk(socket)?;
        if sock_type != SOCK_STREAM && sock_type != SOCK_DGRAM {
            return Some(FdKind::NotTcp);
        }
        if sk == 0 {
            return None;
        }
        let mut t = sock_head(sk)?;
        if t.family == AF_INET6 {
            t.local_addr = read_at(sk, o.sock_v6_rcv_saddr)?;
            t.remote_addr = read_at(sk, o.sock_v6_daddr)?;
        } else if t.family != AF_INET {
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
/// service of a process that exits before the agent reads /proc. Plain loads through BTF
/// pointers; the calling thread's own name if the leader cannot be read.
#[inline(always)]
pub(crate) fn current_comm() -> [u8; 16] {
    let o = offsets();
    // SAFETY: loads at offsets from BTF through BTF pointers.
    unsafe {
        let leader: *const u8 = field(Task::current().0, o.task_group_leader);
        if !leader.is_null() {
            let comm: [u64; 2] = [field(leader, o.task_comm), field(leader, o.task_comm + 8)];
            return core::mem::transmute::<[u64; 2], [u8; 16]>(comm);
        }
    }
    thread_comm()
}

/// Writes the file name of the calling process's executable into `out` (`EXE_NAME_LEN` bytes,
/// NUL-terminated; zeroed if unreadable): `task->mm->exe_file->f_path.dentry->d_name.name`,
/// four plain loads through BTF pointers (a faulting one reads 0) and one string read. Once per
/// new connection, so that an exited process is named as /proc would have named it.
///
/// # Safety
/// `out` must point to `EXE_NAME_LEN` writable bytes.
#[inline(always)]
pub(crate) unsafe fn exe_name_into(out: *mut u8) {
    // SAFETY: offsets from BTF (read one field at a time: a copy of the whole table would go
    // on the stack), loads through BTF pointers; the helper writes at most `EXE_NAME_LEN` bytes.
    unsafe {
        let off = |f: *const u32| core::ptr::read_volatile(f);
        let mm: *const u8 = field(Task::current().0, off(&raw const OFFSETS.task_mm));
        let file: *const u8 = field(mm, off(&raw const OFFSETS.mm_exe_file));
        let dentry: *const u8 = field(file, off(&raw const OFFSETS.file_dentry));
        let name: *const u8 = field(dentry, off(&raw const OFFSETS.dentry_name));
        bpf_probe_read_kernel_str(out.cast(), EXE_NAME_LEN as u32, name.cast());
    }
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
