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
    conn_key, counter, data_flags, direction, kind, red, syscall, DataRecord, InjectedRecord,
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

/// Iovecs of a vectored syscall whose bytes are captured, in order (a writev of an HTTP/2
/// server's frames, DNS over TCP's length and message): more than the first, and the agent
/// sees a stream with holes where frame headers were.
pub(crate) const IOVECS_CAPTURED: u64 = 32;

#[inline(always)]
pub(crate) fn iovec(iov: u64, k: u64) -> (u64, u64) {
    // struct iovec { void *iov_base; size_t iov_len; }
    let v: [u64; 2] =
        unsafe { bpf_probe_read_user((iov + 16 * k) as *const [u64; 2]) }.unwrap_or([0, 0]);
    (v[0], v[1])
}

/// Where a data syscall's bytes are in user memory.
#[derive(Clone, Copy)]
pub(crate) enum Source {
    /// One buffer and its size.
    Flat(u64, u64),
    /// An array of iovecs and how many.
    Vector(u64, u64),
}

/// The user buffers of a data syscall, from its arguments (`arg(n)`: the saved registers at
/// exit, the tracepoint record at entry). Read at exit: the kernel writes back into a
/// `msghdr` only its lengths and flags, never `msg_iov`.
#[inline(always)]
pub(crate) fn buffer_of(arg: impl Fn(usize) -> u64, buffer: Buffer) -> Source {
    // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov;
    //                      size_t msg_iovlen; ... }
    let msghdr = |at: u64| {
        let v: [u64; 2] =
            unsafe { bpf_probe_read_user((at + 16) as *const [u64; 2]) }.unwrap_or([0, 0]);
        Source::Vector(v[0], v[1])
    };
    match buffer {
        Buffer::Plain => Source::Flat(arg(1), arg(2)),
        Buffer::Iovec => Source::Vector(arg(1), arg(2)),
        Buffer::Msghdr => msghdr(arg(1)),
        // A datagram of a stub resolver's batch: one buffer (and each buffer copied costs the
        // verifier a walk of everything after, twice in these programs).
        Buffer::Mmsg(n) => match msghdr(arg(1) + n * MMSGHDR_SIZE) {
            Source::Vector(iov, count) => Source::Vector(iov, if count > 1 { 1 } else { count }),
            flat => flat,
        },
        Buffer::None => Source::Flat(0, 0),
    }
}

/// Copies up to `n` (<= `MAX_CAPTURE`) bytes from `source` to `dst`; returns how many.
#[inline(always)]
pub(crate) unsafe fn copy_payload(dst: *mut u8, source: Source, n: u64) -> Option<u32> {
    let mut off = 0u64;
    let (iov, count) = match source {
        Source::Flat(buf, len) => {
            if buf == 0 {
                return Some(0);
            }
            let take = bound(if n < len { n } else { len });
            if take == 0 {
                return Some(0);
            }
            // SAFETY: `take` <= MAX_CAPTURE bytes into the scratch slot.
            return (unsafe { read_user_raw(dst.cast(), take, buf as *const _) } == 0)
                .then_some(take);
        }
        Source::Vector(iov, count) => (iov, count),
    };
    let mut k = 0u64;
    while k < IOVECS_CAPTURED {
        // `off >= MAX_CAPTURE` first: a constant comparison Linux 6.1's verifier can decide,
        // where it cannot decide `off >= n` and walked an impossible branch (an offset known
        // to be both >= 512 and <= 511), rejecting the copy after it.
        if k >= count || off >= MAX_CAPTURE as u64 || off >= n {
            break;
        }
        let (base, len) = iovec(iov, k);
        let left = n - off;
        let want = if len < left { len } else { left };
        // Through memory, then bounded: the compiler otherwise folds the bound into the
        // arithmetic above, in signed operations the verifier cannot follow.
        // SAFETY: a local.
        let take = bound(unsafe { core::ptr::read_volatile(&want) });
        if take > 0 && base != 0 {
            // `off` < MAX_CAPTURE and `take` <= MAX_CAPTURE: within the slot's 2 * MAX_CAPTURE.
            let at = (off as usize) & (MAX_CAPTURE - 1);
            // SAFETY: as above.
            if unsafe { read_user_raw(dst.add(at).cast(), take, base as *const _) } != 0 {
                return if off > 0 { Some(off as u32) } else { None };
            }
        }
        off += u64::from(take);
        k += 1;
    }
    Some(off as u32)
}

/// A length restated for the verifier as at most `MAX_CAPTURE`.
#[inline(always)]
fn bound(len: u64) -> u32 {
    let len = (len as u32) & (2 * MAX_CAPTURE as u32 - 1);
    if len > MAX_CAPTURE as u32 {
        MAX_CAPTURE as u32
    } else {
        len
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

/// A data syscall returned `ret`: if its socket is a tracked (or new, when `may_track`) TCP
/// connection, send what moved. A batch's later messages (sendmmsg, recvmmsg) do not track: the
/// first did if the socket is one, and the verifier walks each inlined copy of `track` again.
#[inline(always)]
pub(crate) fn on_data(
    pid_tgid: u64,
    regs: SyscallRegs,
    ret: i64,
    (sc, dir, buffer): (u32, u32, Buffer),
    ts_enter: Option<u64>,
    injected: bool,
    may_track: bool,
) -> u32 {
    let tgid = (pid_tgid >> 32) as u32;
    let fd = regs.arg(0) as u32;
    let key = conn_key(tgid, fd);
    let state = match CONNS.get_ptr_mut(key) {
        Some(state) => state,
        None => {
            if !may_track || NOT_TCP.get_ptr(key).is_some() {
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
    // With --inject-context: which requests each thread is serving (see inject.rs).
    let mut serving = None;
    let message_start = state.direction != dir;
    if matches!(buffer, Buffer::Mmsg(_)) {
        // Batches (DNS's, in practice) are not framed: a TCP stream read or written that way
        // is the agent's from here (one store: the verifier's walk of this program has no room
        // for more).
        state.red_phase = red::OFF;
        state.red_keep = 0;
    } else if red_enabled()
        && state.red_phase != red::OFF
        && crate::red::counted(
            state,
            pid_tgid,
            (dir, message_start),
            || buffer_of(|n| regs.arg(n), buffer),
            ret,
            (ts_enter, ts_exit),
        )
    {
        state.direction = dir;
        return 0;
    }
    // A record follows: the agent learns of the connection first.
    announce(state, pid_tgid, fd);
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
    let source = buffer_of(|n| regs.arg(n), buffer);
    // How much payload to copy: what moved, within this record, within the message's budget.
    let mut n = ret as u64;
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
        // With `--sample-in-kernel`, what the probes decided for the exchange (0 otherwise).
        (*rec).record.flags = flags | state.red_keep;
        (*rec).record.direction = dir;
        (*rec).record.syscall = sc;
        (*rec).record.len = ret as u64;
        (*rec).record.message_seq = state.message_seq;
        let captured = match copy_payload((*rec).data.as_mut_ptr(), source, n) {
            Some(c) => c,
            None => {
                bump(counter::PAYLOAD_READ_FAILED);
                0
            }
        };
        // Through the map value: the verifier keeps no track of what a map value holds, so
        // what follows is walked once, not once for each way the iovec loop can end.
        (*rec).record.captured = captured;
        let captured = core::ptr::read_volatile(&raw const (*rec).record.captured);
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
    let r = on_data(
        pid_tgid,
        regs,
        ret,
        (sc, dir, buffer),
        ts_enter,
        injected,
        true,
    );
    if injected {
        forget_pending(pid_tgid as u32);
    }
    r
}
