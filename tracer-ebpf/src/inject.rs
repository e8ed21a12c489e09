//! Carrying trace context on the wire (`--inject-context`, off by default): a `traceparent`
//! header inserted into the first HTTP/1 request of each new outgoing connection, so that a
//! downstream service, whether traced by an agent or instrumented with an OpenTelemetry SDK,
//! continues the caller's trace.
//!
//! - `track_outgoing` (sock_ops, on the cgroup v2 root; an object of its own, outgoing.rs, as its
//!   sockhash needs CAP_NET_ADMIN) puts each outgoing TCP connection of the traced namespace
//!   into `OUTGOING` once it is established; `inject_context` (sk_msg, on that map) then sees
//!   its first message, and the connection leaves the map as that message goes out. A
//!   socket in a sockmap gets the kernel's `tcp_bpf` operations, whose `FIONREAD` counts only
//!   what a verdict program queued (none here): measured, nginx reading a proxied 20 MB
//!   response stalled after 24 KB while its upstream connection was in the map. Out of the
//!   map, the socket has its own operations back before the response comes. The price: on a
//!   kept-alive connection only the first request carries the header.
//! - Only the stream's first bytes can change, and only if they are a whole HTTP/1 request
//!   head (read up to `HEAD_WINDOW`) without a `traceparent` of its own (a proxy forwarding its
//!   caller's): the line goes right after the request line. Bodies, later requests and
//!   connections that existed before the agent started are never touched.
//! - The trace id: a thread serving exactly one request (read, not answered: counted by the
//!   tracepoints in `serving_begins`/`serving_ends`) passes that request's trace on, taken from
//!   its own incoming `traceparent` when the caller is trusted, else drawn once for it. Any other
//!   call (an event loop with several requests in flight, a worker thread, a plain client)
//!   starts a new trace id, which the agent adopts when it links the call itself. The span id
//!   is drawn here and reported (`PENDING`, then an `InjectedRecord` from the exit probe), so
//!   the agent's client span and the header name the same span.
use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::generated::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_msg_pop_data, bpf_msg_pull_data,
        bpf_probe_read_kernel,
    },
    macros::sk_msg,
    programs::SkMsgContext,
};
use tracer_common::{
    counter, inject_flags, ConnState, ConnTuple, MAX_CAPTURE, TRACEPARENT_LINE_LEN,
};

use crate::{flow::*, maps::*};

const HEX: &[u8; 16] = b"0123456789abcdef";
const LINE_PREFIX: &[u8; 16] = b"traceparent: 00-";

#[sk_msg]
pub fn inject_context(ctx: SkMsgContext) -> u32 {
    if first_message(&ctx) {
        if search_head(&ctx) {
            // SAFETY: the program array holds `inject_finish` (the agent puts it there); if
            // the call fails the message passes unchanged.
            unsafe { JUMP.tail_call(&ctx, 0) };
        } else {
            bump(counter::INJECT_NOT_HTTP);
        }
    }
    SK_PASS
}

/// The second half of the injector, reached by tail call from `inject_context` once the head's
/// bytes are searched. A separate program because the verifier walks the code after a search
/// loop once for each place the loop can stop (the message's length is unknown), which took
/// one program past its million instructions; a tail call hands over only what the scratch map
/// holds, whose values the verifier does not know, so this half is walked once.
#[sk_msg]
pub fn inject_finish(ctx: SkMsgContext) -> u32 {
    finish(&ctx);
    SK_PASS
}

/// True for the first part of the first message sent on the connection: the socket is in the
/// map only until its first send goes out (`track_outgoing` in outgoing.rs), and `PENDING`
/// marks the later parts of that send, which the kernel may hand over one by one.
#[inline(always)]
fn first_message(ctx: &SkMsgContext) -> bool {
    let msg = ctx.msg;
    if ctx.size() == 0 {
        return false;
    }
    let Some(scratch) = INJECT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the context pointer is valid for this run; the scratch slot is per CPU.
    let (md, pending) = unsafe { (&*msg, &mut (*scratch).pending) };
    let key = &mut pending.key;
    key.family = md.family;
    key.local_port = md.local_port;
    key.remote_port = md.remote_port;
    key._pad = 0;
    if md.family == AF_INET6 {
        key.local = words(&md.local_ip6);
        key.remote = words(&md.remote_ip6);
    } else {
        key.local = [md.local_ip4, 0, 0, 0];
        key.remote = [md.remote_ip4, 0, 0, 0];
    }
    // SAFETY: no preconditions.
    let tid = unsafe { bpf_get_current_pid_tgid() } as u32;
    if let Some(p) = PENDING.get_ptr(tid) {
        // SAFETY: a map value pointer, valid for this run.
        if unsafe { (*p).key } == pending.key {
            return false;
        }
    }
    pending.injected = 0;
    // By reference: a copy of the value would go on the stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = PENDING.insert(tid, &*pending, 0);
    true
}

/// Reads up to `HEAD_WINDOW` bytes of the message, checks they start with a method, and
/// records in `HeadScan` where the request line and the head end and where the headers that
/// matter start. One loop, whose every finding goes to the map: nothing after it depends on
/// where it stopped.
#[inline(always)]
fn search_head(ctx: &SkMsgContext) -> bool {
    let size = ctx.size() as u64;
    let window = if size > HEAD_WINDOW as u64 {
        HEAD_WINDOW as u32
    } else {
        size as u32
    };
    // SAFETY: the helper takes the program's context; the range is within the message.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, window, 0) } != 0 {
        return false;
    }
    let Some(scratch) = INJECT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU map value; sk_msg programs do not nest on a CPU.
    let (buf, scan) = unsafe { (&mut (*scratch).head, &mut (*scratch).scan) };
    let avail = (ctx.data_end() - ctx.data()) as u32;
    let n = if avail < window { avail } else { window };
    let n = n & (2 * HEAD_WINDOW as u32 - 1);
    let n = if n > HEAD_WINDOW as u32 {
        HEAD_WINDOW as u32
    } else {
        n
    };
    if n < 16 {
        return false;
    }
    // SAFETY: reads `n` bytes of the linear part of the message into the scratch buffer.
    if unsafe { bpf_probe_read_kernel(buf.as_mut_ptr().cast(), n, ctx.data() as *const _) } != 0 {
        return false;
    }
    // A method: 3 to 7 capital letters and a space. CONNECT turns the stream into a tunnel.
    let mut m = 0usize;
    while m < 8 {
        let c = buf[m];
        if c == b' ' {
            break;
        }
        if !c.is_ascii_uppercase() {
            return false;
        }
        m += 1;
    }
    if !(3..=7).contains(&m) || &buf[..7] == b"CONNECT" {
        return false;
    }
    scan.n = n;
    scan.lines = 0;
    // Where lines start: each branch short, so the verifier's walk of every position stays
    // small (comparing header names here, at every position, took it past its limit).
    let mut i = 9u32;
    while i < HEAD_WINDOW as u32 - 2 {
        if i + 2 > n {
            break;
        }
        if buf[(i & (HEAD_WINDOW as u32 - 1)) as usize] == b'\n' {
            // Volatile: the count must live in the map, where the verifier does not follow
            // it, not in a register, where each count would be one more state per position.
            // SAFETY: fields of a map value.
            unsafe {
                let k = core::ptr::read_volatile(&scan.lines);
                if k < MAX_LINES {
                    core::ptr::write_volatile(
                        &mut scan.line_at[(k & (MAX_LINES - 1)) as usize],
                        i + 1,
                    );
                    core::ptr::write_volatile(&mut scan.lines, k + 1);
                }
            }
        }
        i += 1;
    }
    true
}

/// Decides from what `search_head` found and inserts the header.
#[inline(always)]
fn finish(ctx: &SkMsgContext) {
    let Some(scratch) = INJECT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map value.
    let (scan, buf, found) = unsafe { (&(*scratch).scan, &(*scratch).head, &mut (*scratch).found) };
    // The lines: the first ends the request line, the first empty one ends the head; a
    // `traceparent` is looked for in between. What is found goes to the map (written and read
    // volatile), not to registers: the verifier then has one state per line, not one per
    // combination of findings.
    *found = Found::default();
    let line_end = scan.line_at[0];
    let mut k = 0u32;
    while k < MAX_LINES {
        // SAFETY (volatile accesses): fields of a map value.
        let done = unsafe { core::ptr::read_volatile(&found.end) } != 0;
        if k < scan.lines && !done {
            let p = scan.line_at[(k & (MAX_LINES - 1)) as usize];
            unsafe {
                if buf[(p & (HEAD_WINDOW as u32 - 1)) as usize] == b'\r' {
                    core::ptr::write_volatile(&mut found.end, p + 2);
                } else if starts_with_name(buf, p, b"traceparent:") {
                    core::ptr::write_volatile(&mut found.traceparent, 1);
                }
            }
        }
        k += 1;
    }
    let end = opaque(&found.end);
    let has_traceparent = opaque(&found.traceparent) != 0;
    // The head must end within what was read, and the request line must be HTTP/1.x.
    if scan.lines == 0 || line_end < 11 || end == 0 || end > scan.n {
        bump(counter::INJECT_NOT_HTTP);
        return;
    }
    let v = (line_end as usize - 11) & (HEAD_WINDOW - 1);
    if v + 11 > HEAD_WINDOW || &buf[v..v + 8] != b" HTTP/1." || buf[v + 9] != b'\r' {
        bump(counter::INJECT_NOT_HTTP);
        return;
    }
    if has_traceparent {
        bump(counter::INJECT_HEADER_PRESENT);
        return;
    }
    // SAFETY: no preconditions.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return;
    }
    insert_traceparent(ctx, pid_tgid as u32, line_end);
}

/// `v`, copied by a helper: neither the verifier nor the compiler knows what a helper wrote,
/// so what follows is walked once whatever led to `v`.
#[inline(always)]
fn opaque(v: &u32) -> u32 {
    let mut out = 0u32;
    // SAFETY: 4 bytes from a valid reference into a local.
    unsafe { bpf_probe_read_kernel((&raw mut out).cast(), 4, (v as *const u32).cast()) };
    out
}

/// The line at `p` starts with `name` (lowercase), in any case.
#[inline(always)]
fn starts_with_name(buf: &[u8; HEAD_WINDOW], p: u32, name: &[u8]) -> bool {
    let mut k = 0usize;
    while k < name.len() {
        let c = buf[(p as usize + k) & (HEAD_WINDOW - 1)];
        if c.to_ascii_lowercase() != name[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// Lowercase hex digits only, not all zero (a W3C trace id).
#[inline(always)]
fn all_hex(s: &[u8; 32]) -> bool {
    let mut zero = true;
    let mut k = 0;
    while k < 32 {
        let c = s[k];
        if !(c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return false;
        }
        zero &= c == b'0';
        k += 1;
    }
    !zero
}

#[inline(always)]
fn random_hex(out: &mut [u8]) {
    let mut k = 0;
    while k + 8 <= out.len() {
        // SAFETY: no preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        let mut b = 0;
        while b < 8 {
            out[k + b] = HEX[((r >> (4 * b)) & 15) as usize];
            b += 1;
        }
        k += 8;
    }
}

/// Inserts the line after the request line and leaves what the exit probe reports.
#[inline(always)]
fn insert_traceparent(ctx: &SkMsgContext, tid: u32, line_end: u32) {
    let Some(scratch) = INJECT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map value.
    let (line, pending) = unsafe { (&mut (*scratch).line, &mut (*scratch).pending) };
    pending.offset = line_end;
    pending.flags = 0;
    let served = THREADS.get_ptr_mut(tid);
    match served {
        // SAFETY: a map value pointer, valid for this run.
        Some(t) if unsafe { (*t).serving } == 1 => unsafe {
            if (*t).has_trace != 0 && !all_hex(&(*t).trace_hex) {
                (*t).has_trace = 0;
            }
            if (*t).has_trace == 0 {
                random_hex(&mut (*t).trace_hex);
                (*t).has_trace = 1;
                (*t).flags = 0;
            }
            pending.trace_hex = (*t).trace_hex;
            pending.flags = inject_flags::FROM_SERVED_REQUEST | (*t).flags;
        },
        _ => random_hex(&mut pending.trace_hex),
    }
    random_hex(&mut pending.span_hex);
    line[..16].copy_from_slice(LINE_PREFIX);
    line[16..48].copy_from_slice(&pending.trace_hex);
    line[48] = b'-';
    line[49..65].copy_from_slice(&pending.span_hex);
    line[65..70].copy_from_slice(b"-01\r\n");

    let len = TRACEPARENT_LINE_LEN as u32;
    if ctx.push_data(line_end, len, 0).is_err() {
        bump(counter::INJECT_FAILED);
        return;
    }
    // SAFETY: the helper takes the program's context.
    let pulled = unsafe { bpf_msg_pull_data(ctx.msg, line_end, line_end + len, 0) } == 0;
    let data = ctx.data();
    if !pulled || data + TRACEPARENT_LINE_LEN > ctx.data_end() {
        // The inserted bytes are not initialised: take them out again.
        // SAFETY: the helper takes the program's context.
        unsafe { bpf_msg_pop_data(ctx.msg, line_end, len, 0) };
        bump(counter::INJECT_FAILED);
        return;
    }
    let out = data as *mut u8;
    let mut k = 0;
    while k < TRACEPARENT_LINE_LEN {
        // SAFETY: within [data, data + 70), checked against data_end above.
        unsafe { *out.add(k) = line[k] };
        k += 1;
    }
    pending.injected = 1;
    // By reference: the value would be copied to the stack, which has no room for it.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = PENDING.insert(tid, &*pending, 0);
    bump(counter::CONTEXT_INJECTED);
}

/// The injection the sk_msg run of the calling thread's write made, if any (removed by
/// `forget_pending` once the exit probe reported it).
#[inline(always)]
pub(crate) fn pending(tid: u32) -> Option<*const Pending> {
    PENDING.get_ptr(tid)
}

#[inline(always)]
pub(crate) fn forget_pending(tid: u32) {
    let _ = PENDING.remove(tid);
}

/// A thread's entry before its first request (a template in read-only data: the probes'
/// stack has no room for it).
static NEW_THREAD: ThreadContext = ThreadContext {
    serving: 0,
    has_trace: 0,
    flags: 0,
    _pad: 0,
    conn_id: 0,
    trace_hex: [0; 32],
};

/// A server connection's request started arriving on thread `tid`: the thread serves one more.
#[inline(always)]
pub(crate) fn serving_begins(state: &mut ConnState, tid: u32) -> Option<*mut ThreadContext> {
    if state.serving_tid == 0 {
        let t = match THREADS.get_ptr_mut(tid) {
            Some(t) => t,
            None => {
                // By reference, as above: from read-only data, not copied to the stack.
                #[allow(clippy::needless_borrows_for_generic_args)]
                THREADS.insert(tid, &NEW_THREAD, 0).ok()?;
                THREADS.get_ptr_mut(tid)?
            }
        };
        // SAFETY: a map value pointer, valid for this run.
        unsafe { (*t).serving += 1 };
        state.serving_tid = tid;
    }
    let t = THREADS.get_ptr_mut(tid)?;
    // SAFETY: as above.
    unsafe {
        (*t).has_trace = 0;
        (*t).flags = 0;
        (*t).conn_id = state.conn_id;
    }
    Some(t)
}

/// A server connection's response started (or it closed): its thread serves one fewer.
#[inline(always)]
pub(crate) fn serving_ends(state: &mut ConnState) {
    if state.serving_tid == 0 {
        return;
    }
    if let Some(t) = THREADS.get_ptr_mut(state.serving_tid) {
        // SAFETY: a map value pointer, valid for this run.
        unsafe {
            (*t).serving = (*t).serving.saturating_sub(1);
            if (*t).conn_id == state.conn_id {
                (*t).has_trace = 0;
                (*t).conn_id = 0;
            }
        }
    }
    state.serving_tid = 0;
}

/// Is the caller at `tuple`'s remote end trusted to name the trace (`--trust-context`)?
#[inline(always)]
fn trusted(tuple: &ConnTuple) -> bool {
    match trust_context() {
        0 => false,
        1 => true,
        _ => {
            let mut data = [0u8; 20];
            data[0] = tuple.family as u8;
            data[4..20].copy_from_slice(&tuple.remote_addr);
            TRUSTED_NETS.get(TrustKey::new(160, data)).is_some()
        }
    }
}

/// 8 bytes of `data` at `p`, as a little-endian number, letters lowercased (and some other
/// bytes changed alike; what is compared against has only letters, '-' and ':' there).
#[inline(always)]
fn lower8_at(data: &[u8; 2 * MAX_CAPTURE], p: usize) -> u64 {
    let p = p & 511;
    if p + 8 > 512 {
        return 0;
    }
    // SAFETY: within the array (checked above).
    let v = unsafe { core::ptr::read_unaligned(data.as_ptr().add(p).cast::<u64>()) };
    v | 0x2020_2020_2020_2020
}

/// The head of a request a thread serving it just read (the first `n` captured bytes): if it
/// carries a `traceparent` from a trusted caller, the calls the thread makes while serving it
/// continue that trace. One flat search, then one parse: loops inside the search multiplied
/// the verifier's work past its limit.
#[inline(always)]
pub(crate) fn adopt_incoming(
    t: *mut ThreadContext,
    state: &ConnState,
    data: &[u8; 2 * MAX_CAPTURE],
    n: u32,
) {
    if !trusted(&state.tuple) {
        return;
    }
    // "\ntraceparent: 00-" then 32 hex digits: the line must start within the first 460
    // bytes to be read whole.
    const TRACEPAR: u64 = u64::from_le_bytes(*b"tracepar");
    const ENT_00: u64 = u64::from_le_bytes(*b"ent: 00-");
    let limit = n.saturating_sub(64);
    let mut found = 0usize;
    let mut i = 0usize;
    while i < 448 {
        if i as u32 >= limit {
            return;
        }
        if data[i] == b'\n'
            && lower8_at(data, i + 1) == TRACEPAR
            && lower8_at(data, i + 9) == ENT_00 | 0x2020_2020_2020_2020
        {
            found = i + 17;
            break;
        }
        i += 1;
    }
    if found == 0 {
        return;
    }
    let v = found & 511;
    if v + 32 > 512 {
        return;
    }
    // Copied unchecked, by one helper call: checking 32 digits here, after a search that
    // can end at any of 448 places, cost the verifier a walk per place. The injector checks
    // them before use (`trace_of_thread`).
    // SAFETY: 32 bytes within the array into a map value of 32 bytes.
    unsafe {
        if bpf_probe_read_kernel(
            (*t).trace_hex.as_mut_ptr().cast(),
            32,
            data.as_ptr().add(v).cast(),
        ) == 0
        {
            (*t).has_trace = 1;
            (*t).flags = inject_flags::FROM_INCOMING_HEADER;
        }
    }
}
