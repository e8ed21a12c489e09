//! Kernel probes.
//!
//! Syscall tracepoints only (no kprobes, no fentry: many production kernels lack them), one per
//! syscall so the kernel itself skips every syscall we do not follow. The exit probe of a data
//! syscall does the work: the syscall's arguments are still in the thread's saved user registers
//! (`bpf_task_pt_regs`), so nothing has to be carried from entry to exit; for a TCP socket it
//! copies a bounded prefix of what was actually moved into one ring-buffer record stamped with
//! kernel timestamps. Entry probes exist only for writes, to stamp when a request starts, in a
//! per-CPU slot (and, with `--sample-in-kernel`'s carrier, to decide a call before its first
//! segment leaves: red.rs, `decide_ahead`). The agent reassembles messages and pairs requests
//! with responses.
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
// `atomic_xadd`: the eBPF target has no atomic types with read-modify-write operations (red.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod capture;
mod carry;
mod conns;
mod flow;
mod inject;
mod kernel;
mod maps;
mod red;
mod tls;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{direction, syscall};

use crate::{capture::*, conns::*, kernel::*};

macro_rules! data_syscall {
    ($exit:ident, $sc:expr, $dir:expr, $buf:expr) => {
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_exit(&ctx, $sc, $dir, $buf)
        }
    };
    ($enter:ident, $exit:ident, $sc:expr, $dir:expr, $buf:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            // Stamped first: the request starts when the write is issued.
            let r = stamp_entry();
            if !matches!($buf, Buffer::None) {
                crate::red::decide_ahead(&ctx, $buf);
            }
            r
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
    on_mmsg_exit(&ctx, syscall::SENDMMSG, direction::EGRESS)
}

/// recvmmsg(fd, msgvec, vlen, flags, timeout) received `ret` datagrams: the first two become
/// records, as for sendmmsg.
#[tracepoint]
pub fn sys_exit_recvmmsg(ctx: TracePointContext) -> u32 {
    on_mmsg_exit(&ctx, syscall::RECVMMSG, direction::INGRESS)
}

#[inline(always)]
fn on_mmsg_exit(ctx: &TracePointContext, sc: u32, dir: u32) -> u32 {
    let ret = ctx_u64(ctx, RET) as i64;
    let Some((task, pid_tgid)) = caller() else {
        return 0;
    };
    let ts_enter = if dir == direction::EGRESS {
        entry_time(pid_tgid)
    } else {
        None
    };
    if ret <= 0 {
        return 0;
    }
    let regs = SyscallRegs::of(task);
    for n in 0..2u64 {
        if n as i64 >= ret {
            break;
        }
        // Each message's `msg_len`: what the kernel moved for it.
        let at = regs.arg(1) + n * MMSGHDR_SIZE + MMSGHDR_LEN;
        let len: u32 = unsafe { bpf_probe_read_user(at as *const u32) }.unwrap_or(0);
        if len > 0 {
            on_data(
                pid_tgid,
                regs,
                i64::from(len),
                (sc, dir, Buffer::Mmsg(n)),
                ts_enter,
                false,
                n == 0,
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
        start_tracking(pid_tgid, fd, false, true);
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
        start_tracking(pid_tgid, ret as u32, true, true);
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
