//! TLS plaintext from OpenSSL (uprobes on `libssl`): what `SSL_write` is given and what
//! `SSL_read` returns, as data records of the connection the library reads and writes.
//!
//! The library's `SSL *` is tied to its socket by the syscalls it makes: an entry probe marks
//! the thread as inside an `SSL_*` call (a per-CPU slot, like `ENTRY_TIMES`), and a data
//! syscall's exit on that thread records `(process, SSL *) -> fd` in `TLS_SOCKETS`. The return
//! probe then sends the plaintext as a record of that connection, flagged `data_flags::TLS`,
//! with its own message counters (the ciphertext's are the syscalls'). A `SSL_read` served from
//! the library's buffer makes no syscall: the socket is known from earlier calls.
//!
//! Both ends of a connection see the same plaintext bytes in the same order, so the count of
//! them since the connection began (`tls_offset`, only for connections tracked from connect or
//! accept) joins a client's request to the server's as the TCP sequence number does for
//! plaintext traffic.
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_ktime_get_ns, bpf_probe_read_user as read_user_raw},
    },
    macros::{map, uprobe, uretprobe},
    maps::{LruHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    conn_key, counter, data_flags, direction, kind, syscall, MAX_CAPTURE, MESSAGE_CAPTURE_BUDGET,
};

use crate::{capture::*, conns::*, maps::*};

/// Non-zero once the agent attached the uprobes: the syscall probes then look for the thread's
/// `SSL_*` call (one per-CPU read).
#[no_mangle]
pub(crate) static TLS: u32 = 0;

#[inline(always)]
pub(crate) fn tls_enabled() -> bool {
    unsafe { core::ptr::read_volatile(&TLS) != 0 }
}

/// An `SSL_*` call in progress on a thread, from its entry to its return.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct TlsCall {
    ssl: u64,
    buf: u64,
    /// `SSL_read_ex`/`SSL_write_ex`: where the library writes the byte count (0 otherwise).
    count_at: u64,
    ts: u64,
    dir: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct InSsl {
    pid_tgid: u64,
    ssl: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SslKey {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

#[map]
static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// The thread inside an `SSL_*` call on this CPU, for the syscall probes.
#[map]
static IN_SSL: PerCpuArray<InSsl> = PerCpuArray::with_max_entries(1, 0);

/// Where a plaintext record is built: its own slot, not the syscall probes' `SCRATCH`, since a
/// uprobe program may be preempted (it runs with migration, not preemption, disabled) by a
/// task whose syscall probe would use that one.
#[map]
static TLS_SCRATCH: PerCpuArray<DataWithPayload> = PerCpuArray::with_max_entries(1, 0);

/// Which socket each `SSL *` reads and writes, per process.
#[map]
static TLS_SOCKETS: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn on_entry(ctx: &ProbeContext, dir: u32, ex: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return 0;
    }
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let count_at = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    let call = TlsCall {
        ssl,
        buf,
        count_at,
        ts: unsafe { bpf_ktime_get_ns() },
        dir,
        _pad: 0,
    };
    let _ = TLS_CALLS.insert(pid_tgid, call, 0);
    if let Some(slot) = IN_SSL.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; uprobes and syscall tracepoints do not nest on a CPU.
        unsafe { *slot = InSsl { pid_tgid, ssl } };
    }
    0
}

/// A data syscall of thread `pid_tgid` on `fd` exited: if the thread is inside an `SSL_*` call
/// (on this CPU), that `SSL *` uses `fd`.
#[inline(always)]
pub(crate) fn note_ssl_socket(pid_tgid: u64, fd: u32) {
    let Some(slot) = IN_SSL.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU slot.
    let InSsl { pid_tgid: p, ssl } = unsafe { *slot };
    if p != pid_tgid || ssl == 0 {
        return;
    }
    let key = SslKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        ssl,
    };
    let _ = TLS_SOCKETS.insert(key, fd, 0);
}

#[inline(always)]
fn on_return(ret: i64, sc: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(slot) = IN_SSL.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe {
            if (*slot).pid_tgid == pid_tgid {
                (*slot).pid_tgid = 0;
            }
        }
    }
    let Some(call) = (unsafe { TLS_CALLS.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = TLS_CALLS.remove(pid_tgid);
    // SSL_read/SSL_write return the bytes moved (<= 0: none); the _ex forms 1 on success, the
    // count in *count_at.
    let n: u64 = if call.count_at != 0 {
        if ret != 1 {
            return 0;
        }
        unsafe { bpf_probe_read_user(call.count_at as *const u64) }.unwrap_or(0)
    } else if ret > 0 {
        ret as u64
    } else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let key = SslKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    let Some(fd) = (unsafe { TLS_SOCKETS.get(key) }).copied() else {
        bump(counter::TLS_SOCKET_UNKNOWN);
        return 0;
    };
    let state = match CONNS.get_ptr_mut(conn_key(tgid, fd)) {
        Some(s) => s,
        None => match track(pid_tgid, fd) {
            Some(s) => s,
            None => return 0,
        },
    };
    // SAFETY: a map value pointer, valid for this run.
    let state = unsafe { &mut *state };
    if state.tls_muted != 0 {
        return 0;
    }
    announce(state, pid_tgid, fd);
    let dir = call.dir;
    let mut flags = data_flags::TLS;
    let mut seq = 0u32;
    if state.tls_direction != dir {
        state.tls_direction = dir;
        state.tls_message_seq = state.tls_message_seq.wrapping_add(1);
        state.tls_message_captured = 0;
        if state.from_start != 0 {
            flags |= data_flags::TCP_SEQ;
        }
    }
    let slot = usize::from(dir == direction::EGRESS);
    seq = seq.wrapping_add(state.tls_offset[slot]);
    state.tls_offset[slot] = state.tls_offset[slot].wrapping_add(n as u32);

    let Some(rec) = TLS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let budget = MESSAGE_CAPTURE_BUDGET.saturating_sub(state.tls_message_captured) as u64;
    let mut take = n;
    if take > budget {
        take = budget;
    }
    if take > MAX_CAPTURE as u64 {
        take = MAX_CAPTURE as u64;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // A write starts when it is issued; what is read exists once the call returns.
    let ts_enter = if dir == direction::EGRESS {
        call.ts
    } else {
        now
    };
    unsafe {
        (*rec).record.header = header(kind::DATA, pid_tgid, fd, state.conn_id, ts_enter, now);
        (*rec).record.tcp_seq = seq;
        (*rec).record.flags = flags;
        (*rec).record.direction = dir;
        (*rec).record.syscall = sc;
        (*rec).record.len = n;
        (*rec).record.message_seq = state.tls_message_seq;
        let mut captured = 0u32;
        if take > 0 && call.buf != 0 {
            let len = (take as u32) & (2 * MAX_CAPTURE as u32 - 1);
            let len = if len > MAX_CAPTURE as u32 {
                MAX_CAPTURE as u32
            } else {
                len
            };
            if read_user_raw((*rec).data.as_mut_ptr().cast(), len, call.buf as *const _) == 0 {
                captured = len;
            } else {
                bump(counter::PAYLOAD_READ_FAILED);
            }
        }
        (*rec).record.captured = captured;
        let captured = captured & (2 * MAX_CAPTURE as u32 - 1);
        let captured = if captured > MAX_CAPTURE as u32 {
            MAX_CAPTURE as u32
        } else {
            captured
        };
        let size = core::mem::size_of::<tracer_common::DataRecord>() + captured as usize;
        let bytes = core::slice::from_raw_parts(rec.cast::<u8>(), size);
        if EVENTS
            .output::<[u8]>(bytes, wake_flags(size as u64))
            .is_err()
        {
            bump(counter::RINGBUF_FULL);
            return 0;
        }
        state.tls_message_captured += captured;
    }
    bump(counter::TLS_RECORDS);
    bump(counter::RECORDS_SENT);
    0
}

/// `SSL_do_handshake`, `SSL_accept`, `SSL_connect`: the handshake's own syscalls name the
/// socket too. Without them, a first `SSL_read` served from what the handshake read ahead
/// (an HTTP/2 preface sent with the client's Finished) made no syscall, and its plaintext was
/// dropped for want of a socket.
#[uprobe]
pub fn ssl_handshake(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(ssl) = ctx.arg::<u64>(0) else {
        return 0;
    };
    if let Some(slot) = IN_SSL.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *slot = InSsl { pid_tgid, ssl } };
    }
    0
}

/// The handshake returned: the thread's later syscalls are not the library's.
#[uretprobe]
pub fn ssl_handshake_ret(_ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(slot) = IN_SSL.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe {
            if (*slot).pid_tgid == pid_tgid {
                (*slot).pid_tgid = 0;
            }
        }
    }
    0
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, direction::EGRESS, false)
}
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, direction::EGRESS, true)
}
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, direction::INGRESS, false)
}
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, direction::INGRESS, true)
}
#[uretprobe]
pub fn ssl_write_ret(ctx: RetProbeContext) -> u32 {
    on_return(ctx.ret::<i32>() as i64, syscall::SSL_WRITE)
}
#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    on_return(ctx.ret::<i32>() as i64, syscall::SSL_READ)
}
