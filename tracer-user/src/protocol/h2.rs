//! HTTP/2 and gRPC over it: connections that start with the client preface (h2c with prior
//! knowledge, and h2 inside TLS, read through the TLS uprobes).
//!
//! Each direction is a stream of frames (`framing::Frame::H2`); HEADERS and CONTINUATION
//! blocks are decoded with HPACK, whose dynamic table is per direction and per connection, so
//! a header block that was not captured whole (longer than the probes capture, or in bytes they
//! skipped) leaves every later block undecodable: the connection is muted then, rather than
//! given a wrong method or path. One span per stream: it starts with the request's HEADERS
//! (where its TCP sequence number is read, so the two ends join as HTTP/1 requests do) and ends
//! with the END_STREAM of the response, or RST_STREAM. gRPC (a `content-type` of
//! `application/grpc`) is named by its method and takes its status from the trailers.
//!
//! A connection upgraded from HTTP/1.1 (`Upgrade: h2c` answered by 101) is read from the 101
//! on: the request that asked for it is stream 1. Not read: a connection already open when the
//! agent started (its HPACK tables are unknown): no preface, so no span.
use std::collections::HashMap;

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tracer_common::direction::EGRESS;

use super::{
    framing::{Event, Frame, Framer},
    http::{self, head::RequestText, UpgradedRequest},
    Detection, Protocol,
};
use crate::{
    context,
    pairing::{Chunk, ConnId, Cx, Exchange, Mark, RequestStart, Role, SpanKey},
    spans::{Endpoints, Value},
};

/// What a client sends first (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Header blocks are kept whole up to this (the default maximum frame size is 16 KiB).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Streams followed at once on one connection (a peer's usual limit is 100 to 250).
const MAX_STREAMS: usize = 1024;

pub(crate) fn detect(probe: &[u8], direction: u32) -> Detection {
    let n = probe.len().min(PREFACE.len());
    if probe[..n] != PREFACE[..n] {
        // A server's own preface, a SETTINGS frame on stream 0, may come first (nginx sends
        // it as soon as TLS has chosen h2): the client's preface is in the next message.
        if server_preface(probe) {
            Detection::NotAStart
        } else {
            Detection::Nothing
        }
    } else if n < PREFACE.len() {
        Detection::Undecided
    } else {
        Detection::Found(Protocol::Http2, Role::sending_requests(direction))
    }
}

/// A SETTINGS frame (not an ACK) on stream 0 with a few settings.
fn server_preface(probe: &[u8]) -> bool {
    let [l0, l1, l2, kind, flags, s0, s1, s2, s3, ..] = *probe else {
        return false;
    };
    let len = u32::from_be_bytes([0, l0, l1, l2]);
    kind == 4 && flags == 0 && [s0, s1, s2, s3] == [0; 4] && len.is_multiple_of(6) && len <= 60
}

/// One direction of a connection.
struct Side {
    framer: Framer,
    hpack: hpack::Decoder<'static>,
    /// Where the frame being walked began.
    frame_mark: Mark,
    /// A header block split over HEADERS and CONTINUATION frames.
    block: Vec<u8>,
    block_stream: u32,
    block_end_stream: bool,
    block_mark: Mark,
}

impl Side {
    fn new() -> Self {
        Side {
            framer: Framer::new(Frame::H2),
            hpack: {
                let mut d = hpack::Decoder::new();
                d.set_max_table_size(4096);
                d
            },
            frame_mark: Mark::default(),
            block: Vec::new(),
            block_stream: 0,
            block_end_stream: false,
            block_mark: Mark::default(),
        }
    }
}

struct Stream {
    request: RequestText,
    grpc: bool,
    start: Mark,
    span: SpanKey,
    request_bytes: u64,
    response_bytes: u64,
    status: Option<u16>,
    grpc_status: Option<u32>,
    answered: bool,
    reset: bool,
    /// Exit of the last record that carried the response's frames (0 before any).
    last_response_ns: u64,
}

pub(crate) struct Session {
    role: Role,
    /// Bytes of the client preface still to skip.
    preface_left: u64,
    to_server: Side,
    to_client: Side,
    streams: HashMap<u32, Stream>,
    events: Vec<Event>,
}

/// The largest dynamic table a peer may ask for (RFC 7541's default is 4 KiB); more is
/// refused, so that a connection cannot make the agent keep megabytes of headers.
const MAX_HPACK_TABLE: usize = 64 * 1024;

/// An HPACK integer with an `n`-bit prefix at the start of `buf`: (value, bytes), or `None`.
fn hpack_integer(buf: &[u8], n: u32) -> Option<(usize, usize)> {
    let mask = (1usize << n) - 1;
    let mut value = usize::from(*buf.first()?) & mask;
    if value < mask {
        return Some((value, 1));
    }
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 127) << (7 * (i - 1));
        if b & 128 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Whether a header block's representations are all complete (integers and strings within the
/// block) and any table size update is bounded. The `hpack` crate panics on a truncated size
/// update (found by fuzzing), and would grow its table as far as a peer asks.
fn hpack_well_formed(block: &[u8]) -> bool {
    let string = |at: usize| -> Option<usize> {
        let (len, used) = hpack_integer(block.get(at..)?, 7)?;
        let end = at.checked_add(used)?.checked_add(len)?;
        (end <= block.len()).then_some(end)
    };
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        let rest = &block[at..];
        let next = if first & 0x80 != 0 {
            hpack_integer(rest, 7).map(|(_, used)| at + used)
        } else if first & 0x20 != 0 && first & 0x40 == 0 {
            // Dynamic table size update.
            match hpack_integer(rest, 5) {
                Some((size, used)) if size <= MAX_HPACK_TABLE => Some(at + used),
                _ => None,
            }
        } else {
            // A literal: an index (6 bits with incremental indexing, else 4), a name string if
            // the index is 0, then the value string.
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            hpack_integer(rest, prefix).and_then(|(index, used)| {
                let name_end = if index == 0 {
                    string(at + used)?
                } else {
                    at + used
                };
                string(name_end)
            })
        };
        match next {
            Some(n) if n > at => at = n,
            _ => return false,
        }
    }
    true
}

/// A decoded header block: (name, value) pairs.
type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn header<'a>(headers: &'a Headers, name: &[u8]) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.as_slice() == name)
        .map(|(_, v)| v.as_slice())
}

impl Session {
    pub(crate) fn start(role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        let mut s = Session {
            role,
            preface_left: PREFACE.len() as u64,
            to_server: Side::new(),
            to_client: Side::new(),
            streams: HashMap::new(),
            events: Vec::new(),
        };
        s.to_server.frame_mark = start;
        if !buffered.is_empty() {
            // Detection held at most the preface.
            s.preface_left -= (buffered.len() as u64).min(s.preface_left);
        }
        s
    }

    /// A connection that switched from HTTP/1.1 (`Upgrade: h2c`): the client's preface comes
    /// next, and the request that asked for the upgrade waits for its response on stream 1.
    pub(crate) fn upgraded(role: Role, stream_1: Option<UpgradedRequest>) -> Self {
        let mut s = Session::start(role, Vec::new(), Mark::default());
        if let Some(r) = stream_1 {
            s.streams.insert(
                1,
                Stream {
                    grpc: false,
                    start: Mark {
                        ns: r.start_ns,
                        seq: r.tcp_seq,
                        tid: 0,
                    },
                    request: r.request,
                    span: r.span,
                    request_bytes: r.request_bytes,
                    response_bytes: 0,
                    status: None,
                    grpc_status: None,
                    answered: false,
                    reset: false,
                    last_response_ns: 0,
                },
            );
        }
        s
    }

    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> bool {
        let to_server = (self.role == Role::Client) == (chunk.direction == EGRESS);
        let mut skip = 0u64;
        if to_server && self.preface_left > 0 {
            skip = self.preface_left.min(chunk.len);
            self.preface_left -= skip;
        }
        let captured = chunk.captured();
        let rest = captured
            .get(usize::try_from(skip).unwrap_or(usize::MAX)..)
            .unwrap_or_default();
        let mut events = std::mem::take(&mut self.events);
        let side = if to_server {
            &mut self.to_server
        } else {
            &mut self.to_client
        };
        side.framer.advance(
            rest,
            chunk.len - skip,
            |kind| match kind {
                HEADERS | CONTINUATION => MAX_HEADER_BLOCK,
                _ => 0,
            },
            &mut events,
        );
        let mut speaking = true;
        for ev in events.drain(..) {
            match ev {
                Event::Start { at } => {
                    let side = if to_server {
                        &mut self.to_server
                    } else {
                        &mut self.to_client
                    };
                    side.frame_mark = Mark::at(chunk, cx.record_seq, skip + at);
                }
                Event::Lost { .. } => {
                    speaking = false;
                    break;
                }
                Event::Done {
                    kind,
                    body,
                    bytes,
                    head,
                } => {
                    if !self.frame(to_server, kind, &body, bytes - 9, head, chunk, cx) {
                        speaking = false;
                        break;
                    }
                }
            }
        }
        self.events = events;
        if !speaking {
            cx.failed();
        }
        speaking
    }

    /// One whole frame; false when the connection can no longer be read.
    #[allow(clippy::too_many_arguments)]
    fn frame(
        &mut self,
        to_server: bool,
        kind: u8,
        body: &[u8],
        payload: u64,
        head: [u8; 9],
        chunk: &Chunk,
        cx: &mut Cx,
    ) -> bool {
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match kind {
            DATA => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    if to_server {
                        s.request_bytes += payload;
                    } else {
                        s.response_bytes += payload;
                        s.last_response_ns = chunk.ts_exit;
                    }
                }
                if flags & END_STREAM != 0 && !to_server {
                    self.finish(stream, chunk.ts_exit, cx);
                }
                true
            }
            HEADERS | CONTINUATION => {
                // A block not captured whole cannot be decoded, nor any after it.
                if body.len() as u64 != payload {
                    return false;
                }
                let side = if to_server {
                    &mut self.to_server
                } else {
                    &mut self.to_client
                };
                let mut fragment = body;
                if kind == HEADERS {
                    let mut from = 0;
                    let mut to = body.len();
                    if flags & PADDED != 0 {
                        let Some(&pad) = body.first() else {
                            return false;
                        };
                        from = 1;
                        let Some(t) = to.checked_sub(usize::from(pad)) else {
                            return false;
                        };
                        to = t;
                    }
                    if flags & PRIORITY != 0 {
                        from += 5;
                    }
                    if from > to {
                        return false;
                    }
                    fragment = &body[from..to];
                    side.block.clear();
                    side.block_stream = stream;
                    side.block_end_stream = flags & END_STREAM != 0;
                    side.block_mark = side.frame_mark;
                } else if stream != side.block_stream {
                    return false;
                }
                side.block.extend_from_slice(fragment);
                if flags & END_HEADERS == 0 {
                    return true;
                }
                if !hpack_well_formed(&side.block) {
                    return false;
                }
                let mut headers: Headers = Vec::new();
                let decoded = side.hpack.decode_with_cb(&side.block, |n, v| {
                    headers.push((n.into_owned(), v.into_owned()));
                });
                if decoded.is_err() {
                    return false;
                }
                let (id, end_stream, mark) =
                    (side.block_stream, side.block_end_stream, side.block_mark);
                self.headers(to_server, id, &headers, end_stream, mark, chunk, cx);
                true
            }
            RST_STREAM => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.reset = true;
                }
                self.finish(stream, chunk.ts_exit, cx);
                true
            }
            _ => true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn headers(
        &mut self,
        to_server: bool,
        id: u32,
        headers: &Headers,
        end_stream: bool,
        mark: Mark,
        chunk: &Chunk,
        cx: &mut Cx,
    ) {
        if to_server {
            // Trailers of a request already open change nothing we report.
            if self.streams.contains_key(&id) || self.streams.len() >= MAX_STREAMS {
                return;
            }
            let method = header(headers, b":method").unwrap_or(b"GET");
            let target = header(headers, b":path").unwrap_or(b"/");
            // The query string often carries tokens: not kept.
            let path = target.split(|&b| b == b'?').next().unwrap_or(target);
            let request = RequestText::from_bytes(
                method,
                path,
                header(headers, b":authority"),
                header(headers, b"user-agent"),
            );
            let grpc = header(headers, b"content-type")
                .is_some_and(|ct| ct.starts_with(b"application/grpc"));
            let context = header(headers, b"traceparent")
                .and_then(context::parse_traceparent)
                .or_else(|| header(headers, b"b3").and_then(context::parse_b3));
            let span = cx.observer.request(
                cx.id,
                self.role,
                &RequestStart {
                    tid: mark.tid,
                    tcp_seq: mark.seq,
                    start_ns: mark.ns,
                    operation: request.method(),
                    target: request.path(),
                    context,
                },
            );
            self.streams.insert(
                id,
                Stream {
                    request,
                    grpc,
                    start: mark,
                    span,
                    request_bytes: 0,
                    response_bytes: 0,
                    status: None,
                    grpc_status: None,
                    answered: false,
                    reset: false,
                    last_response_ns: 0,
                },
            );
            return;
        }
        let role = self.role;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.last_response_ns = chunk.ts_exit;
        if let Some(status) = header(headers, b":status") {
            s.status = std::str::from_utf8(status)
                .ok()
                .and_then(|t| t.parse().ok());
            if !s.answered {
                s.answered = true;
                cx.observer.answered(cx.id, role, s.span);
            }
        }
        if let Some(g) = header(headers, b"grpc-status") {
            s.grpc_status = std::str::from_utf8(g).ok().and_then(|t| t.parse().ok());
        }
        if end_stream {
            self.finish(id, chunk.ts_exit, cx);
        }
    }

    /// The stream's response ended (or it was reset) at `end_ns`.
    fn finish(&mut self, id: u32, end_ns: u64, cx: &mut Cx) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        cx.out.push(self.exchange(cx.id, s, end_ns));
    }

    fn exchange(&self, conn: ConnId, s: Stream, end_ns: u64) -> Exchange {
        let grpc = s.grpc.then(|| {
            let path = s.request.path().trim_start_matches('/');
            let (service, method) = path.split_once('/').unwrap_or((path, ""));
            Grpc {
                service: service.to_owned(),
                method: method.to_owned(),
                status: s.grpc_status,
            }
        });
        Exchange {
            conn,
            role: self.role,
            detail: super::Detail::Http2(Box::new(Detail {
                http: http::Detail {
                    request: s.request,
                    status: if s.reset && s.status.is_none() {
                        None
                    } else {
                        s.status
                    },
                },
                grpc,
                reset: s.reset,
            })),
            start_ns: s.start.ns,
            end_ns: end_ns.max(s.start.ns),
            request_bytes: s.request_bytes,
            response_bytes: s.response_bytes,
            span: s.span,
            tcp_seq: s.start.seq,
        }
    }

    pub(crate) fn direction_changed(&mut self, _last_dir: u32, _cx: &mut Cx) {}

    /// Responses end with END_STREAM: silence ends nothing.
    pub(crate) fn idle(&mut self, _conn: ConnId, _out: &mut Vec<Exchange>) {}

    /// Streams still open end here: those whose response began end with its last frame (a
    /// client that read the whole body by its length may close before the END_STREAM that
    /// follows it), the others at `give_up_ns`.
    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.streams.remove(&id) {
                let end_ns = if s.last_response_ns > 0 {
                    s.last_response_ns
                } else {
                    give_up_ns
                };
                out.push(self.exchange(conn, s, end_ns));
            }
        }
    }
}

/// A gRPC call's method and status.
#[derive(Clone, Debug, PartialEq)]
pub struct Grpc {
    /// `package.Service`.
    pub service: String,
    pub method: String,
    /// From the trailers (`grpc-status`); `None` if they never came.
    pub status: Option<u32>,
}

/// What the span of one HTTP/2 stream says.
#[derive(Clone, Debug, PartialEq)]
pub struct Detail {
    pub http: http::Detail,
    pub grpc: Option<Grpc>,
    /// Ended by RST_STREAM.
    pub reset: bool,
}

/// gRPC codes that are the server's fault (the RPC semantic conventions): an error on a
/// server span; any code but OK is one on a client span.
const GRPC_SERVER_ERRORS: [u32; 6] = [2, 4, 12, 13, 14, 15];

impl Detail {
    pub fn name_into(&self, out: &mut String) {
        match &self.grpc {
            Some(g) => {
                out.push_str(&g.service);
                out.push('/');
                out.push_str(&g.method);
            }
            None => self.http.name_into(out),
        }
    }

    pub fn status(&self, server_side: bool) -> (StatusCode, &'static str) {
        if self.reset {
            return (StatusCode::Error, "the stream was reset");
        }
        match &self.grpc {
            Some(g) => match g.status {
                Some(0) => (StatusCode::Unset, ""),
                Some(code) if !server_side || GRPC_SERVER_ERRORS.contains(&code) => {
                    (StatusCode::Error, "")
                }
                Some(_) => (StatusCode::Unset, ""),
                None => (StatusCode::Error, "no gRPC status"),
            },
            None => self.http.status(server_side),
        }
    }

    pub fn attributes(&self, ex: &Exchange, ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
        match &self.grpc {
            Some(g) => {
                let (server_ip, server_port) = ends.server(ex.role == Role::Server);
                f("rpc.system", Value::Str("grpc"));
                f("rpc.service", Value::Str(&g.service));
                f("rpc.method", Value::Str(&g.method));
                if let Some(code) = g.status {
                    f("rpc.grpc.status_code", Value::Int(i64::from(code)));
                }
                f("server.address", Value::Str(server_ip));
                f("server.port", Value::Int(i64::from(server_port)));
            }
            None => self.http.attributes(ex, ends, &mut f),
        }
        if self.reset {
            f("error.type", Value::Str("rst_stream"));
        }
    }
}

pub fn constant_attributes(tls: bool, mut f: impl FnMut(&str, Value<'_>)) {
    f("url.scheme", Value::Str(if tls { "https" } else { "http" }));
    f("network.protocol.version", Value::Str("2"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_run::Run;
    use tracer_common::direction::INGRESS;

    fn frame(kind: u8, flags: u8, stream: u32, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn an_h2c_upgrade_reports_the_request_with_its_http2_response() {
        let mut r = Run::new();
        r.rec(
            EGRESS,
            b"GET /up/7 HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        );
        // The server's SETTINGS in the same record as the 101.
        let mut switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                           Upgrade: h2c\r\n\r\n"
            .to_vec();
        switch.extend(frame(4, 0, 0, &[]));
        r.rec(INGRESS, &switch);
        let mut preface = PREFACE.to_vec();
        preface.extend(frame(4, 0, 0, &[]));
        r.rec(EGRESS, &preface);
        assert!(r.out.is_empty(), "nothing for the 101 itself");
        let mut response = frame(4, 1, 0, &[]);
        // `:status: 200` is index 8 of the static table.
        response.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        response.extend(frame(DATA, END_STREAM, 1, b"hi"));
        r.rec(INGRESS, &response);
        assert_eq!(r.out.len(), 1, "{:?}", r.out);
        let ex = &r.out[0];
        let crate::protocol::Detail::Http2(d) = &ex.detail else {
            panic!("not an HTTP/2 span: {ex:?}");
        };
        assert_eq!(
            (
                d.http.request.method(),
                d.http.request.path(),
                d.http.status
            ),
            ("GET", "/up/7", Some(200))
        );
        assert_eq!(ex.response_bytes, 2);
        assert_eq!((ex.start_ns, ex.end_ns), (10, 45));
    }

    #[test]
    fn a_stream_the_client_closes_before_end_stream_ends_with_its_last_frame() {
        let mut r = Run::new();
        let mut request = PREFACE.to_vec();
        // `:method GET`, `:path /`.
        request.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x82, 0x84]));
        r.rec(EGRESS, &request);
        r.rec(INGRESS, &frame(HEADERS, END_HEADERS, 1, &[0x88]));
        r.rec(INGRESS, &frame(DATA, 0, 1, b"whole"));
        assert!(r.out.is_empty());
        r.p.on_close(crate::protocol::test_run::C, 1_000, &mut r.out);
        assert_eq!(r.out.len(), 1);
        assert_eq!((r.out[0].end_ns, r.out[0].response_bytes), (35, 5));
    }

    #[test]
    fn malformed_header_blocks_are_refused_before_the_decoder_sees_them() {
        // A size update whose integer runs off the block: the crate would panic.
        assert!(!hpack_well_formed(&[0x3f]));
        assert!(!hpack_well_formed(&[0x3f, 0xff, 0xff]));
        // A size update past the bound.
        assert!(!hpack_well_formed(&[0x3f, 0xe1, 0xff, 0x07]));
        // A literal whose value string is longer than the block.
        assert!(!hpack_well_formed(&[0x40, 0x01, b'a', 0x05, b'x']));
        // Indexed fields and a complete literal are fine; so is an update to 4 KiB.
        assert!(hpack_well_formed(&[
            0x82, 0x84, 0x40, 0x01, b'a', 0x01, b'b'
        ]));
        assert!(hpack_well_formed(&[0x3f, 0xe1, 0x1f]));
        let mut d = hpack::Decoder::new();
        assert!(d.decode(&[0x82, 0x84]).is_ok());
    }
}
