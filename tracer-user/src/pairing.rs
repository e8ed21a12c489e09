//! Per-connection reassembly of HTTP/1.x messages from syscall records, and pairing of each
//! response with its request.
//!
//! The probes send one record per data syscall: how many bytes moved (`len`) and a captured
//! prefix of them (`payload`, possibly short or empty). Each connection is two byte streams, one
//! per direction, and records of one connection arrive in order; so each stream is walked with a
//! cursor that advances by `len`, reading bytes only where a head must be parsed (bodies are
//! skipped by length, so they need not be captured). Requests are queued FIFO and each response
//! pops the oldest: HTTP/1.x answers in order, which covers keep-alive and pipelining.
//!
//! A "message" is a run of records in one direction. The kernel captures a budget of bytes per
//! message, so a direction change is the natural point to resynchronize after losing track.

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasherDefault,
};

use tracer_common::direction::{EGRESS, INGRESS};

use crate::{
    context::RemoteContext,
    hashing::IdentityHasher,
    http::{self, Parse, RequestHead, RequestText, ResponseHead, Sniff},
};

/// The linker's key for a request's span (its span id); 0 when there is no linker.
pub type SpanKey = u64;

/// A request whose head was just parsed, as the linker needs it.
pub struct RequestStart<'a> {
    /// The thread that read (server) or wrote (client) its first byte.
    pub tid: u32,
    /// The TCP sequence number of its first byte, when the probes read it.
    pub tcp_seq: Option<u32>,
    pub start_ns: u64,
    pub text: &'a RequestText,
    pub context: Option<RemoteContext>,
}

/// Told about requests as their heads are parsed and as their responses begin, in record
/// order: which requests a process is serving at the moment it makes a call elsewhere is what
/// links a server span to the client spans it causes.
pub trait Observer {
    /// A request head was parsed; returns the key of its span.
    fn request(&mut self, conn: ConnId, role: Role, req: &RequestStart<'_>) -> SpanKey;
    /// The response to the request of `span` began.
    fn answered(&mut self, conn: ConnId, role: Role, span: SpanKey);
}

/// No linking (unit tests of the pairing alone).
impl Observer for () {
    fn request(&mut self, _: ConnId, _: Role, _: &RequestStart<'_>) -> SpanKey {
        0
    }
    fn answered(&mut self, _: ConnId, _: Role, _: SpanKey) {}
}

/// Caller-assigned unique id of a connection, already well mixed (see `agent::conn_id`).
pub type ConnId = u64;

/// A map keyed by connection id. The ids are hashes already, so they are used as they are:
/// SipHash on every record was a measurable share of the agent's time.
pub type ConnMap<V> = HashMap<ConnId, V, BuildHasherDefault<IdentityHasher>>;

/// Captured bytes of one head buffered across records; beyond this the message is given up
/// (real heads are a few hundred bytes, and the probes capture 2 KiB per message anyway).
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Idle timeouts after which outstanding requests are given up and the connection forgotten.
/// Long enough that a slow backend is still paired, short enough that connections whose close
/// the probes never saw (the process exited) do not pile up.
const EXPIRY_FACTOR: u64 = 10;

/// Requests waiting for a response on one connection. Real pipelines are a handful deep; a
/// longer queue means responses are being missed, and the oldest are given up.
const MAX_PENDING: usize = 64;

/// What the traced process is on a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Reads requests, writes responses.
    Server,
    /// Writes requests, reads responses.
    Client,
}

impl Role {
    fn request_direction(self) -> u32 {
        match self {
            Role::Server => INGRESS,
            Role::Client => EGRESS,
        }
    }
}

/// One data record of a connection, as the probes reported it.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// `tracer_common::direction::{INGRESS, EGRESS}`.
    pub direction: u32,
    pub ts_enter: u64,
    pub ts_exit: u64,
    /// Bytes the syscall moved.
    pub len: u64,
    /// Captured prefix of those bytes.
    pub payload: &'a [u8],
    /// The thread that made the syscall.
    pub tid: u32,
    /// TCP sequence number of the first byte, when the probes read it (at message starts).
    pub tcp_seq: Option<u32>,
}

impl Chunk<'_> {
    /// The payload, never claimed longer than what the syscall moved.
    fn captured(&self) -> &[u8] {
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        &self.payload[..self.payload.len().min(len)]
    }

    /// Some bytes of the record were not captured.
    fn has_hole(&self) -> bool {
        (self.captured().len() as u64) < self.len
    }

    /// When bytes of this record begin a request. Read data exists once the read returns;
    /// written data exists (from the caller's point of view) once the write is issued.
    fn request_start(&self) -> u64 {
        if self.direction == INGRESS {
            self.ts_exit
        } else {
            self.ts_enter
        }
    }
}

/// One request and its response.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange {
    pub conn: ConnId,
    pub role: Role,
    pub request: RequestText,
    /// `None` if the connection closed or went quiet before a response.
    pub status: Option<u16>,
    /// Server: exit of the read that brought the first request byte. Client: entry of the write
    /// that sent it.
    pub start_ns: u64,
    /// Exit of the syscall that moved the last response byte; for a request without response,
    /// when it was given up.
    pub end_ns: u64,
    /// Head and body of the request, as counted by the syscalls.
    pub request_bytes: u64,
    /// Head and body of the response, interim (1xx) heads included.
    pub response_bytes: u64,
    /// The linker's key for this exchange's span.
    pub span: SpanKey,
    /// TCP sequence number of the request's first byte.
    pub tcp_seq: Option<u32>,
}

/// Turns the records of many connections into exchanges.
pub struct Pairer {
    idle_timeout_ns: u64,
    conns: ConnMap<Conn>,
    parse_failures: u64,
}

impl Pairer {
    /// `idle_timeout_ns`: quiet time after which a response whose end cannot be known is
    /// considered finished.
    #[must_use]
    pub fn new(idle_timeout_ns: u64) -> Self {
        Pairer {
            idle_timeout_ns,
            conns: ConnMap::default(),
            parse_failures: 0,
        }
    }

    /// Feeds one record; completed exchanges are pushed to `out`, requests and responses as
    /// they begin are told to `observer`.
    pub fn on_chunk(
        &mut self,
        conn: ConnId,
        chunk: &Chunk,
        out: &mut Vec<Exchange>,
        observer: &mut dyn Observer,
    ) {
        if chunk.len == 0 || (chunk.direction != INGRESS && chunk.direction != EGRESS) {
            return;
        }
        let state = self.conns.entry(conn).or_insert_with(Conn::new);
        let mut cx = Cx {
            id: conn,
            failures: &mut self.parse_failures,
            out,
            observer,
        };
        state.on_chunk(chunk, &mut cx);
    }

    /// The connection closed at `ts`: a response running until the end ends here, requests
    /// still waiting are reported without status, and the state is dropped.
    pub fn on_close(&mut self, conn: ConnId, ts: u64, out: &mut Vec<Exchange>) {
        if let Some(mut state) = self.conns.remove(&conn) {
            state.flush(conn, ts, out);
        }
    }

    /// Call periodically with the monotonic time. After `idle_timeout_ns` of quiet, a response
    /// whose end cannot be known is reported as ending with its last record; after ten times
    /// that, waiting requests are reported without status and the connection is forgotten.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Exchange>) {
        let idle = self.idle_timeout_ns;
        let expiry = idle.saturating_mul(EXPIRY_FACTOR);
        self.conns.retain(|&id, state| {
            let quiet = now.saturating_sub(state.last_ns);
            if quiet >= expiry {
                state.flush(id, now, out);
                return false;
            }
            if quiet >= idle {
                state.report_open_response(id, out);
            }
            true
        });
    }

    /// True once the connection was found not to speak HTTP/1.x (or to have switched to
    /// another protocol): the caller should stop tracing it.
    #[must_use]
    pub fn is_not_http(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| matches!(c.phase, Phase::NotHttp))
    }

    /// Drops the state of a connection without reporting anything.
    pub fn forget(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// Connections with state, not-HTTP ones included.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Heads given up: cut by uncaptured bytes, unfinished at a direction change, too long, or
    /// malformed on a connection already known to be HTTP.
    #[must_use]
    pub fn parse_failures(&self) -> u64 {
        self.parse_failures
    }
}

/// What a record's processing may need besides the connection's own state.
struct Cx<'a> {
    id: ConnId,
    failures: &'a mut u64,
    out: &'a mut Vec<Exchange>,
    observer: &'a mut dyn Observer,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// No request seen yet. `skip`: the current message cannot start a request (its start was
    /// not captured, or it is a response); wait for the next one.
    Detect {
        skip: bool,
    },
    Http(Role),
    /// Not HTTP/1.x, or upgraded to another protocol: records are ignored.
    NotHttp,
}

/// Where the request stream is.
#[derive(Clone, Copy, Debug)]
enum ReqState {
    Head,
    /// Skipping the body of the request numbered `seq`.
    Body {
        remaining: u64,
        seq: u64,
    },
    Chunked {
        decoder: ChunkDecoder,
        seq: u64,
    },
    /// Lost track: ignore this direction until the next direction change.
    Resync,
}

/// Where the response stream is. Every state but `Head` and `Resync` has an `Active` response.
#[derive(Clone, Copy, Debug)]
enum RespState {
    Head,
    Length(u64),
    Chunked(ChunkDecoder),
    /// The end cannot be known from the bytes: runs until the next request, the close or
    /// an idle timeout.
    Open,
    Resync,
}

/// A request waiting for (or receiving) its response.
#[derive(Debug)]
struct Pending {
    seq: u64,
    start_ns: u64,
    bytes: u64,
    /// `None` for a request whose head was lost: it keeps its place in the queue so that the
    /// responses after it still pair with the right requests, but is never reported.
    info: Option<RequestText>,
    span: SpanKey,
    tcp_seq: Option<u32>,
}

impl Pending {
    fn method_is(&self, method: &str) -> bool {
        self.info.as_ref().is_some_and(|i| i.method() == method)
    }

    fn into_exchange(
        self,
        conn: ConnId,
        role: Role,
        status: Option<u16>,
        end_ns: u64,
        response_bytes: u64,
    ) -> Option<Exchange> {
        let info = self.info?;
        Some(Exchange {
            conn,
            role,
            request: info,
            status,
            start_ns: self.start_ns,
            end_ns: end_ns.max(self.start_ns),
            request_bytes: self.bytes,
            response_bytes,
            span: self.span,
            tcp_seq: self.tcp_seq,
        })
    }
}

/// The response whose body is being walked.
#[derive(Debug)]
struct Active {
    /// `None` if there was no request to pair with, or once already reported (an open-ended
    /// response reported on idle keeps being walked so that the stream stays in step).
    req: Option<Pending>,
    status: u16,
    bytes: u64,
    /// Exit of the last record that carried bytes of this response.
    last_ns: u64,
}

struct Conn {
    phase: Phase,
    /// Direction of the previous record (0 before the first).
    last_dir: u32,
    /// Exit of the latest record: the connection's last activity.
    last_ns: u64,
    /// Captured bytes of a head that spans records. Only one head can be in progress at a time,
    /// since an unfinished head is given up when the direction changes.
    head_buf: Vec<u8>,
    /// Start of the request whose head is in progress: time, TCP sequence number, thread.
    head_start_ns: u64,
    head_start_seq: Option<u32>,
    head_start_tid: u32,
    /// TCP sequence number of the next byte in each direction (`INGRESS`, `EGRESS`), counted
    /// from the last record that carried one; and that of the current record's first byte.
    stream_seq: [Option<u32>; 2],
    record_seq: Option<u32>,
    req: ReqState,
    resp: RespState,
    pending: VecDeque<Pending>,
    active: Option<Active>,
    /// Bytes of interim (1xx) heads, charged to the final response that follows them.
    interim_bytes: u64,
    next_seq: u64,
}

/// How a head progressed over one record.
enum HeadStep<T> {
    /// `consumed`: bytes of this record that belonged to the head.
    Done {
        head: T,
        consumed: usize,
    },
    NeedMore,
    /// Cut by uncaptured bytes, too long, or malformed.
    Failed,
}

trait Head {
    fn head_len(&self) -> usize;
}

impl Head for RequestHead {
    fn head_len(&self) -> usize {
        self.head_len
    }
}

impl Head for ResponseHead {
    fn head_len(&self) -> usize {
        self.head_len
    }
}

/// Advances a head over the captured bytes `avail` of a record. `hole_after`: the record goes on
/// past `avail` with bytes that were not captured.
///
/// The common case, a whole head inside one record, is parsed in place; bytes are copied into
/// `buf` only when a head continues in the next record.
fn head_step<T: Head>(
    buf: &mut Vec<u8>,
    avail: &[u8],
    hole_after: bool,
    parse: fn(&[u8]) -> Parse<T>,
) -> HeadStep<T> {
    if avail.is_empty() {
        buf.clear();
        return HeadStep::Failed;
    }
    let buffered = buf.len();
    let result = if buffered == 0 {
        parse(avail)
    } else {
        let take = avail.len().min(MAX_HEAD_BYTES.saturating_sub(buffered));
        buf.extend_from_slice(&avail[..take]);
        parse(buf)
    };
    match result {
        Parse::Complete(head) => {
            buf.clear();
            let consumed = head.head_len().saturating_sub(buffered).min(avail.len());
            HeadStep::Done { head, consumed }
        }
        Parse::Partial => {
            let held = if buffered == 0 {
                avail.len()
            } else {
                buf.len()
            };
            if hole_after || held >= MAX_HEAD_BYTES {
                buf.clear();
                return HeadStep::Failed;
            }
            if buffered == 0 {
                buf.extend_from_slice(avail);
            }
            HeadStep::NeedMore
        }
        Parse::Invalid => {
            buf.clear();
            HeadStep::Failed
        }
    }
}

/// The captured bytes from `pos` on.
fn captured_from(payload: &[u8], pos: u64) -> &[u8] {
    usize::try_from(pos)
        .ok()
        .and_then(|p| payload.get(p..))
        .unwrap_or_default()
}

impl Conn {
    fn new() -> Self {
        Conn {
            phase: Phase::Detect { skip: false },
            last_dir: 0,
            last_ns: 0,
            head_buf: Vec::new(),
            head_start_ns: 0,
            head_start_seq: None,
            head_start_tid: 0,
            stream_seq: [None; 2],
            record_seq: None,
            req: ReqState::Head,
            resp: RespState::Head,
            pending: VecDeque::new(),
            active: None,
            interim_bytes: 0,
            next_seq: 0,
        }
    }

    fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) {
        self.last_ns = self.last_ns.max(chunk.ts_exit);
        if matches!(self.phase, Phase::NotHttp) {
            return;
        }
        let cursor = &mut self.stream_seq[usize::from(chunk.direction == EGRESS)];
        self.record_seq = chunk.tcp_seq.or(*cursor);
        *cursor = self.record_seq.map(|s| s.wrapping_add(chunk.len as u32));
        if chunk.direction != self.last_dir {
            self.direction_changed(cx);
            self.last_dir = chunk.direction;
        }
        match self.phase {
            Phase::Detect { skip: false } => self.detect(chunk, cx),
            Phase::Detect { skip: true } | Phase::NotHttp => {}
            Phase::Http(role) if chunk.direction == role.request_direction() => {
                self.request_record(role, chunk, cx);
            }
            Phase::Http(role) => self.response_record(role, chunk, cx),
        }
    }

    fn direction_changed(&mut self, cx: &mut Cx) {
        if !self.head_buf.is_empty() {
            self.head_buf.clear();
            if let Phase::Http(role) = self.phase {
                *cx.failures = cx.failures.saturating_add(1);
                if self.last_dir == role.request_direction() {
                    self.push_lost_request(role, cx);
                } else {
                    self.response_lost();
                }
            }
        }
        if let Phase::Detect { skip } = &mut self.phase {
            *skip = false;
        }
        if matches!(self.req, ReqState::Resync) {
            self.req = ReqState::Head;
        }
        if matches!(self.resp, RespState::Resync) {
            self.resp = RespState::Head;
        }
    }

    /// Looks at the first bytes of a message until one starts a request, which decides the role.
    fn detect(&mut self, chunk: &Chunk, cx: &mut Cx) {
        let payload = chunk.captured();
        let mut probe = [0u8; 8];
        let from_buf = self.head_buf.len().min(probe.len());
        probe[..from_buf].copy_from_slice(&self.head_buf[..from_buf]);
        let from_payload = payload.len().min(probe.len() - from_buf);
        probe[from_buf..from_buf + from_payload].copy_from_slice(&payload[..from_payload]);
        let probe = &probe[..from_buf + from_payload];
        if probe.is_empty() {
            // The message starts with bytes nobody saw; judging its middle would be a guess.
            self.phase = Phase::Detect { skip: true };
            return;
        }
        match http::sniff(probe) {
            Sniff::Request => {
                let role = if chunk.direction == INGRESS {
                    Role::Server
                } else {
                    Role::Client
                };
                self.phase = Phase::Http(role);
                self.request_record(role, chunk, cx);
            }
            Sniff::Undecided if !chunk.has_hole() => {
                if self.head_buf.is_empty() {
                    self.head_start(chunk, 0);
                }
                self.head_buf.extend_from_slice(payload);
            }
            // Joined in the middle of a conversation (a response), or lost the rest of a short
            // prefix: the next message may start a request.
            Sniff::Response | Sniff::Undecided => {
                self.head_buf.clear();
                self.phase = Phase::Detect { skip: true };
            }
            Sniff::Other => self.mark_not_http(),
        }
    }

    fn request_record(&mut self, role: Role, chunk: &Chunk, cx: &mut Cx) {
        let payload = chunk.captured();
        let len = chunk.len;
        let mut pos = 0u64;
        while pos < len {
            match &mut self.req {
                ReqState::Resync => return,
                ReqState::Body { remaining, seq } => {
                    let (take, seq) = ((*remaining).min(len - pos), *seq);
                    *remaining -= take;
                    if *remaining == 0 {
                        self.req = ReqState::Head;
                    }
                    pos += take;
                    self.add_request_bytes(seq, take);
                }
                ReqState::Chunked { decoder, seq } => {
                    let seq = *seq;
                    let step = decoder.advance(captured_from(payload, pos), len - pos);
                    pos += step.consumed;
                    self.add_request_bytes(seq, step.consumed);
                    match step.outcome {
                        Outcome::More => {}
                        Outcome::Done => self.req = ReqState::Head,
                        // Where this body ends, and so where the next request starts, is lost.
                        Outcome::Lost => self.req = ReqState::Resync,
                    }
                }
                ReqState::Head => {
                    if self.head_buf.is_empty() {
                        self.head_start(chunk, pos);
                        // A new request means the previous response is over.
                        if matches!(self.resp, RespState::Open) {
                            self.resp = RespState::Head;
                            self.finish_response(role, None, cx);
                        }
                    }
                    let avail = captured_from(payload, pos);
                    let step = head_step(
                        &mut self.head_buf,
                        avail,
                        chunk.has_hole(),
                        http::parse_request,
                    );
                    match step {
                        HeadStep::Done { head, consumed } => {
                            pos += consumed as u64;
                            self.push_request(role, head, cx);
                        }
                        HeadStep::NeedMore => return,
                        HeadStep::Failed => {
                            *cx.failures = cx.failures.saturating_add(1);
                            self.push_lost_request(role, cx);
                            self.req = ReqState::Resync;
                            return;
                        }
                    }
                }
            }
        }
    }

    fn response_record(&mut self, role: Role, chunk: &Chunk, cx: &mut Cx) {
        let payload = chunk.captured();
        let len = chunk.len;
        let end_ns = chunk.ts_exit;
        let mut pos = 0u64;
        while pos < len {
            match &mut self.resp {
                RespState::Resync => return,
                RespState::Length(remaining) => {
                    let take = (*remaining).min(len - pos);
                    *remaining -= take;
                    let done = *remaining == 0;
                    pos += take;
                    self.add_response_bytes(take, end_ns);
                    if done {
                        self.resp = RespState::Head;
                        self.finish_response(role, Some(end_ns), cx);
                    }
                }
                RespState::Chunked(decoder) => {
                    let step = decoder.advance(captured_from(payload, pos), len - pos);
                    pos += step.consumed;
                    self.add_response_bytes(step.consumed, end_ns);
                    match step.outcome {
                        Outcome::More => {}
                        Outcome::Done => {
                            self.resp = RespState::Head;
                            self.finish_response(role, Some(end_ns), cx);
                        }
                        Outcome::Lost => self.resp = RespState::Open,
                    }
                }
                RespState::Open => {
                    self.add_response_bytes(len - pos, end_ns);
                    pos = len;
                }
                RespState::Head => {
                    let avail = captured_from(payload, pos);
                    let step = head_step(
                        &mut self.head_buf,
                        avail,
                        chunk.has_hole(),
                        http::parse_response,
                    );
                    match step {
                        HeadStep::Done { head, consumed } => {
                            pos += consumed as u64;
                            if !self.start_response(role, &head, end_ns, cx) {
                                return;
                            }
                        }
                        HeadStep::NeedMore => return,
                        HeadStep::Failed => {
                            *cx.failures = cx.failures.saturating_add(1);
                            self.response_lost();
                            self.resp = RespState::Resync;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// A request head begins `pos` bytes into this record.
    fn head_start(&mut self, chunk: &Chunk, pos: u64) {
        self.head_start_ns = chunk.request_start();
        self.head_start_seq = self.record_seq.map(|s| s.wrapping_add(pos as u32));
        self.head_start_tid = chunk.tid;
    }

    fn push_request(&mut self, role: Role, head: RequestHead, cx: &mut Cx) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.req = if head.chunked {
            ReqState::Chunked {
                decoder: ChunkDecoder::START,
                seq,
            }
        } else {
            match head.content_length {
                Some(n) if n > 0 => ReqState::Body { remaining: n, seq },
                // RFC 9112 6.3: a request without length or chunking has no body.
                _ => ReqState::Head,
            }
        };
        let span = cx.observer.request(
            cx.id,
            role,
            &RequestStart {
                tid: self.head_start_tid,
                tcp_seq: self.head_start_seq,
                start_ns: self.head_start_ns,
                text: &head.text,
                context: head.context,
            },
        );
        self.enqueue(role, seq, head.head_len as u64, Some(head.text), span, cx);
    }

    fn push_lost_request(&mut self, role: Role, cx: &mut Cx) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.enqueue(role, seq, 0, None, 0, cx);
    }

    fn enqueue(
        &mut self,
        role: Role,
        seq: u64,
        bytes: u64,
        info: Option<RequestText>,
        span: SpanKey,
        cx: &mut Cx,
    ) {
        if self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self.pending.pop_front() {
                let given_up = self.last_ns;
                cx.out
                    .extend(oldest.into_exchange(cx.id, role, None, given_up, 0));
            }
        }
        self.pending.push_back(Pending {
            seq,
            start_ns: self.head_start_ns,
            bytes,
            info,
            span,
            tcp_seq: self.head_start_seq,
        });
    }

    /// A response head was lost: the request it answered will never be paired.
    fn response_lost(&mut self) {
        self.pending.pop_front();
        self.interim_bytes = 0;
    }

    /// Handles a complete response head ending in the record that exits at `ts`. Returns false
    /// when the connection stops being HTTP.
    fn start_response(&mut self, role: Role, head: &ResponseHead, ts: u64, cx: &mut Cx) -> bool {
        let head_bytes = head.head_len as u64;
        // 101 is final: the protocol switches right after it.
        if (100..200).contains(&head.status) && head.status != 101 {
            self.interim_bytes = self.interim_bytes.saturating_add(head_bytes);
            return true;
        }
        let req = self.pending.pop_front();
        if let Some(r) = req.as_ref().filter(|r| r.span != 0) {
            cx.observer.answered(cx.id, role, r.span);
        }
        let no_body =
            req.as_ref().is_some_and(|r| r.method_is("HEAD")) || matches!(head.status, 204 | 304);
        let tunnel = head.status == 101
            || (req.as_ref().is_some_and(|r| r.method_is("CONNECT"))
                && (200..300).contains(&head.status));
        self.active = Some(Active {
            req,
            status: head.status,
            bytes: std::mem::take(&mut self.interim_bytes).saturating_add(head_bytes),
            last_ns: ts,
        });
        if tunnel {
            // What follows is another protocol (WebSocket, TLS through a proxy...).
            self.finish_response(role, Some(ts), cx);
            self.mark_not_http();
            return false;
        }
        self.resp = if no_body {
            RespState::Head
        } else if head.chunked {
            RespState::Chunked(ChunkDecoder::START)
        } else {
            match head.content_length {
                Some(0) => RespState::Head,
                Some(n) => RespState::Length(n),
                None => RespState::Open,
            }
        };
        if matches!(self.resp, RespState::Head) {
            self.finish_response(role, Some(ts), cx);
        }
        true
    }

    /// Reports the active response, ending at `end_ns` or else at its last record.
    fn finish_response(&mut self, role: Role, end_ns: Option<u64>, cx: &mut Cx) {
        if let Some(active) = self.active.take() {
            if let Some(req) = active.req {
                let end_ns = end_ns.unwrap_or(active.last_ns);
                let status = Some(active.status);
                cx.out
                    .extend(req.into_exchange(cx.id, role, status, end_ns, active.bytes));
            }
        }
    }

    /// Idle: a response whose end cannot be known is reported now, ending with its last record.
    /// It stays active (unpaired) so that further bytes of it are still walked as its own.
    fn report_open_response(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        let (Phase::Http(role), RespState::Open | RespState::Chunked(_)) = (self.phase, self.resp)
        else {
            return;
        };
        if let Some(active) = &mut self.active {
            if let Some(req) = active.req.take() {
                let status = Some(active.status);
                out.extend(req.into_exchange(conn, role, status, active.last_ns, active.bytes));
            }
        }
    }

    /// Reports everything still open: the active response ends with its last record, waiting
    /// requests end unanswered at `give_up_ns`.
    fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        let Phase::Http(role) = self.phase else {
            return;
        };
        if let Some(active) = self.active.take() {
            if let Some(req) = active.req {
                let status = Some(active.status);
                out.extend(req.into_exchange(conn, role, status, active.last_ns, active.bytes));
            }
        }
        for req in self.pending.drain(..) {
            out.extend(req.into_exchange(conn, role, None, give_up_ns, 0));
        }
    }

    fn add_request_bytes(&mut self, seq: u64, n: u64) {
        // The body's request is the newest one, unless a response already took it (a server
        // may answer before reading the whole body).
        if let Some(p) = self.pending.back_mut().filter(|p| p.seq == seq) {
            p.bytes = p.bytes.saturating_add(n);
        } else if let Some(p) = self
            .active
            .as_mut()
            .and_then(|a| a.req.as_mut())
            .filter(|p| p.seq == seq)
        {
            p.bytes = p.bytes.saturating_add(n);
        }
    }

    fn add_response_bytes(&mut self, n: u64, ts: u64) {
        if let Some(active) = &mut self.active {
            active.bytes = active.bytes.saturating_add(n);
            active.last_ns = ts;
        }
    }

    fn mark_not_http(&mut self) {
        self.phase = Phase::NotHttp;
        // Release the memory: the entry now only remembers the verdict.
        self.head_buf = Vec::new();
        self.pending = VecDeque::new();
        self.active = None;
    }
}

/// Walks a chunked body (RFC 9112 7.1) to find its end. Chunk data is skipped by length, so
/// only the size lines need to have been captured; when one was not, the end is lost.
#[derive(Clone, Copy, Debug)]
enum ChunkDecoder {
    Size {
        value: u64,
        digits: u8,
    },
    /// Extensions or whitespace after the size, up to the line end.
    Ext {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    Trailer {
        line_start: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// All the given bytes belong to the body, which goes on.
    More,
    /// The body ended after `consumed` bytes.
    Done,
    /// Uncaptured or malformed framing: the end of the body cannot be found.
    Lost,
}

struct Advance {
    consumed: u64,
    outcome: Outcome,
}

impl ChunkDecoder {
    const START: Self = ChunkDecoder::Size {
        value: 0,
        digits: 0,
    };

    /// Advances over the next `total` bytes of the stream, of which `captured` is a prefix.
    fn advance(&mut self, captured: &[u8], total: u64) -> Advance {
        let mut i = 0u64;
        while i < total {
            if let ChunkDecoder::Data(n) = *self {
                let take = n.min(total - i);
                i += take;
                *self = if take == n {
                    ChunkDecoder::DataCr
                } else {
                    ChunkDecoder::Data(n - take)
                };
                continue;
            }
            let Some(&b) = usize::try_from(i).ok().and_then(|k| captured.get(k)) else {
                return Advance {
                    consumed: i,
                    outcome: Outcome::Lost,
                };
            };
            i += 1;
            let next = match (*self, b) {
                (ChunkDecoder::Size { value, digits }, _) if b.is_ascii_hexdigit() => {
                    // 15 hex digits are already more than any real body.
                    if digits >= 15 {
                        return Advance {
                            consumed: i,
                            outcome: Outcome::Lost,
                        };
                    }
                    let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                    ChunkDecoder::Size {
                        value: value << 4 | digit,
                        digits: digits + 1,
                    }
                }
                (ChunkDecoder::Size { value, digits }, b';' | b' ' | b'\t') if digits > 0 => {
                    ChunkDecoder::Ext { value }
                }
                (ChunkDecoder::Size { value, digits }, b'\r') if digits > 0 => {
                    ChunkDecoder::SizeLf { value }
                }
                (ChunkDecoder::Size { value, digits }, b'\n') if digits > 0 => {
                    Self::after_size(value)
                }
                (ChunkDecoder::Ext { value } | ChunkDecoder::SizeLf { value }, b'\n') => {
                    Self::after_size(value)
                }
                (ChunkDecoder::Ext { value }, _) => ChunkDecoder::Ext { value },
                (ChunkDecoder::DataCr, b'\r') => ChunkDecoder::DataLf,
                (ChunkDecoder::DataCr | ChunkDecoder::DataLf, b'\n') => Self::START,
                (ChunkDecoder::Trailer { line_start: true }, b'\n') => {
                    return Advance {
                        consumed: i,
                        outcome: Outcome::Done,
                    };
                }
                (ChunkDecoder::Trailer { .. }, b'\n') => ChunkDecoder::Trailer { line_start: true },
                (ChunkDecoder::Trailer { line_start }, b'\r') => {
                    ChunkDecoder::Trailer { line_start }
                }
                (ChunkDecoder::Trailer { .. }, _) => ChunkDecoder::Trailer { line_start: false },
                _ => {
                    return Advance {
                        consumed: i,
                        outcome: Outcome::Lost,
                    }
                }
            };
            *self = next;
        }
        Advance {
            consumed: total,
            outcome: Outcome::More,
        }
    }

    fn after_size(value: u64) -> Self {
        if value == 0 {
            ChunkDecoder::Trailer { line_start: true }
        } else {
            ChunkDecoder::Data(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: u64 = 1_000_000;
    const C: ConnId = 7;

    /// Feeds records with explicit timestamps and collects what comes out.
    struct Run {
        p: Pairer,
        out: Vec<Exchange>,
    }

    impl Run {
        fn new() -> Self {
            Run {
                p: Pairer::new(IDLE),
                out: Vec::new(),
            }
        }

        /// A record whose payload is all of its bytes.
        fn rec(&mut self, dir: u32, enter: u64, exit: u64, bytes: &[u8]) {
            self.rec_len(dir, enter, exit, bytes.len() as u64, bytes);
        }

        /// A record that moved `len` bytes of which only `payload` was captured.
        fn rec_len(&mut self, dir: u32, enter: u64, exit: u64, len: u64, payload: &[u8]) {
            let chunk = Chunk {
                direction: dir,
                ts_enter: enter,
                ts_exit: exit,
                len,
                payload,
                tid: 1,
                tcp_seq: None,
            };
            self.p.on_chunk(C, &chunk, &mut self.out, &mut ());
        }

        fn take(&mut self) -> Vec<Exchange> {
            std::mem::take(&mut self.out)
        }
    }

    fn ex(
        role: Role,
        method: &str,
        path: &str,
        status: Option<u16>,
        span: (u64, u64),
        bytes: (u64, u64),
    ) -> Exchange {
        Exchange {
            conn: C,
            role,
            request: RequestText::new(method, path, None, None),
            status,
            start_ns: span.0,
            end_ns: span.1,
            request_bytes: bytes.0,
            response_bytes: bytes.1,
            span: 0,
            tcp_seq: None,
        }
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\n\r\n").into_bytes()
    }

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn server_keep_alive_three_exchanges() {
        let mut r = Run::new();
        let req1 = b"GET /a?x=1 HTTP/1.1\r\nHost: svc.test\r\nUser-Agent: t/1\r\n\r\n";
        r.rec(INGRESS, 100, 110, req1);
        let resp1 = ok("hello");
        r.rec(EGRESS, 120, 130, &resp1);
        r.rec(INGRESS, 200, 210, &get("/b"));
        // The response is written in two syscalls; the second carries the last byte.
        let resp2 = ok("0123456789");
        r.rec(EGRESS, 220, 225, &resp2[..resp2.len() - 4]);
        assert_eq!(r.out.len(), 1, "response 2 is not complete yet");
        r.rec(EGRESS, 226, 240, &resp2[resp2.len() - 4..]);
        r.rec(INGRESS, 300, 310, &get("/c"));
        let resp3 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        r.rec(EGRESS, 320, 330, resp3);

        let mut first = ex(
            Role::Server,
            "GET",
            "/a",
            Some(200),
            (110, 130),
            (req1.len() as u64, resp1.len() as u64),
        );
        first.request = RequestText::new("GET", "/a", Some("svc.test"), Some("t/1"));
        let n = |b: &[u8]| b.len() as u64;
        assert_eq!(
            r.take(),
            vec![
                first,
                ex(
                    Role::Server,
                    "GET",
                    "/b",
                    Some(200),
                    (210, 240),
                    (n(&get("/b")), n(&resp2))
                ),
                ex(
                    Role::Server,
                    "GET",
                    "/c",
                    Some(503),
                    (310, 330),
                    (n(&get("/c")), n(resp3))
                ),
            ]
        );
        assert_eq!(r.p.connections(), 1);
        assert_eq!(r.p.parse_failures(), 0);
        r.p.on_close(C, 400, &mut r.out);
        assert!(r.out.is_empty());
        assert_eq!(r.p.connections(), 0);
    }

    #[test]
    fn client_role() {
        let mut r = Run::new();
        let req = b"POST /submit HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\n\r\nabcd";
        r.rec(EGRESS, 1_000, 1_050, req);
        // The response arrives in two reads; the body ends in the second.
        let resp = b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\n\r\nab";
        r.rec(INGRESS, 1_100, 1_200, resp);
        r.rec(INGRESS, 1_300, 1_400, b"cdef");
        let mut want = ex(
            Role::Client,
            "POST",
            "/submit",
            Some(201),
            (1_000, 1_400),
            (req.len() as u64, resp.len() as u64 + 4),
        );
        want.request = RequestText::new("POST", "/submit", Some("api.test"), None);
        assert_eq!(r.take(), vec![want]);
    }

    #[test]
    fn split_head_over_three_reads() {
        let mut r = Run::new();
        let req = b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(req.len() > 20 && req.len() <= 30);
        r.rec(INGRESS, 10, 11, &req[..10]);
        r.rec(INGRESS, 12, 13, &req[10..20]);
        r.rec(INGRESS, 14, 15, &req[20..]);
        // The response head is split too.
        let resp = ok("xy");
        r.rec(EGRESS, 20, 21, &resp[..5]);
        r.rec(EGRESS, 22, 23, &resp[5..]);
        let mut want = ex(
            Role::Server,
            "GET",
            "/s",
            Some(200),
            (11, 23),
            (req.len() as u64, resp.len() as u64),
        );
        want.request = RequestText::new("GET", "/s", Some("h"), None);
        assert_eq!(r.take(), vec![want]);
        assert_eq!(r.p.parse_failures(), 0);
    }

    #[test]
    fn pipelined_requests_in_one_record() {
        let pipeline = [get("/1"), get("/2"), get("/3")].concat();
        let n = get("/1").len() as u64;

        // All responses in one record.
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &pipeline);
        let responses = [ok("a"), ok("bb"), ok("ccc")];
        r.rec(EGRESS, 30, 40, &responses.concat());
        let got = r.take();
        let paths: Vec<_> = got
            .iter()
            .map(|e| (e.request.path(), e.start_ns, e.end_ns))
            .collect();
        assert_eq!(paths, [("/1", 20, 40), ("/2", 20, 40), ("/3", 20, 40)]);
        for (e, resp) in got.iter().zip(&responses) {
            assert_eq!((e.request_bytes, e.response_bytes), (n, resp.len() as u64));
        }

        // One record per response.
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &pipeline);
        r.rec(EGRESS, 30, 31, &responses[0]);
        r.rec(EGRESS, 32, 33, &responses[1]);
        r.rec(EGRESS, 34, 35, &responses[2]);
        let got: Vec<_> = r
            .take()
            .into_iter()
            .map(|e| (e.request.path().to_owned(), e.end_ns, e.status))
            .collect();
        assert_eq!(
            got,
            [
                ("/1".into(), 31, Some(200)),
                ("/2".into(), 33, Some(200)),
                ("/3".into(), 35, Some(200))
            ]
        );
    }

    /// Each request's TCP sequence number is its first byte's: the probes give it at message
    /// starts, the pairer counts from there through pipelined requests, split heads and bodies.
    #[test]
    fn requests_carry_the_sequence_number_of_their_first_byte() {
        let mut r = Run::new();
        let feed = |r: &mut Run, dir, seq: Option<u32>, bytes: &[u8]| {
            let chunk = Chunk {
                direction: dir,
                ts_enter: 1,
                ts_exit: 2,
                len: bytes.len() as u64,
                payload: bytes,
                tid: 1,
                tcp_seq: seq,
            };
            r.p.on_chunk(C, &chunk, &mut r.out, &mut ());
        };
        let (a, b) = (get("/a"), get("/b"));
        let post = b"POST /c HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        // Two pipelined requests in one record near the wrap-around, then a split head.
        let start = u32::MAX - 10;
        feed(
            &mut r,
            INGRESS,
            Some(start),
            &[a.clone(), b.clone()].concat(),
        );
        feed(&mut r, INGRESS, None, &post[..20]);
        feed(&mut r, INGRESS, None, &post[20..]);
        feed(
            &mut r,
            EGRESS,
            Some(7),
            &[ok("1"), ok("2"), ok("3")].concat(),
        );
        // The next message: a record with a number again.
        feed(&mut r, INGRESS, Some(9000), &get("/d"));
        feed(&mut r, EGRESS, None, &ok("4"));
        let seqs: Vec<_> = r
            .take()
            .iter()
            .map(|e| (e.request.path().to_owned(), e.tcp_seq))
            .collect();
        let after_ab = start.wrapping_add((a.len() + b.len()) as u32);
        assert_eq!(
            seqs,
            [
                ("/a".into(), Some(start)),
                ("/b".into(), Some(start.wrapping_add(a.len() as u32))),
                ("/c".into(), Some(after_ab)),
                ("/d".into(), Some(9000)),
            ]
        );
        // Without numbers from the probes there is none to report.
        let mut r = Run::new();
        r.rec(INGRESS, 1, 2, &a);
        r.rec(EGRESS, 3, 4, &ok("1"));
        assert_eq!(r.take()[0].tcp_seq, None);
    }

    #[test]
    fn post_body_skipped_across_uncaptured_records() {
        let mut r = Run::new();
        let head = b"POST /upload HTTP/1.1\r\nContent-Length: 10000\r\n\r\n";
        // The first read brings the head and the start of the body, captured only partly.
        r.rec_len(
            INGRESS,
            10,
            20,
            head.len() as u64 + 4_000,
            &[&head[..], b"body"].concat(),
        );
        r.rec_len(INGRESS, 21, 30, 5_000, b"");
        r.rec_len(INGRESS, 31, 40, 1_000, b"zz");
        // The next request follows in the same message, right after the body.
        r.rec(INGRESS, 41, 50, &get("/next"));
        r.rec(EGRESS, 60, 70, &[ok("done"), ok("")].concat());
        let got = r.take();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].request.path(), got[0].request_bytes),
            ("/upload", head.len() as u64 + 10_000)
        );
        assert_eq!((got[0].start_ns, got[0].end_ns), (20, 70));
        assert_eq!((got[1].request.path(), got[1].start_ns), ("/next", 50));
        assert_eq!(r.p.parse_failures(), 0);
    }

    #[test]
    fn body_sent_with_sendfile_ends_at_that_record() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &get("/file.bin"));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n";
        r.rec(EGRESS, 30, 40, head);
        // sendfile: bytes moved, nothing captured.
        r.rec_len(EGRESS, 50, 60, 1_000_000, b"");
        assert!(r.out.is_empty());
        r.rec_len(EGRESS, 70, 90, 48_576, b"");
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].start_ns, got[0].end_ns), (20, 90));
        assert_eq!(got[0].response_bytes, head.len() as u64 + 1_048_576);
    }

    #[test]
    fn response_without_length_ends_at_close() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &get("/stream"));
        r.rec(EGRESS, 30, 40, b"HTTP/1.0 200 OK\r\n\r\npart one ");
        r.rec(EGRESS, 50, 60, b"part two");
        assert!(r.out.is_empty());
        r.p.on_close(C, 1_000, &mut r.out);
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].status, got[0].start_ns, got[0].end_ns),
            (Some(200), 20, 60)
        );
        assert_eq!(got[0].response_bytes, 36);
        assert_eq!(r.p.connections(), 0);
    }

    #[test]
    fn response_without_length_ends_at_idle_tick() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &get("/stream"));
        r.rec(
            EGRESS,
            30,
            40,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc",
        );
        r.rec(EGRESS, 50, 60, b"def");
        r.p.tick(60 + IDLE - 1, &mut r.out);
        assert!(r.out.is_empty(), "not idle long enough");
        r.p.tick(60 + IDLE, &mut r.out);
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].status, got[0].start_ns, got[0].end_ns),
            (Some(200), 20, 60)
        );
        // Reported once, even if the connection closes later.
        r.p.tick(60 + 2 * IDLE, &mut r.out);
        r.p.on_close(C, 60 + 3 * IDLE, &mut r.out);
        assert!(r.out.is_empty());
    }

    #[test]
    fn response_without_length_ends_at_next_request() {
        let mut r = Run::new();
        r.rec(EGRESS, 10, 20, &get("/a"));
        r.rec(
            INGRESS,
            30,
            40,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        );
        // The rest of the body is not captured: the terminating chunk cannot be seen.
        r.rec_len(INGRESS, 50, 60, 100, b"");
        r.rec(EGRESS, 70, 80, &get("/b"));
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].request.path(), got[0].start_ns, got[0].end_ns),
            ("/a", 10, 60)
        );
        r.rec(INGRESS, 90, 100, &ok("x"));
        assert_eq!(r.take()[0].request.path(), "/b");
    }

    #[test]
    fn chunked_response_ends_at_terminator() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &get("/c"));
        r.rec(
            EGRESS,
            30,
            40,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n",
        );
        r.rec(EGRESS, 50, 60, b"5;ext=1\r\npedia\r\n");
        assert!(r.out.is_empty());
        r.rec(EGRESS, 70, 80, b"0\r\nX-Trailer: t\r\n\r\n");
        r.rec(INGRESS, 90, 100, &get("/d"));
        r.rec(
            EGRESS,
            110,
            120,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        let got: Vec<_> = r
            .take()
            .into_iter()
            .map(|e| (e.request.path().to_owned(), e.end_ns))
            .collect();
        assert_eq!(got, [("/c".into(), 80), ("/d".into(), 120)]);
    }

    #[test]
    fn no_body_for_204_304_and_head() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, b"HEAD /h HTTP/1.1\r\n\r\n");
        // Content-Length of a HEAD response describes the body a GET would get.
        r.rec(
            EGRESS,
            30,
            40,
            b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n",
        );
        r.rec(INGRESS, 50, 60, &get("/nc"));
        r.rec(EGRESS, 70, 80, b"HTTP/1.1 204 No Content\r\n\r\n");
        r.rec(INGRESS, 90, 100, &get("/nm"));
        r.rec(
            EGRESS,
            110,
            120,
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        );
        let got: Vec<_> = r
            .take()
            .into_iter()
            .map(|e| {
                (
                    e.request.method().to_owned(),
                    e.request.path().to_owned(),
                    e.status,
                    e.end_ns,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("HEAD".into(), "/h".into(), Some(200), 40),
                ("GET".into(), "/nc".into(), Some(204), 80),
                ("GET".into(), "/nm".into(), Some(304), 120),
            ]
        );
    }

    #[test]
    fn server_errors_are_kept() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &get("/boom"));
        r.rec(
            EGRESS,
            30,
            40,
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n:(",
        );
        r.rec(INGRESS, 50, 60, &get("/gw"));
        r.rec(
            EGRESS,
            70,
            80,
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
        );
        let got: Vec<_> = r.take().into_iter().map(|e| e.status).collect();
        assert_eq!(got, [Some(500), Some(502)]);
    }

    #[test]
    fn continue_then_final_response() {
        let mut r = Run::new();
        let head = b"PUT /big HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        r.rec(EGRESS, 10, 20, head);
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        r.rec(INGRESS, 30, 40, interim);
        // The body goes out after the interim response, in a new message.
        r.rec(EGRESS, 50, 60, b"xyz");
        let last = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        r.rec(INGRESS, 70, 80, last);
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].status, got[0].start_ns, got[0].end_ns),
            (Some(201), 10, 80)
        );
        assert_eq!(got[0].request_bytes, head.len() as u64 + 3);
        assert_eq!(got[0].response_bytes, (interim.len() + last.len()) as u64);
    }

    #[test]
    fn unanswered_requests() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, &get("/slow"));
        r.p.tick(20 + 5 * IDLE, &mut r.out);
        assert!(r.out.is_empty(), "a slow backend is still waited for");
        r.p.tick(20 + EXPIRY_FACTOR * IDLE, &mut r.out);
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].status, got[0].end_ns),
            (None, 20 + EXPIRY_FACTOR * IDLE)
        );
        assert_eq!(r.p.connections(), 0);

        r.rec(INGRESS, 10, 20, &get("/cut"));
        r.p.on_close(C, 500, &mut r.out);
        let got = r.take();
        assert_eq!(
            (got[0].request.path(), got[0].status, got[0].end_ns),
            ("/cut", None, 500)
        );
    }

    #[test]
    fn tls_is_not_http() {
        let mut r = Run::new();
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x1b";
        r.rec(EGRESS, 10, 20, hello);
        assert!(r.p.is_not_http(C));
        r.rec(INGRESS, 30, 40, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76");
        r.rec(EGRESS, 50, 60, &get("/looks-like-http-but-inside-tls"));
        r.rec(INGRESS, 70, 80, &ok("x"));
        r.p.on_close(C, 90, &mut r.out);
        assert!(r.out.is_empty());
        assert_eq!(r.p.parse_failures(), 0);
        assert!(!r.p.is_not_http(C), "closed connections are forgotten");
    }

    #[test]
    fn upgrade_stops_parsing() {
        let mut r = Run::new();
        r.rec(
            INGRESS,
            10,
            20,
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        );
        r.rec(
            EGRESS,
            30,
            40,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        );
        let got = r.take();
        assert_eq!((got.len(), got[0].status), (1, Some(101)));
        assert!(r.p.is_not_http(C));
        r.p.forget(C);
        assert_eq!(r.p.connections(), 0);
    }

    #[test]
    fn hole_in_head_then_resync() {
        let mut r = Run::new();
        // The first request's head is cut: 300 bytes moved, 20 captured.
        r.rec_len(INGRESS, 10, 20, 300, b"GET /lost HTTP/1.1\r\n");
        assert_eq!(r.p.parse_failures(), 1);
        // Its response pairs with the lost request and is not reported.
        r.rec(EGRESS, 30, 40, &ok("lost"));
        r.rec(INGRESS, 50, 60, &get("/found"));
        r.rec(EGRESS, 70, 80, &ok("found"));
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].request.path(), got[0].start_ns, got[0].end_ns),
            ("/found", 60, 80)
        );
        assert_eq!(r.p.parse_failures(), 1);
        assert!(!r.p.is_not_http(C));
    }

    #[test]
    fn partial_head_at_direction_change_is_given_up() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
        r.rec(EGRESS, 30, 40, b"HTTP/1.1 200 OK\r\nContent-");
        // The response head never finishes: the next request starts.
        r.rec(INGRESS, 50, 60, &get("/b"));
        assert_eq!(r.p.parse_failures(), 1);
        r.rec(EGRESS, 70, 80, &ok(""));
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].request.path().to_owned(), "/b");
    }

    #[test]
    fn short_first_read_is_buffered_for_detection() {
        let mut r = Run::new();
        let req = get("/tiny");
        r.rec(EGRESS, 10, 11, &req[..2]);
        assert!(!r.p.is_not_http(C));
        r.rec(EGRESS, 12, 13, &req[2..]);
        r.rec(INGRESS, 20, 30, &ok(""));
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].role, got[0].start_ns, got[0].end_ns),
            (Role::Client, 10, 30)
        );
    }

    #[test]
    fn joining_mid_conversation_waits_for_a_request() {
        let mut r = Run::new();
        // The agent started while a response was being read: its start is not captured.
        r.rec_len(INGRESS, 10, 20, 100, b"");
        r.rec(INGRESS, 21, 22, b"tail of a body");
        r.rec(EGRESS, 30, 40, &get("/x"));
        r.rec(INGRESS, 50, 60, &ok("y"));
        assert!(!r.p.is_not_http(C));
        assert_eq!(r.take().len(), 1);
    }

    #[test]
    fn oversized_head_is_given_up() {
        let mut r = Run::new();
        r.rec(INGRESS, 10, 20, b"GET /big HTTP/1.1\r\n");
        let filler = format!("X-Filler: {}\r\n", "a".repeat(500));
        for i in 0..20 {
            r.rec(INGRESS, 21 + i, 22 + i, filler.as_bytes());
        }
        assert_eq!(r.p.parse_failures(), 1);
        r.rec(EGRESS, 100, 110, &ok(""));
        r.rec(INGRESS, 120, 130, &get("/small"));
        r.rec(EGRESS, 140, 150, &ok(""));
        let got = r.take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].request.path().to_owned(), "/small");
    }

    #[test]
    fn chunk_decoder_skips_uncaptured_data() {
        let mut d = ChunkDecoder::START;
        let a = d.advance(b"ff\r\n", 4 + 0xff);
        assert_eq!((a.consumed, a.outcome), (4 + 0xff, Outcome::More));
        let a = d.advance(b"\r\n0\r\n\r\nGET", 10);
        assert_eq!((a.consumed, a.outcome), (7, Outcome::Done));
        let mut d = ChunkDecoder::START;
        assert_eq!(d.advance(b"zz", 2).outcome, Outcome::Lost);
        let mut d = ChunkDecoder::START;
        assert_eq!(d.advance(b"", 5).outcome, Outcome::Lost);
    }

    #[test]
    fn never_panics_on_random_records() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\n",
            b"\r\n",
            b"\x16\x03\x01",
        ];
        let mut p = Pairer::new(100);
        let mut out = Vec::new();
        let mut now = 0;
        for _ in 0..50_000 {
            let conn = next() % 4;
            let piece = pieces[(next() % pieces.len() as u64) as usize];
            let cut = (next() as usize) % (piece.len() + 1);
            let payload = &piece[..cut];
            let len = match next() % 100 {
                0 => u64::MAX - next() % 4,
                1..=25 => cut as u64 + next() % 64,
                _ => cut as u64,
            };
            now += next() % 20;
            let chunk = Chunk {
                direction: (next() % 3) as u32,
                ts_enter: now,
                ts_exit: now + 1,
                len,
                payload,
                tid: (next() % 3) as u32,
                tcp_seq: (next() % 2 == 0).then(|| next() as u32),
            };
            p.on_chunk(conn, &chunk, &mut out, &mut ());
            match next() % 64 {
                0 => p.on_close(conn, now, &mut out),
                1 => p.tick(now, &mut out),
                2 => p.forget(conn),
                _ => {}
            }
            for e in out.drain(..) {
                assert!(e.start_ns <= e.end_ns);
            }
        }
        assert!(p.connections() <= 4);
    }
}
