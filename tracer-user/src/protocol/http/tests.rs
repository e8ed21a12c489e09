//! The HTTP/1.x framing and pairing, through the generic connection layer.
use tracer_common::direction::{EGRESS, INGRESS};

use super::{
    chunked::{ChunkDecoder, Outcome},
    head::RequestText,
    Detail,
};
use crate::{
    pairing::{Chunk, ConnId, Exchange, Pairer, Role},
    protocol::{self, Protocols},
};

impl Exchange {
    fn http(&self) -> &Detail {
        match &self.detail {
            protocol::Detail::Http(d) => d,
            #[allow(unreachable_patterns)]
            _ => panic!("not an HTTP exchange"),
        }
    }

    fn http_mut(&mut self) -> &mut Detail {
        match &mut self.detail {
            protocol::Detail::Http(d) => d,
            #[allow(unreachable_patterns)]
            _ => panic!("not an HTTP exchange"),
        }
    }
}

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
            p: Pairer::new(IDLE, Protocols::all()),
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
            inserted: 0,
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
        detail: protocol::Detail::Http(Detail {
            request: RequestText::new(method, path, None, None),
            status,
        }),
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
    first.http_mut().request = RequestText::new("GET", "/a", Some("svc.test"), Some("t/1"));
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
    want.http_mut().request = RequestText::new("POST", "/submit", Some("api.test"), None);
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
    want.http_mut().request = RequestText::new("GET", "/s", Some("h"), None);
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
        .map(|e| (e.http().request.path(), e.start_ns, e.end_ns))
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
        .map(|e| {
            (
                e.http().request.path().to_owned(),
                e.end_ns,
                e.http().status,
            )
        })
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
            inserted: 0,
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
        .map(|e| (e.http().request.path().to_owned(), e.tcp_seq))
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
        (got[0].http().request.path(), got[0].request_bytes),
        ("/upload", head.len() as u64 + 10_000)
    );
    assert_eq!((got[0].start_ns, got[0].end_ns), (20, 70));
    assert_eq!(
        (got[1].http().request.path(), got[1].start_ns),
        ("/next", 50)
    );
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
        (got[0].http().status, got[0].start_ns, got[0].end_ns),
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
        (got[0].http().status, got[0].start_ns, got[0].end_ns),
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
        (got[0].http().request.path(), got[0].start_ns, got[0].end_ns),
        ("/a", 10, 60)
    );
    r.rec(INGRESS, 90, 100, &ok("x"));
    assert_eq!(r.take()[0].http().request.path(), "/b");
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
        .map(|e| (e.http().request.path().to_owned(), e.end_ns))
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
                e.http().request.method().to_owned(),
                e.http().request.path().to_owned(),
                e.http().status,
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
    let got: Vec<_> = r.take().into_iter().map(|e| e.http().status).collect();
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
        (got[0].http().status, got[0].start_ns, got[0].end_ns),
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
    r.p.tick(20 + 10 * IDLE, &mut r.out);
    let got = r.take();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].http().status, got[0].end_ns),
        (None, 20 + 10 * IDLE)
    );
    assert_eq!(r.p.connections(), 0);

    r.rec(INGRESS, 10, 20, &get("/cut"));
    r.p.on_close(C, 500, &mut r.out);
    let got = r.take();
    assert_eq!(
        (
            got[0].http().request.path(),
            got[0].http().status,
            got[0].end_ns
        ),
        ("/cut", None, 500)
    );
}

#[test]
fn tls_is_muted() {
    let mut r = Run::new();
    let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x1b";
    r.rec(EGRESS, 10, 20, hello);
    assert!(r.p.is_muted(C));
    r.rec(INGRESS, 30, 40, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76");
    r.rec(EGRESS, 50, 60, &get("/looks-like-http-but-inside-tls"));
    r.rec(INGRESS, 70, 80, &ok("x"));
    r.p.on_close(C, 90, &mut r.out);
    assert!(r.out.is_empty());
    assert_eq!(r.p.parse_failures(), 0);
    assert!(!r.p.is_muted(C), "closed connections are forgotten");
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
    assert_eq!((got.len(), got[0].http().status), (1, Some(101)));
    assert!(r.p.is_muted(C));
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
        (got[0].http().request.path(), got[0].start_ns, got[0].end_ns),
        ("/found", 60, 80)
    );
    assert_eq!(r.p.parse_failures(), 1);
    assert!(!r.p.is_muted(C));
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
    assert_eq!(got[0].http().request.path().to_owned(), "/b");
}

#[test]
fn short_first_read_is_buffered_for_detection() {
    let mut r = Run::new();
    let req = get("/tiny");
    r.rec(EGRESS, 10, 11, &req[..2]);
    assert!(!r.p.is_muted(C));
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
    assert!(!r.p.is_muted(C));
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
    assert_eq!(got[0].http().request.path().to_owned(), "/small");
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
    let mut p = Pairer::new(100, Protocols::all());
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
            inserted: 0,
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

fn path_template(path: &str) -> String {
    let mut out = String::new();
    super::path_template_into(path, &mut out);
    out
}

#[test]
fn ids_in_paths_are_templated() {
    assert_eq!(path_template("/users/123/orders"), "/users/{id}/orders");
    assert_eq!(
        path_template("/a/550e8400-e29b-41d4-a716-446655440000"),
        "/a/{id}"
    );
    assert_eq!(path_template("/v1/traces"), "/v1/traces");
    assert_eq!(path_template("/"), "/");
    assert_eq!(path_template("/static/app.js"), "/static/app.js");
}

#[test]
fn path_segments_split_like_str_split() {
    for path in ["", "/", "/a/b", "a//b/", "/x/42/y", "nosl", "//"] {
        let ours: Vec<_> = super::path_segments(path).collect();
        let std: Vec<_> = path.split('/').collect();
        assert_eq!(ours, std, "{path:?}");
    }
}

#[test]
fn host_header_ports_are_split() {
    use super::split_host;
    assert_eq!(split_host("example.com:8080"), ("example.com", Some(8080)));
    assert_eq!(split_host("example.com"), ("example.com", None));
    assert_eq!(split_host("[::1]:80"), ("::1", Some(80)));
    assert_eq!(split_host("example.com:99999"), ("example.com", None));
    // The fast path answers exactly as the general one.
    for host in [
        "a:1", "a:65535", "a:65536", "a:080", "a:", ":80", "a:b:80", "[::1]:80", "[::1]", "::1",
        "a:+80", "a:000001", "a:8x", "ü:80", "a b:80", "",
    ] {
        assert_eq!(split_host(host), super::split_host_slow(host), "{host:?}");
    }
}

/// Both ends of a connection on this host: each head is parsed once, the other end takes the
/// parse, and each end reports what it would have reported alone. A request whose bytes differ
/// at the reading end (a `traceparent` the probes inserted) is parsed there again.
#[test]
fn both_ends_on_the_host_parse_each_head_once() {
    struct OnHost;
    impl crate::pairing::Observer for OnHost {
        fn request(&mut self, _: ConnId, _: Role, _: &crate::pairing::RequestStart<'_>) -> u64 {
            0
        }
        fn answered(&mut self, _: ConnId, _: Role, _: u64) {}
        fn peer_on_host(&self) -> bool {
            true
        }
    }
    const CLIENT: ConnId = 1;
    const SERVER: ConnId = 2;
    let req = b"GET /a/1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t/1\r\n\r\n".to_vec();
    let injected = b"GET /b HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
    let resp = ok("hello");
    let get_b = get("/b");
    // Ring order: the client writes, the server reads, the server writes, the client reads.
    // Request sequence numbers from 1000, response ones from 5000.
    let script: Vec<(ConnId, u32, &[u8], u32)> = vec![
        (CLIENT, EGRESS, &req, 1000),
        (SERVER, INGRESS, &req, 1000),
        (SERVER, EGRESS, &resp, 5000),
        (CLIENT, INGRESS, &resp, 5000),
        (CLIENT, EGRESS, &get_b, 1100),
        (SERVER, INGRESS, injected, 1100),
        (SERVER, EGRESS, &resp, 5100),
        (CLIENT, INGRESS, &resp, 5100),
    ];
    let run = |on_host: bool| {
        let mut p = Pairer::new(IDLE, Protocols::all());
        let mut out = Vec::new();
        for (t, (conn, dir, bytes, seq)) in script.iter().enumerate() {
            let t = 100 * t as u64;
            let chunk = Chunk {
                direction: *dir,
                ts_enter: t,
                ts_exit: t + 5,
                len: bytes.len() as u64,
                payload: bytes,
                tid: 1,
                tcp_seq: Some(*seq),
                inserted: 0,
            };
            if on_host {
                p.on_chunk(*conn, &chunk, &mut out, &mut OnHost);
            } else {
                p.on_chunk(*conn, &chunk, &mut out, &mut ());
            }
        }
        (out, p.heads_reused())
    };
    let (alone, none_reused) = run(false);
    let (shared, reused) = run(true);
    assert_eq!(none_reused, 0);
    // Three heads taken: the first request, both responses; the injected request was parsed.
    assert_eq!(reused, 3);
    assert_eq!(shared, alone);
    assert_eq!(shared.len(), 4);
    let paths: Vec<&str> = shared.iter().map(|e| e.http().request.path()).collect();
    assert_eq!(paths, ["/a/1", "/a/1", "/b", "/b"]);
}
