//! HTTP/1.x: framing each direction of a connection into messages, pairing each response with
//! its request, and what the span of an exchange says (the HTTP semantic conventions).
//!
//! Each stream is walked with a cursor that advances by the bytes each syscall moved, reading
//! bytes only where a head must be parsed (bodies are skipped by length, so they need not be
//! captured). Requests are queued FIFO and each response pops the oldest: HTTP/1.x answers in
//! order, which covers keep-alive and pipelining.

mod chunked;
pub mod head;
pub(crate) mod memo;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use self::{
    chunked::{ChunkDecoder, Outcome},
    head::{RequestHead, RequestText, ResponseHead, Sniff},
};
use crate::{
    pairing::{
        captured_from, head_step, Chunk, ConnId, Cx, Exchange, Head, HeadStep, Mark, RequestStart,
        Role, SpanKey, MAX_PENDING,
    },
    protocol::{self, Detection},
    spans::{Endpoints, Value},
};

/// Recognises the first bytes of a connection's first message: a request (from a well-known
/// method), or a response (joined mid-conversation: wait for the next request).
pub(crate) fn detect(probe: &[u8], direction: u32) -> Detection {
    match head::sniff(probe) {
        Sniff::Request => {
            Detection::Found(protocol::Protocol::Http1, Role::sending_requests(direction))
        }
        Sniff::Response => Detection::NotAStart,
        Sniff::Undecided => Detection::Undecided,
        Sniff::Other => Detection::Nothing,
    }
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
        let request = self.info?;
        Some(Exchange {
            conn,
            role,
            detail: protocol::Detail::Http(Detail { request, status }),
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

/// The HTTP/1.x state of one connection: where each stream is, and the requests waiting for
/// their responses.
pub(crate) struct Session {
    role: Role,
    /// Captured bytes of a head that spans records. Only one head can be in progress at a time,
    /// since an unfinished head is given up when the direction changes.
    head_buf: Vec<u8>,
    /// Where the request whose head is in progress began.
    head_start: Mark,
    req: ReqState,
    resp: RespState,
    pending: VecDeque<Pending>,
    active: Option<Active>,
    /// Bytes of interim (1xx) heads, charged to the final response that follows them.
    interim_bytes: u64,
    next_seq: u64,
    /// This end's requests and responses kept for the connection's other end (`memo`).
    kept_requests: memo::Keeper,
    kept_responses: memo::Keeper,
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

impl Session {
    /// A connection whose first request was recognised; `buffered`: its first bytes, held by
    /// detection, that began at `start`.
    pub(crate) fn start(role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        Session {
            role,
            head_buf: buffered,
            head_start: start,
            req: ReqState::Head,
            resp: RespState::Head,
            pending: VecDeque::new(),
            active: None,
            interim_bytes: 0,
            next_seq: 0,
            kept_requests: memo::Keeper::default(),
            kept_responses: memo::Keeper::default(),
        }
    }

    pub(crate) fn role(&self) -> Role {
        self.role
    }

    /// Whether the connection still speaks HTTP/1.x after this record (not after an upgrade or
    /// a tunnel), or goes on in HTTP/2.
    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> Flow {
        let role = self.role;
        if chunk.direction == role.request_direction() {
            self.request_record(role, chunk, cx);
            Flow::Speaking
        } else {
            self.response_record(role, chunk, cx)
        }
    }

    /// The direction changed; the previous record went `last_dir`.
    pub(crate) fn direction_changed(&mut self, last_dir: u32, cx: &mut Cx) {
        if !self.head_buf.is_empty() {
            self.head_buf.clear();
            cx.failed();
            if last_dir == self.role.request_direction() {
                self.push_lost_request(self.role, cx);
            } else {
                self.response_lost();
            }
        }
        if matches!(self.req, ReqState::Resync) {
            self.req = ReqState::Head;
        }
        if matches!(self.resp, RespState::Resync) {
            self.resp = RespState::Head;
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
                        self.head_start = Mark::at(chunk, cx.record_seq, pos);
                        // A new request means the previous response is over.
                        if matches!(self.resp, RespState::Open) {
                            self.resp = RespState::Head;
                            self.finish_response(role, None, cx);
                        }
                    }
                    let avail = captured_from(payload, pos);
                    let (seq, on_host) = (self.head_start.seq, cx.observer.peer_on_host());
                    let (memo, keeper) = (&mut *cx.http_memo, &mut self.kept_requests);
                    let step = head_step(&mut self.head_buf, avail, chunk.has_hole(), |buf| {
                        memo.request(seq, on_host, keeper, buf)
                    });
                    match step {
                        HeadStep::Done { head, consumed } => {
                            pos += consumed as u64;
                            self.push_request(role, head, cx);
                        }
                        HeadStep::NeedMore => return,
                        HeadStep::Failed => {
                            cx.failed();
                            self.push_lost_request(role, cx);
                            self.req = ReqState::Resync;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Whether the connection still speaks HTTP/1.x after this response record.
    fn response_record(&mut self, role: Role, chunk: &Chunk, cx: &mut Cx) -> Flow {
        let payload = chunk.captured();
        let len = chunk.len;
        let end_ns = chunk.ts_exit;
        let mut pos = 0u64;
        while pos < len {
            match &mut self.resp {
                RespState::Resync => return Flow::Speaking,
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
                    // Where a head that began in an earlier record started is not kept: such
                    // a head is parsed, not looked up.
                    let seq = (cx.record_seq)
                        .filter(|_| self.head_buf.is_empty())
                        .map(|s| s.wrapping_add(pos as u32));
                    let on_host = cx.observer.peer_on_host();
                    let (memo, keeper) = (&mut *cx.http_memo, &mut self.kept_responses);
                    let step = head_step(&mut self.head_buf, avail, chunk.has_hole(), |buf| {
                        memo.response(seq, on_host, keeper, buf)
                    });
                    match step {
                        HeadStep::Done { head, consumed } => {
                            pos += consumed as u64;
                            if head.status == 101 && head.upgrade_h2c {
                                return self.upgrade_to_h2c(pos);
                            }
                            if !self.start_response(role, &head, end_ns, cx) {
                                return Flow::Stopped;
                            }
                        }
                        HeadStep::NeedMore => return Flow::Speaking,
                        HeadStep::Failed => {
                            cx.failed();
                            self.response_lost();
                            self.resp = RespState::Resync;
                            return Flow::Speaking;
                        }
                    }
                }
            }
        }
        Flow::Speaking
    }

    /// A 101 to `Upgrade: h2c` whose head ended `consumed` bytes into its record: the request
    /// it answers becomes stream 1 of the HTTP/2 connection that follows (RFC 7540, 3.2), whose
    /// response says its status. Nothing is reported for the 101 itself.
    fn upgrade_to_h2c(&mut self, consumed: u64) -> Flow {
        // The request must be whole (its body sent) and the only one waiting: HTTP/2 frames
        // follow it directly.
        if !matches!(self.req, ReqState::Head) || self.pending.len() != 1 {
            return Flow::Stopped;
        }
        let stream_1 = self.pending.pop_front().and_then(|p| {
            Some(UpgradedRequest {
                request: p.info?,
                span: p.span,
                start_ns: p.start_ns,
                tcp_seq: p.tcp_seq,
                request_bytes: p.bytes,
            })
        });
        Flow::H2c { stream_1, consumed }
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
                tid: self.head_start.tid,
                tcp_seq: self.head_start.seq,
                start_ns: self.head_start.ns,
                operation: head.text.method(),
                target: head.text.path(),
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
                let given_up = cx.last_ns;
                cx.out
                    .extend(oldest.into_exchange(cx.id, role, None, given_up, 0));
            }
        }
        self.pending.push_back(Pending {
            seq,
            start_ns: self.head_start.ns,
            bytes,
            info,
            span,
            tcp_seq: self.head_start.seq,
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
    pub(crate) fn idle(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        if !matches!(self.resp, RespState::Open | RespState::Chunked(_)) {
            return;
        }
        let role = self.role;
        if let Some(active) = &mut self.active {
            if let Some(req) = active.req.take() {
                let status = Some(active.status);
                out.extend(req.into_exchange(conn, role, status, active.last_ns, active.bytes));
            }
        }
    }

    /// Reports everything still open: the active response ends with its last record, waiting
    /// requests end unanswered at `give_up_ns`.
    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        let role = self.role;
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
}

/// What the connection speaks after a record.
pub(crate) enum Flow {
    Speaking,
    /// Another protocol (an upgrade, a tunnel), or lost.
    Stopped,
    /// HTTP/2 from `consumed` bytes into the record on (`Upgrade: h2c`).
    H2c {
        stream_1: Option<UpgradedRequest>,
        consumed: u64,
    },
}

/// The HTTP/1.1 request that asked for `Upgrade: h2c`: its response comes on stream 1.
pub(crate) struct UpgradedRequest {
    pub request: RequestText,
    pub span: SpanKey,
    pub start_ns: u64,
    pub tcp_seq: Option<u32>,
    pub request_bytes: u64,
}

/// What the span of an HTTP exchange says: the request's head and the response's status.
#[derive(Clone, Debug, PartialEq)]
pub struct Detail {
    pub request: RequestText,
    /// `None` if the connection closed or went quiet before a response.
    pub status: Option<u16>,
}

impl Detail {
    /// `METHOD /path/{id}`: span names must be low-cardinality (`url.path` keeps the real path).
    pub fn name_into(&self, out: &mut String) {
        out.push_str(self.request.method());
        out.push(' ');
        path_template_into(self.request.path(), out);
    }

    /// Status code and message. Semantic conventions: 5xx is an error on both sides, 4xx only
    /// for the client; no response at all is an error.
    pub fn status(&self, server_side: bool) -> (StatusCode, &'static str) {
        match self.status {
            Some(code) if code >= 500 || (!server_side && code >= 400) => (StatusCode::Error, ""),
            Some(_) => (StatusCode::Unset, ""),
            None => (StatusCode::Error, "the connection ended before a response"),
        }
    }

    /// The attributes of the request and its response, per the HTTP semantic conventions.
    #[inline(always)]
    pub fn attributes(&self, ex: &Exchange, ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
        let server_side = ex.role == Role::Server;
        let (server_ip, server_port) = ends.server(server_side);
        let (host, host_port) = self.request.host().map_or((None, None), |h| {
            let (h, p) = split_host(h);
            (Some(h), p)
        });
        f("http.request.method", Value::Str(self.request.method()));
        f("url.path", Value::Str(self.request.path()));
        f("server.address", Value::Str(host.unwrap_or(server_ip)));
        f(
            "server.port",
            Value::Int(i64::from(host_port.unwrap_or(server_port))),
        );
        f("http.request.size", Value::Int(ex.request_bytes as i64));
        f("http.response.size", Value::Int(ex.response_bytes as i64));
        if let Some(ua) = self.request.user_agent() {
            f("user_agent.original", Value::Str(ua));
        }
        match self.status {
            Some(code) => {
                f("http.response.status_code", Value::Int(i64::from(code)));
                if self.status(server_side).0 == StatusCode::Error {
                    f("error.type", Value::Str(&code.to_string()));
                }
            }
            None => f("error.type", Value::Str("no_response")),
        }
    }
}

/// The attributes every HTTP span has.
///
/// `network.protocol.name` is left out as the HTTP semantic conventions ask ("if not http"),
/// and `network.transport` (opt-in; always `tcp` here) too: each costs ~30 bytes a span at the
/// agent, on the wire and in the collector's store.
pub fn constant_attributes(tls: bool, mut f: impl FnMut(&str, Value<'_>)) {
    f("url.scheme", Value::Str(if tls { "https" } else { "http" }));
    f("network.protocol.version", Value::Str("1.1"));
}

/// Span names must be low-cardinality: path segments that look like ids (digits, long hex,
/// UUIDs) become `{id}`. Appends to `out`.
pub fn path_template_into(path: &str, out: &mut String) {
    for (i, seg) in path_segments(path).enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if is_id_segment(seg) { "{id}" } else { seg });
    }
}

/// The segments of a path, as `path.split('/')` gives them. A byte loop: the generic `char`
/// searcher behind `split('/')` was not inlined, and was 2.5% of the agent's instructions in
/// `tracer replay` (callgrind), from this and the linker.
pub fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(path);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == b'/') {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// A path segment that names one thing rather than a route: digits, long hex, UUIDs, or
/// mostly digits.
pub fn is_id_segment(seg: &str) -> bool {
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    digits > 0
        && (digits == seg.len()
            || (seg.len() >= 8 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
            || (seg.len() >= 4 && digits * 2 >= seg.len()))
}

/// `Host` header without the port, and the port if it had one.
///
/// Every HTTP span asks (`server.address`, `server.port`); the common `name:digits` is read in
/// one backward pass, where `rsplit_once` and `str::parse` were ~250 instructions a span.
fn split_host(host: &str) -> (&str, Option<u16>) {
    let bytes = host.as_bytes();
    let digits = bytes
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let colon = bytes.len() - digits;
    if (1..=5).contains(&digits) && colon > 1 && bytes[colon - 1] == b':' {
        let name = &bytes[..colon - 1];
        if name[0] != b'[' && !name.contains(&b':') {
            let port = bytes[colon..]
                .iter()
                .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
            // `colon - 1` indexes an ASCII ':', so it is a char boundary.
            return (&host[..colon - 1], u16::try_from(port).ok());
        }
    }
    split_host_slow(host)
}

/// [`split_host`] for everything else: `[v6]:port`, no port, a port that is not digits.
fn split_host_slow(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}
