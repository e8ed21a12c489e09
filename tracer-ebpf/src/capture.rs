//! Capture: a data syscall's record (what moved, a bounded prefix of it, kernel timestamps,
//! the TCP sequence number at each message start) built in a per-CPU slot and copied into the
//! ring at its real size.
use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_ktime_get_ns, bpf_probe_read_user as read_user_raw},
    },
    programs::TracePointContext,
};
use tracer_common::{
    conn_key, counter, data_flags, direction, kind, syscall, DataRecord, InjectedRecord,
    RecordHeader, MAX_CAPTURE, MESSAGE_CAPTURE_BUDGET, TRACEPARENT_LINE_LEN,
    WAKEUP_THRESHOLD_BYTES,
};

use crate::{
    conns::*,
    inject::{adopt_incoming, forget_pending, pending, serving_begins, serving_ends},
    kernel::*,
    maps::*,
};

/// Where the payload of a data syscall lives in user memory.
#[derive(Clone, Copy)]
pub(crate) enum Buffer {
    /// `buf, len` arguments (read, write, recvfrom, sendto).
    Plain,
    /// `iov, iovcnt` arguments (readv, writev): the first iovec is captured.
    Iovec,
    /// a `struct user_msghdr *` (recvmsg, sendmsg): its first iovec is captured.
    Msghdr,
    /// no user buffer (sendfile): only the length is recorded.
    None,
    /// message `n` of a `struct mmsghdr *` array (sendmmsg, recvmmsg): its first iovec is
    /// captured.
    Mmsg(u64),
}

#[inline(always)]
pub(crate) fn first_iovec(iov: u64) -> (u64, u64) {
    // struct iovec { void *iov_base; size_t iov_len; }
    let v: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.unwrap_or([0, 0]);
    (v[0], v[1])
}

/// The user buffer of a data syscall and its size, from the syscall's arguments. Read at exit:
/// the kernel writes back into a `msghdr` only its lengths and flags, never `msg_iov`.
#[inline(always)]
pub(crate) fn buffer_of(regs: SyscallRegs, buffer: Buffer) -> (u64, u64) {
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
pub(crate) fn entry_time(pid_tgid: u64) -> Option<u64> {
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
pub(crate) fn header(
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
pub(crate) fn wake_flags(size: u64) -> u64 {
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
pub(crate) fn on_data(
    pid_tgid: u64,
    regs: SyscallRegs,
    ret: i64,
    (sc, dir, buffer): (u32, u32, Buffer),
    ts_enter: Option<u64>,
    injected: bool,
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
            match track(pid_tgid, fd, false, false) {
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
    // With --inject-context: which requests each thread is serving (see inject.rs).
    let mut serving = None;
    let message_start = state.direction != dir;
    if message_start && state.accepted != 0 && inject_enabled() {
        if dir == direction::INGRESS {
            serving = serving_begins(state, pid_tgid as u32);
        } else {
            serving_ends(state);
        }
    }
    // Bytes the injector inserted ahead of this syscall's own: the stream, and its sequence
    // numbers, are that much further on.
    let mut inserted = 0;
    if injected {
        if let Some(p) = pending(pid_tgid as u32) {
            // SAFETY: a map value pointer, valid for this run.
            if unsafe { (*p).injected } != 0 {
                report_injection(pid_tgid, fd, state.conn_id, ts_exit, p);
                inserted = TRACEPARENT_LINE_LEN as u32;
            }
        }
    }
    if message_start {
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
                tcp_seq = after.wrapping_sub(ret as u32).wrapping_sub(inserted);
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
        if let Some(t) = serving {
            adopt_incoming(t, state, &(*rec).data, captured);
        }
    }
    bump(counter::RECORDS_SENT);
    0
}

/// Tells the agent the request this syscall wrote carries an inserted `traceparent` (see
/// inject.rs); the data record follows.
#[inline(always)]
fn report_injection(pid_tgid: u64, fd: u32, conn_id: u64, ts: u64, p: *const Pending) {
    match EVENTS.reserve::<InjectedRecord>(0) {
        Some(mut entry) => {
            let rec = entry.as_mut_ptr();
            // SAFETY: a reserved record of the right size, filled field by field (the probes'
            // stack has no room for a copy); `p` is a map value pointer.
            unsafe {
                (*rec).header = header(kind::INJECTED, pid_tgid, fd, conn_id, ts, ts);
                (*rec).trace_id_hex = (*p).trace_hex;
                (*rec).span_id_hex = (*p).span_hex;
                (*rec).offset = (*p).offset;
                (*rec).inserted = TRACEPARENT_LINE_LEN as u32;
                (*rec).flags = (*p).flags;
                (*rec)._pad = 0;
            }
            entry.submit(wake_flags(core::mem::size_of::<InjectedRecord>() as u64));
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
}

/// Stamps the entry time of a write-type syscall for its exit (see `entry_time`). Every call is
/// stamped, writes to files included: skipping those took a connection lookup, which cost more
/// than the clock read (~100 ns against ~60 ns, measured here).
#[inline(always)]
pub(crate) fn stamp_entry() -> u32 {
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
pub(crate) fn on_exit(ctx: &TracePointContext, sc: u32, dir: u32, buffer: Buffer) -> u32 {
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
    // What the injector did during this call is reported with its record, then forgotten
    // whatever the call turns out to be, like the entry time.
    let injected =
        dir == direction::EGRESS && inject_enabled() && pending(pid_tgid as u32).is_some();
    let regs = SyscallRegs::of(task);
    // Inside the TLS library: this is the socket its `SSL *` uses (even a read that found no
    // data says so).
    if crate::tls::tls_enabled() {
        crate::tls::note_ssl_socket(pid_tgid, regs.arg(0) as u32);
    }
    if ret <= 0 {
        if injected {
            forget_pending(pid_tgid as u32);
        }
        return 0;
    }
    // MSG_PEEK reads without consuming: the same bytes would be seen twice.
    if sc == syscall::RECVFROM && regs.arg(3) & MSG_PEEK != 0 {
        return 0;
    }
    let r = on_data(pid_tgid, regs, ret, (sc, dir, buffer), ts_enter, injected);
    if injected {
        forget_pending(pid_tgid as u32);
    }
    r
}
