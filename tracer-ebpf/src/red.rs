//! `--metrics-only`: HTTP/1 exchanges framed and counted here, in the kernel, instead of
//! recorded for the agent. What the agent would learn from four records and their parsing (a
//! request's method, path, status and duration) comes from the first bytes of each message:
//! a request starts at a request-direction message beginning with a method token, its
//! response at the first `HTTP/1.x NNN` after it (1xx statuses wait for the final one). The
//! exchange is counted when its response starts, in a per-CPU histogram keyed by process,
//! the server's port, role, method, status and a hash of the path; the agent reads the counts
//! and learns each path once.
//!
//! A connection is framed from a request's start (at once when it was tracked from connect or
//! accept): until then, and for good once a message is not what the framing expects (another
//! protocol, TLS, a message too short to tell), its records go to the agent as before and the
//! agent counts those exchanges. The agent's filters (`--port`, `--exe`...) apply when it
//! reads the counts. Pipelined requests
//! (a second request head in one message) are not told apart: they count as one exchange.
//!
//! `--sample-in-kernel` uses the same framing to decide, at each request's start, whether the
//! exchange is recorded for a span as well (every framed exchange is still counted here, and
//! its records say so). A server request is kept when a hash of its TCP sequence number is
//! below the share: the client's end, on this host or another, reads the same number and
//! reaches the same answer. A call (a client request) follows the requests its process is
//! serving (`SERVING`): kept when they are all kept, dropped when they are all dropped; when
//! both are in flight, the decision of the request its thread serves if that thread serves
//! exactly one (`THREAD_SERVING`: a thread per request or connection), else that of the one
//! request in flight with the call's method and path (`SERVING_LINES`: a reverse proxy), else
//! kept and marked for the agent (it cannot tell which is the parent); and
//! decided by its own sequence number when the process serves none (a pure client), and
//! recorded for the agent to decide when a request it serves is one the agent decides on; a call
//! that followed its parent rather than its number hands the decision to its server end on
//! this host (`FOLLOWED`), which takes it instead of deciding by the number. A process
//! that ever served something the framing hands back (TLS, HTTP/2...) has its calls recorded:
//! their parent may be one the agent decides on.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user as read_user_raw,
    },
    programs::TracePointContext,
};
use tracer_common::{
    conn_key, counter, data_flags, direction, kind, red, serving, ConnState, RedKey, RedRecord,
    Serving,
};

use crate::{
    capture::{buffer_of, header, iovec, wake_flags, Buffer, Source},
    kernel::{caller, ctx_u64, read_at, ARG0},
    maps::*,
};

/// Bytes read from the start of a message: the longest method, a space and the path.
const HEAD_BYTES: usize = 8 + red::PATH_LEN;

/// Whether this data syscall's exchange is counted here, so no record is sent. Called for
/// connections whose framing is not `OFF`, with `--metrics-only` on.
#[inline(always)]
pub(crate) fn counted(
    state: &mut ConnState,
    pid_tgid: u64,
    (dir, message_start): (u32, bool),
    source: impl FnOnce() -> Source,
    ret: i64,
    (ts_start, ts_exit): (u64, u64),
) -> bool {
    let phase = state.red_phase;
    if !message_start && phase != red::INTERIM {
        // The rest of a message: dropped or recorded with it.
        return phase != red::NEW && state.red_keep == 0;
    }
    if state.datagram != 0 {
        state.red_phase = red::OFF;
        return false;
    }
    let request_dir = if state.red_role == u32::from(red::SERVER) {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    if phase == red::INTERIM {
        // After a 1xx: the request's body, then the final status line, which may start any
        // of the response's syscalls (a server writes `100 Continue` and its answer back to
        // back, one message).
        if dir != request_dir {
            if let Some(Status::Final(status)) = first_bytes(source(), ret).and_then(status_of) {
                commit(state, pid_tgid, status, ts_exit);
                leave_serving(state, pid_tgid);
                state.red_phase = red::RESPONSE;
            }
        }
        return state.red_keep == 0;
    }
    let Some(buf) = first_bytes(source(), ret) else {
        return give_up(state, pid_tgid);
    };
    if phase == red::REQUEST {
        // The response starts (a request-direction message cannot start in this phase).
        match status_of(buf) {
            Some(Status::Final(status)) => {
                commit(state, pid_tgid, status, ts_exit);
                leave_serving(state, pid_tgid);
                state.red_phase = red::RESPONSE;
            }
            Some(Status::Interim) => state.red_phase = red::INTERIM,
            None => return give_up(state, pid_tgid),
        }
        return state.red_keep == 0;
    }
    // NEW or RESPONSE: a request starts here, or framing ends.
    let Some((method, len)) = method_of(buf) else {
        if phase == red::NEW && status_at(buf, 0).is_some() {
            // The agent is seeing an exchange through: frame from the next request.
            return false;
        }
        return give_up(state, pid_tgid);
    };
    if phase == red::NEW {
        state.red_role = u32::from(if dir == direction::INGRESS {
            red::SERVER
        } else {
            red::CLIENT
        });
    }
    state.red_method = method;
    state.red_path_hash = learn_path(state, pid_tgid, buf, len);
    state.red_start_ns = ts_start;
    state.red_phase = red::REQUEST;
    if sampling_in_kernel() {
        decide(state, pid_tgid, dir, ret);
    }
    state.red_keep == 0
}

/// `--sample-in-kernel`: whether the exchange starting now is recorded, and how (see the
/// module comment).
#[inline(always)]
fn decide(state: &mut ConnState, pid_tgid: u64, dir: u32, ret: i64) {
    let seq = request_seq(state, dir, ret);
    let by_seq = by_seq(seq);
    if state.red_role == u32::from(red::SERVER) {
        // Its client on this host may have followed a parent instead of the number.
        let followed = seq.and_then(|seq| {
            let key = edge_key(seq, state.tuple.remote_port, state.tuple.local_port);
            let flags = take_followed(key)?;
            Some(flags & !(data_flags::MARKED | data_flags::BY_LINE))
        });
        let keep = followed.unwrap_or(by_seq);
        state.red_keep = keep;
        enter_serving(state, pid_tgid, keep);
        return;
    }
    let ahead = state.red_ahead;
    state.red_ahead = 0;
    if ahead & red::AHEAD != 0 && seq == Some(state.red_ahead_seq) {
        // Decided at the write's entry, which told the server end already.
        state.red_keep = ahead & data_flags::DECIDED;
        count_rule((ahead >> red::AHEAD_RULE_SHIFT) & 31);
        return;
    }
    let (keep, rule) = call_decision(
        pid_tgid,
        (state.red_method, state.red_path_hash),
        by_seq,
        serving_counts((pid_tgid >> 32) as u32),
    );
    count_rule(rule);
    state.red_keep = keep;
    if let Some(seq) = seq {
        hand_over(state, seq, keep, by_seq);
    }
}

/// A call decided `keep` rather than `by_seq`: its server end follows this decision, from
/// `FOLLOWED` on this host, from the TCP option it carries there (`carry.rs`) on another (a
/// marked call's too: recorded, it is left to the agent, not kept by the number).
#[inline(always)]
fn hand_over(state: &ConnState, seq: u32, keep: u32, by_seq: u32) {
    if keep != by_seq {
        follow(
            edge_key(seq, state.tuple.local_port, state.tuple.remote_port),
            keep,
        );
    }
}

/// Leaves decision `keep` in `FOLLOWED` for the request `key`, in place of whatever its slot
/// held. The key is cleared first and written last, so that a reader on another CPU that finds
/// the key before and after reading the decision read this decision.
#[inline(always)]
pub(crate) fn follow(key: u64, keep: u32) {
    let Some(slot) = FOLLOWED.get_ptr_mut(followed_slot(key)) else {
        return;
    };
    // SAFETY: a map value pointer; volatile, so the three stores stay in this order.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).key, 0);
        core::ptr::write_volatile(&raw mut (*slot).keep, keep);
        core::ptr::write_volatile(&raw mut (*slot).key, key);
    }
}

/// The decision left in `FOLLOWED` for the request `key`, if any.
#[inline(always)]
pub(crate) fn followed(key: u64) -> Option<u32> {
    slot_decision(FOLLOWED.get_ptr(followed_slot(key))?, key)
}

/// The decision left in `FOLLOWED` for the request `key`, taken: a server end reads its
/// request once.
#[inline(always)]
fn take_followed(key: u64) -> Option<u32> {
    let slot = FOLLOWED.get_ptr_mut(followed_slot(key))?;
    let keep = slot_decision(slot, key)?;
    // SAFETY: a map value pointer. Cleared without a compare and exchange (a newer kernel than
    // the probes ask for): a slot overwritten between the reads and the clearing loses that
    // hand-over, as a slot shared does.
    unsafe { core::ptr::write_volatile(&raw mut (*slot).key, 0) };
    Some(keep)
}

/// The decision in `FOLLOWED`'s slot `slot` if it is `key`'s: the key read before and after
/// the decision (see `follow` for the order of the writes).
#[inline(always)]
fn slot_decision(slot: *const Followed, key: u64) -> Option<u32> {
    // SAFETY: a map value pointer.
    unsafe {
        if core::ptr::read_volatile(&raw const (*slot).key) != key {
            return None;
        }
        let keep = core::ptr::read_volatile(&raw const (*slot).keep);
        (core::ptr::read_volatile(&raw const (*slot).key) == key).then_some(keep)
    }
}

/// The `FOLLOWED` slot of a request key.
#[inline(always)]
fn followed_slot(key: u64) -> u32 {
    mix((key >> 32) as u32 ^ mix(key as u32)) & (FOLLOWED_SLOTS - 1)
}

/// The decision by a request's first sequence number (`None`: unreadable, so kept: recorded,
/// the agent decides).
#[inline(always)]
fn by_seq(seq: Option<u32>) -> u32 {
    match seq {
        Some(seq) if u64::from(mix(seq)) >= keep_below() => 0,
        _ => data_flags::RED_COUNTED | data_flags::KEPT,
    }
}

/// A call's decision (see the module comment), from what its process serves, its `line`
/// (method and path hash) and its decision by number; and the counter of the rule that made
/// it, if one of those counted (0 otherwise), for the caller to count once the decision holds.
#[inline(always)]
fn call_decision(
    pid_tgid: u64,
    line: (u32, u32),
    by_seq: u32,
    (kept, dropped, agent): (u64, u64, u64),
) -> (u32, u32) {
    const KEPT: u32 = data_flags::RED_COUNTED | data_flags::KEPT;
    if kept == 0 && dropped == 0 && agent == 0 {
        (by_seq, 0)
    } else if dropped == 0 {
        // Its parent is kept, or one the agent decides on.
        if agent == 0 {
            (KEPT, 0)
        } else {
            (data_flags::RED_COUNTED, 0)
        }
    } else if kept == 0 && agent == 0 {
        (0, 0)
    } else if let Some(decided) = (agent == 0).then(|| own_request(pid_tgid, line)).flatten() {
        decided
    } else {
        (
            data_flags::RED_COUNTED | data_flags::MARKED,
            counter::CALLS_MARKED,
        )
    }
}

/// Counts a call decided by rule `counter` (`call_decision`; 0: none counted).
#[inline(always)]
fn count_rule(counter: u32) {
    if counter != 0 {
        bump(counter);
    }
}

/// The requests process `tgid` is serving: kept, dropped, and (non-zero) whether any, in
/// flight or ever, is one whose fate the agent decides.
#[inline(always)]
fn serving_counts(tgid: u32) -> (u64, u64, u64) {
    match SERVING.get_ptr(tgid) {
        // SAFETY: a map value pointer; other CPUs change it with atomic adds.
        Some(s) => unsafe {
            (
                core::ptr::read_volatile(&raw const (*s).kept),
                core::ptr::read_volatile(&raw const (*s).dropped),
                core::ptr::read_volatile(&raw const (*s).undecided)
                    | core::ptr::read_volatile(&raw const (*s).unframed),
            )
        },
        None => (0, 0, 0),
    }
}

/// `--sample-in-kernel` with decisions carried across hosts (`carry.rs`): at the entry of a
/// write that starts a call, the call's decision, taken by the write's exit (`decide`). The
/// segment with the request's first byte is built inside the syscall, and the option that
/// carries a decision to its server end is written from `FOLLOWED` as it is: the exit would
/// be too late. Only what a call's decision needs is read here; the framing stays the exit's.
#[inline(always)]
pub(crate) fn decide_ahead(ctx: &TracePointContext, buffer: Buffer) {
    if !carrying_decisions() {
        return;
    }
    let Some((_, pid_tgid)) = caller() else {
        return;
    };
    // The arguments from the tracepoint's record: loads, where the saved registers cost a
    // helper call (every write pays for what runs before the connection's phase is known).
    let arg = |n: usize| ctx_u64(ctx, ARG0 + 8 * n);
    let key = conn_key((pid_tgid >> 32) as u32, arg(0) as u32);
    let Some(state) = CONNS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    let phase = state.red_phase;
    // A request can start here: a client's next message, or a new connection's first.
    let call_may_start =
        phase == red::NEW || (phase == red::RESPONSE && state.red_role == u32::from(red::CLIENT));
    if !call_may_start
        || state.direction == direction::EGRESS
        || state.muted != 0
        || state.datagram != 0
    {
        return;
    }
    let counts = serving_counts((pid_tgid >> 32) as u32);
    if counts == (0, 0, 0) {
        // A pure client's calls go by their number, which their server end reads too, and
        // the exit decides them.
        return;
    }
    let Some(head) = first_bytes(buffer_of(arg, buffer), HEAD_BYTES as i64) else {
        return;
    };
    let Some((method, at)) = method_of(head) else {
        return;
    };
    // Before the write nothing of it has moved: `write_seq` is the number of its first byte.
    let Some(seq) = request_seq(state, direction::EGRESS, 0) else {
        return;
    };
    let by_seq = by_seq(Some(seq));
    let (keep, rule) = call_decision(pid_tgid, (method, path_hash(head, at).0), by_seq, counts);
    state.red_ahead = keep | red::AHEAD | ((rule & 31) << red::AHEAD_RULE_SHIFT);
    state.red_ahead_seq = seq;
    hand_over(state, seq, keep, by_seq);
}

/// A call made while its process serves kept and dropped requests: the decision of the one it
/// is made for, if that can be told. Only where every request the process serves is framed
/// (none the agent decides on): the counts below do not see the others.
#[inline(always)]
fn own_request(pid_tgid: u64, line: (u32, u32)) -> Option<(u32, u32)> {
    if let Some(keep) = thread_decision(pid_tgid) {
        return Some((keep, counter::CALLS_BY_THREAD));
    }
    let keep = line_decision((pid_tgid >> 32) as u32, line)?;
    Some((keep, counter::CALLS_BY_LINE))
}

/// The decision of the request the calling thread serves, when it serves exactly one (a
/// thread per request or per connection): the call is made for it.
#[inline(always)]
fn thread_decision(pid_tgid: u64) -> Option<u32> {
    let tid = pid_tgid as u32;
    let t = THREAD_SERVING.get_ptr(thread_slot(tid))?;
    // SAFETY: a map value pointer; other CPUs change `count` with atomic adds.
    unsafe {
        let count = core::ptr::read_volatile(&raw const (*t).count);
        (count == 1
            && core::ptr::read_volatile(&raw const (*t).known) != 0
            && core::ptr::read_volatile(&raw const (*t).tid) == tid
            && core::ptr::read_volatile(&raw const (*t).tgid) == (pid_tgid >> 32) as u32)
            .then(|| core::ptr::read_volatile(&raw const (*t).keep))
    }
}

/// The `THREAD_SERVING` slot of thread `tid`.
#[inline(always)]
fn thread_slot(tid: u32) -> u32 {
    tid & (THREAD_SLOTS - 1)
}

/// The decision of the one request in flight in the process whose method and path the call
/// repeats (`line`: a reverse proxy forwarding it), flagged `BY_LINE` when kept: the agent
/// links it by that line only.
#[inline(always)]
fn line_decision(tgid: u32, line: (u32, u32)) -> Option<u32> {
    let s = SERVING_LINES.get_ptr(line_slot(tgid, line))?;
    // SAFETY: a map value pointer; other CPUs change it with atomic adds.
    let (kept, dropped, undecided) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*s).kept),
            core::ptr::read_volatile(&raw const (*s).dropped),
            core::ptr::read_volatile(&raw const (*s).undecided),
        )
    };
    match (kept, dropped, undecided) {
        (1, 0, 0) => Some(data_flags::RED_COUNTED | data_flags::KEPT | data_flags::BY_LINE),
        (0, 1, 0) => Some(0),
        _ => None,
    }
}

/// The `SERVING_LINES` slot of a request line (method, path hash) in process `tgid`.
#[inline(always)]
fn line_slot(tgid: u32, (method, path_hash): (u32, u32)) -> u32 {
    mix(path_hash ^ mix(tgid ^ (method << 24))) & (LINE_SLOTS - 1)
}

/// The key of a request in `FOLLOWED`: its first byte's sequence number and the client's and
/// server's ports.
#[inline(always)]
pub(crate) fn edge_key(seq: u32, client_port: u16, server_port: u16) -> u64 {
    (u64::from(seq) << 32) | (u64::from(client_port) << 16) | u64::from(server_port)
}

/// The TCP sequence number of the request's first byte, which this syscall moved (the
/// sender's `write_seq`, the receiver's `copied_seq`, less what the syscall moved).
#[inline(always)]
fn request_seq(state: &ConnState, dir: u32, ret: i64) -> Option<u32> {
    let o = offsets();
    let field = if dir == direction::EGRESS {
        o.tcp_write_seq
    } else {
        o.tcp_copied_seq
    };
    // SAFETY: a kernel read through a checked helper.
    let after = unsafe { read_at::<u32>(state.sk, field) }?;
    Some(after.wrapping_sub(ret as u32))
}

/// A 32-bit integer hash (lowbias32): sequence numbers of one connection differ by a few
/// hundred bytes, so their low bits alone would sample in patterns.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The process's `SERVING` entry, inserted empty if it has none (`None` when the map is full).
#[inline(always)]
fn serving_of(tgid: u32) -> Option<*mut Serving> {
    if let Some(s) = SERVING.get_ptr_mut(tgid) {
        return Some(s);
    }
    let _ = SERVING.insert(tgid, Serving::default(), u64::from(BPF_NOEXIST));
    SERVING.get_ptr_mut(tgid)
}

/// A server request starts, with the decision `keep` (`data_flags`): counted among its
/// process's requests in flight until its response starts, the framing ends or the connection
/// closes. Recorded but not kept (its client's call was marked), the agent decides on it.
#[inline(always)]
fn enter_serving(state: &mut ConnState, pid_tgid: u64, keep: u32) {
    let Some(s) = serving_of((pid_tgid >> 32) as u32) else {
        return;
    };
    let how = if keep & data_flags::KEPT != 0 {
        serving::KEPT
    } else if keep != 0 {
        serving::UNDECIDED
    } else {
        serving::DROPPED
    };
    // SAFETY: a map value pointer; an atomic add, as other CPUs add to it too.
    unsafe { add(serving_count(s, how), 1) };
    state.red_serving = how;
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if let Some(l) =
        SERVING_LINES.get_ptr_mut(line_slot(tgid, (state.red_method, state.red_path_hash)))
    {
        // SAFETY: as above.
        unsafe { add(serving_count(l, how), 1) };
    }
    let Some(t) = THREAD_SERVING.get_ptr_mut(thread_slot(tid)) else {
        return;
    };
    // SAFETY: a map value pointer; other CPUs change `count` with atomic adds. `keep` and
    // `conn_id` are written by the slot's thread only, `known` cleared by the thread
    // answering this request.
    unsafe {
        if (*t).tid != tid || (*t).tgid != tgid {
            // Another thread's slot (one that ended, or one whose number shares it), or a
            // number another process's thread had: what it counted is not this thread's.
            (*t).count = 0;
            (*t).tid = tid;
            (*t).tgid = tgid;
        }
        add(&raw mut (*t).count, 1);
        (*t).keep = keep;
        (*t).conn_id = state.conn_id;
        (*t).known = 1;
        if core::ptr::read_volatile(&raw const (*t).tid) != tid {
            // Taken over by a thread sharing the slot, on another CPU, meanwhile: the
            // decision written above may be read as that thread's.
            (*t).known = 0;
        }
    }
    state.serving_tid = tid;
}

/// The count of `SERVING`'s entry `s` a request served `how` (`serving::*`, not `NONE`) is in.
#[inline(always)]
unsafe fn serving_count(s: *mut Serving, how: u32) -> *mut u64 {
    // SAFETY: the caller's map value pointer; field addresses only.
    unsafe {
        match how {
            serving::KEPT => &raw mut (*s).kept,
            serving::DROPPED => &raw mut (*s).dropped,
            _ => &raw mut (*s).undecided,
        }
    }
}

/// An atomic add whose result is not used: the eBPF instruction every kernel has (`lock +=`),
/// which Rust's atomic types do not offer on this target.
#[inline(always)]
unsafe fn add(at: *mut u64, n: u64) {
    // SAFETY: the caller's pointer is a map value's aligned u64.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            at, n,
        )
    };
}

/// The request in progress stops counting as being served, if it did.
#[inline(always)]
fn leave_serving(state: &mut ConnState, pid_tgid: u64) {
    let was = state.red_serving;
    if was == serving::NONE {
        return;
    }
    state.red_serving = serving::NONE;
    let tgid = (pid_tgid >> 32) as u32;
    if let Some(s) = SERVING.get_ptr_mut(tgid) {
        // SAFETY: as in `enter_serving`; adding 2^64 - 1 takes one away.
        unsafe { add(serving_count(s, was), u64::MAX) };
    }
    // The request's method and path hash are still this request's: a next request's start
    // replaces them after this.
    if let Some(l) =
        SERVING_LINES.get_ptr_mut(line_slot(tgid, (state.red_method, state.red_path_hash)))
    {
        // SAFETY: as above.
        unsafe { add(serving_count(l, was), u64::MAX) };
    }
    let tid = state.serving_tid;
    if tid == 0 {
        return;
    }
    state.serving_tid = 0;
    if let Some(t) = THREAD_SERVING.get_ptr_mut(thread_slot(tid)) {
        // SAFETY: as above. The decision stays known only for a later request of the thread.
        unsafe {
            if (*t).tid != tid || (*t).tgid != tgid {
                // Taken over by another thread, or the thread ended and its number went to
                // another process's thread.
                return;
            }
            add(&raw mut (*t).count, u64::MAX);
            if (*t).conn_id == state.conn_id {
                (*t).known = 0;
            }
        }
    }
}

/// Framing ends on this connection: its records go to the agent from this message on. With
/// `--sample-in-kernel`, a server end handed back marks its process: its calls are recorded
/// from now on, as their parent may be a request the agent decides on.
#[inline(always)]
fn give_up(state: &mut ConnState, pid_tgid: u64) -> bool {
    if state.red_phase != red::NEW {
        bump(counter::RED_GAVE_UP);
    }
    if sampling_in_kernel() {
        leave_serving(state, pid_tgid);
        state.red_keep = 0;
        if state.accepted != 0 || state.red_role == u32::from(red::SERVER) {
            if let Some(s) = serving_of((pid_tgid >> 32) as u32) {
                // SAFETY: a map value pointer.
                unsafe { (*s).unframed = 1 };
            }
        }
    }
    state.red_phase = red::OFF;
    false
}

/// The connection closes: a request still waiting for its response is counted with status 0,
/// as the agent counts one (not on a muted connection: its framing stopped where the agent
/// muted it), and stops being served.
#[inline(always)]
pub(crate) fn on_close(state: &mut ConnState, pid_tgid: u64) {
    if state.muted == 0 && (state.red_phase == red::REQUEST || state.red_phase == red::INTERIM) {
        let now = unsafe { bpf_ktime_get_ns() };
        commit(state, pid_tgid, 0, now);
    }
    leave_serving(state, pid_tgid);
}

/// The first bytes of the message this syscall starts, in the per-CPU scratch slot, and how
/// many: at least 12 (a status line's `HTTP/1.1 200`), or `None`.
#[inline(always)]
fn first_bytes(source: Source, ret: i64) -> Option<Head> {
    let (base, len) = match source {
        Source::Flat(buf, len) => (buf, len),
        Source::Vector(iov, count) => {
            if count == 0 {
                return None;
            }
            iovec(iov, 0)
        }
    };
    let mut n = if len < ret as u64 { len } else { ret as u64 };
    if n > HEAD_BYTES as u64 {
        n = HEAD_BYTES as u64;
    }
    if base == 0 || n < 12 {
        return None;
    }
    let slot = SCRATCH.get_ptr_mut(0)?;
    // Restated for the verifier: 12 ..= HEAD_BYTES.
    let n = (n as u32 & 127) as u64;
    if n > HEAD_BYTES as u64 {
        return None;
    }
    // SAFETY: per-CPU slot (programs do not nest on a CPU); at most HEAD_BYTES into its data.
    unsafe {
        let data = &mut (*slot).data;
        if read_user_raw(data.as_mut_ptr().cast(), n as u32, base as *const _) != 0 {
            return None;
        }
        Some((&*(data as *const _), n))
    }
}

type Head = (&'static [u8; 2 * tracer_common::MAX_CAPTURE], u64);

/// What a response's first bytes say.
enum Status {
    /// `HTTP/1.x NNN` with NNN >= 200, or a 1xx response followed in the same bytes by one.
    Final(u16),
    /// A 1xx response alone: the final one follows.
    Interim,
}

/// The status line at the start; past a `100 Continue` response's head when the final
/// status line follows it in the same bytes (servers write both back to back). 101 (Switching
/// Protocols) is final: what follows is not HTTP/1, and the framing gives up at it.
#[inline(always)]
fn status_of(head: Head) -> Option<Status> {
    let status = status_at(head, 0)?;
    if status >= 200 || status == 101 {
        return Some(Status::Final(status));
    }
    if status == 100 && head.1 >= (CONTINUE_HEAD + 12) as u64 {
        if let Some(s) = status_at(head, CONTINUE_HEAD) {
            if s >= 200 {
                return Some(Status::Final(s));
            }
        }
    }
    Some(Status::Interim)
}

/// Bytes of `HTTP/1.1 100 Continue\r\n\r\n`, the interim response every server writes.
const CONTINUE_HEAD: usize = 25;

/// `HTTP/1.x NNN` at `at` (below 128): the status code.
#[inline(always)]
fn status_at((b, _): Head, at: usize) -> Option<u16> {
    let at = at & 127;
    let version = u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        0,
    ]);
    if version != u64::from_le_bytes(*b"HTTP/1.\0") || b[at + 8] != b' ' {
        return None;
    }
    let mut status = 0u16;
    let mut i = 9;
    while i < 12 {
        let d = b[at + i].wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        status = status * 10 + u16::from(d);
        i += 1;
    }
    Some(status)
}

/// A method token and a space at the start: its `red::METHODS` number and length.
#[inline(always)]
fn method_of((b, _): Head) -> Option<(u32, u64)> {
    const fn word(w: &[u8; 4]) -> u32 {
        u32::from_le_bytes(*w)
    }
    let first = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let second = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (method, len) = match first {
        w if w == word(b"GET ") => (1, 3),
        w if w == word(b"PUT ") => (3, 3),
        w if w == word(b"POST") => (2, 4),
        w if w == word(b"HEAD") => (5, 4),
        w if w == word(b"DELE") && second & 0xff_ffff == word(b"TE \0") => (4, 6),
        w if w == word(b"OPTI") && second == word(b"ONS ") => (6, 7),
        w if w == word(b"PATC") && b[4] == b'H' => (7, 5),
        w if w == word(b"TRAC") && b[4] == b'E' => (8, 5),
        _ => return None,
    };
    if b[len] != b' ' {
        return None;
    }
    Some((method, len as u64 + 1))
}

/// The hash of the path starting at `at` (`path_hash`); the agent is sent the path the first
/// time this process uses the hash.
#[inline(always)]
fn learn_path(state: &ConnState, pid_tgid: u64, head: Head, at: u64) -> u32 {
    let (hash, len) = path_hash(head, at);
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return hash;
    };
    // SAFETY: per-CPU slot (programs do not nest on a CPU).
    let (hash, len) = unsafe {
        (*slot).path_hash = hash;
        (*slot).path_len = len as u32;
        (
            core::ptr::read_volatile(&raw const (*slot).path_hash),
            core::ptr::read_volatile(&raw const (*slot).path_len) & 127,
        )
    };
    let b = head.0;
    let tgid = (pid_tgid >> 32) as u32;
    let known = (u64::from(tgid) << 32) | u64::from(hash);
    if PATHS.get_ptr(known).is_some() {
        return hash;
    }
    if let Some(mut entry) = EVENTS.reserve::<RedRecord>(0) {
        let rec = entry.as_mut_ptr();
        // SAFETY: a reserved record of the right size, filled field by field; the path is
        // copied from the scratch slot at an offset below 16, within its data.
        unsafe {
            (*rec).header = header(kind::RED, pid_tgid, 0, state.conn_id, 0, 0);
            (*rec).key = RedKey {
                tgid,
                port: 0,
                role: 0,
                method: 0,
                status: 0,
                _pad: 0,
                path_hash: hash,
            };
            (*rec).duration_ns = 0;
            (*rec).what = red::PATH;
            (*rec).path_len = len;
            // One helper call: a copy loop here is walked by the verifier on every path.
            let from = b.as_ptr().add((at as usize) & 15);
            bpf_probe_read_kernel(
                (*rec).path.as_mut_ptr().cast(),
                red::PATH_LEN as u32,
                from.cast(),
            );
        }
        entry.submit(wake_flags(core::mem::size_of::<RedRecord>() as u64));
        bump(counter::RECORDS_SENT);
        let _ = PATHS.insert(known, 0, 0);
    } else {
        // Sent again with the next request of this path.
        bump(counter::RINGBUF_FULL);
    }
    hash
}

/// The hash of the path starting at `at` (up to `?`, `#`, a space, the bytes read or
/// `red::PATH_LEN`) and the path's length.
///
/// Eight bytes a step, the terminators found with word arithmetic: a loop of a byte a step
/// was walked by the verifier 96 times over on every path into it (Linux 6.1 came within
/// 35% of its limit of 1M instructions a program). Only the agent reads paths from hashes,
/// so the hash need not be a standard one.
#[inline(always)]
fn path_hash((b, n): Head, at: u64) -> (u32, u64) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `w` that is zero; exact for the lowest such byte.
    let zeros = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut len = 0u64;
    let mut k = 0u64;
    while k < (red::PATH_LEN / 8) as u64 {
        let from = at + 8 * k;
        if from >= n {
            break;
        }
        let o = (from as usize) & 127;
        let w = u64::from_le_bytes([
            b[o],
            b[o + 1],
            b[o + 2],
            b[o + 3],
            b[o + 4],
            b[o + 5],
            b[o + 6],
            b[o + 7],
        ]);
        let mut ends = zeros(w ^ (ONES * u64::from(b' ')))
            | zeros(w ^ (ONES * u64::from(b'?')))
            | zeros(w ^ (ONES * u64::from(b'#')));
        let valid = n - from;
        if valid < 8 {
            // Bytes past those read end the path too.
            ends |= 0x80 << (8 * valid);
        }
        if ends != 0 {
            // The bytes below the first end.
            let below = ((ends & ends.wrapping_neg()) >> 7).wrapping_sub(1);
            hash = (hash ^ (w & below)).wrapping_mul(0x0000_0100_0000_01b3);
            len += u64::from(below.count_ones() / 8);
            break;
        }
        hash = (hash ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        len += 8;
        k += 1;
    }
    ((hash ^ (hash >> 32)) as u32, len)
}

/// Counts the exchange in progress, ending at `end_ns` with `status`.
#[inline(always)]
fn commit(state: &ConnState, pid_tgid: u64, status: u16, end_ns: u64) {
    let server = state.red_role == u32::from(red::SERVER);
    let key = RedKey {
        tgid: (pid_tgid >> 32) as u32,
        port: if server {
            state.tuple.local_port
        } else {
            state.tuple.remote_port
        },
        role: if server { red::SERVER } else { red::CLIENT },
        method: state.red_method as u8,
        status,
        _pad: 0,
        path_hash: state.red_path_hash,
    };
    let d = end_ns.saturating_sub(state.red_start_ns);
    let mut bucket = 0usize;
    while bucket < red::BOUNDS_NS.len() {
        if d <= red::BOUNDS_NS[bucket] {
            break;
        }
        bucket += 1;
    }
    let bucket = bucket & 15;
    bump(counter::RED_COUNTED);
    for _ in 0..2 {
        if let Some(v) = RED.get_ptr_mut(key) {
            // SAFETY: this CPU's value; programs do not nest on a CPU.
            unsafe {
                if bucket < 15 {
                    (*v).buckets[bucket] += 1;
                }
                (*v).sum_ns += d;
            }
            return;
        }
        // A new key: inserted empty, then counted (another CPU may insert it meanwhile).
        let Some(zero) = RED_ZERO.get_ptr(0) else {
            break;
        };
        // SAFETY: a map value pointer, never written.
        let zero = unsafe { &*zero };
        if RED.insert(key, zero, u64::from(BPF_NOEXIST)).is_err() && RED.get_ptr(key).is_none() {
            break;
        }
    }
    // The table is full: the agent counts this one from a record.
    match EVENTS.reserve::<RedRecord>(0) {
        Some(mut entry) => {
            let rec = entry.as_mut_ptr();
            // SAFETY: a reserved record of the right size, filled field by field.
            unsafe {
                (*rec).header = header(kind::RED, pid_tgid, 0, state.conn_id, 0, 0);
                (*rec).key = key;
                (*rec).duration_ns = d;
                (*rec).what = red::EXCHANGE;
                (*rec).path_len = 0;
            }
            entry.submit(wake_flags(core::mem::size_of::<RedRecord>() as u64));
            bump(counter::RECORDS_SENT);
        }
        None => bump(counter::RINGBUF_FULL),
    }
}
