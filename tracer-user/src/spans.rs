//! Turning a paired HTTP exchange into an OpenTelemetry span, per the HTTP semantic conventions.
//!
//! The agent keeps each span as an [`Span`] (the exchange, its ids and its connection) and
//! writes it straight to OTLP protobuf with [`Span::encode`]: building the generic OTLP
//! structs first costs ~40 allocations a span (every attribute key and value is a `String`) and
//! two passes of `prost` length computation, which profiling showed to be most of the agent's
//! CPU. [`Span::to_proto`] builds the same span as `prost` structs, for OTLP/JSON, `--stdout`
//! and the test that keeps both in step. Both take their attributes from one list,
//! [`Span::attributes`], so they cannot disagree.
use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use opentelemetry_proto::tonic::{
    common::v1::KeyValue,
    trace::v1::{span::SpanKind, status::StatusCode, Span as ProtoSpan, Status},
};

use crate::{
    context,
    link::{Confidence, Source, SpanIds},
    pairing::{Exchange, Role},
    protocol,
    resource::{kv_int, kv_str},
    wire,
};

/// A connection's endpoints from the traced process's point of view, with its attributes
/// formatted and encoded once per connection rather than once per span.
///
/// Built for every new connection, so with one allocation besides its `Arc`'s: where
/// connections are short (an HTTP/1.0 service, a client without a pool: two new connections a
/// request) six strings and vectors, each grown by formatting, were a quarter of the agent's CPU
/// (perf).
pub struct Endpoints {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The local and remote addresses as attributes write them, then `tracer.tcp.edge` up to
    /// the sequence number as a client (`local>remote#`) and as a server (`remote>local#`) of
    /// this connection writes it, back to back; `ends` marks where each stops.
    text: EndsText,
    ends: [usize; 4],
    /// [`connection_attributes`] as OTLP `KeyValue`s: those of a client span, then
    /// `client.address` from `client_address_at` on (server spans only).
    encoded: Vec<u8>,
    client_address_at: usize,
    /// The spans come from the TLS library's plaintext (`url.scheme` is `https`).
    pub tls: bool,
}

impl Endpoints {
    /// The same endpoints, for the connection's TLS plaintext.
    #[must_use]
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let mut text = EndsText {
            buf: [0; ENDS_TEXT_BYTES],
            len: 0,
        };
        let mut marks = [0; 4];
        text.ip(local.ip());
        marks[0] = text.len;
        text.ip(remote.ip());
        marks[1] = text.len;
        let (local_text, remote_text) = (0..marks[0], marks[0]..marks[1]);
        text.edge_prefix((local, &local_text), (remote, &remote_text));
        marks[2] = text.len;
        text.edge_prefix((remote, &remote_text), (local, &local_text));
        marks[3] = text.len;
        let mut ends = Endpoints {
            local,
            remote,
            text,
            ends: marks,
            encoded: Vec::new(),
            client_address_at: 0,
            tls: false,
        };
        // A server's five IPv4 attributes take ~165 bytes; IPv6 up to ~255.
        let mut encoded = Vec::with_capacity(if local.is_ipv4() { 192 } else { 256 });
        connection_attributes(
            &ends,
            #[inline(always)]
            |k, v| encode_attribute(&mut encoded, k, v),
        );
        ends.client_address_at = encoded.len();
        if ends.has_peer() {
            // What only servers report.
            encode_attribute(&mut encoded, "client.address", Value::Str(ends.remote_ip()));
        }
        ends.encoded = encoded;
        ends
    }

    fn local_ip(&self) -> &str {
        self.text.slice(0, self.ends[0])
    }

    fn remote_ip(&self) -> &str {
        self.text.slice(self.ends[0], self.ends[1])
    }

    /// An unconnected socket (a DNS server's over UDP) has no one peer.
    fn has_peer(&self) -> bool {
        self.remote.port() != 0
    }

    /// `tracer.tcp.edge` up to the sequence number (`client>server#`).
    fn edge_prefix(&self, server_side: bool) -> &str {
        if server_side {
            self.text.slice(self.ends[2], self.ends[3])
        } else {
            self.text.slice(self.ends[1], self.ends[2])
        }
    }

    /// The server end's address and port.
    pub fn server(&self, server_side: bool) -> (&str, u16) {
        if server_side {
            (self.local_ip(), self.local.port())
        } else {
            (self.remote_ip(), self.remote.port())
        }
    }

    fn encoded(&self, server_side: bool) -> &[u8] {
        if server_side {
            &self.encoded
        } else {
            &self.encoded[..self.client_address_at]
        }
    }
}

/// Two addresses (at most 39 bytes each) and two edge prefixes, each two bracketed ends with
/// ports (47 bytes each) and two separators.
const ENDS_TEXT_BYTES: usize = 2 * 39 + 2 * (2 * 47 + 2);

/// An address and where its text is in an [`EndsText`].
type End<'a> = (SocketAddr, &'a std::ops::Range<usize>);

/// [`Endpoints`]' text, inline: ASCII written by `ip` and `end` only.
struct EndsText {
    buf: [u8; ENDS_TEXT_BYTES],
    len: usize,
}

impl EndsText {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push_byte(b);
        }
    }

    /// Bytes one at a time: IPs are short runs, and a `memcpy` call a run cost more.
    fn push_byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn decimal(&mut self, n: u16) {
        let mut digits = [0u8; 10];
        self.push(decimal(u32::from(n), &mut digits));
    }

    /// As `IpAddr`'s `Display` writes it; IPv4 without the formatting machinery, which was
    /// most of building a connection's text.
    fn ip(&mut self, ip: std::net::IpAddr) {
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push_byte(b'.');
                    }
                    self.decimal(u16::from(octet));
                }
            }
            std::net::IpAddr::V6(_) => {
                use std::fmt::Write as _;
                let _ = write!(self, "{ip}");
            }
        }
    }

    /// `client>server#`. Addresses are unmapped: a dual-stack server sees `::ffff:10.0.0.1`
    /// where its IPv4 client sees `10.0.0.1`, and both must write the same key. Each end comes
    /// with where its address is already written.
    fn edge_prefix(&mut self, client: End<'_>, server: End<'_>) {
        self.end(client);
        self.push_byte(b'>');
        self.end(server);
        self.push_byte(b'#');
    }

    /// `ip:port` (`[ip]:port` for IPv6), the address unmapped.
    fn end(&mut self, (at, written): End<'_>) {
        let ip = context::unmap(at.ip());
        if ip.is_ipv6() {
            self.push_byte(b'[');
            self.ip(ip);
            self.push_byte(b']');
        } else if ip == at.ip() && written.end <= self.len {
            // Copied: formatting each address three times was a fifth of a new connection's
            // cost to the agent (callgrind, the Python service making two a request).
            self.copy_within(written.clone());
        } else {
            self.ip(ip);
        }
        self.push_byte(b':');
        self.decimal(at.port());
    }

    /// Appends a copy of `range`, already written.
    fn copy_within(&mut self, range: std::ops::Range<usize>) {
        let len = range.len();
        if self.len + len <= self.buf.len() {
            self.buf.copy_within(range, self.len);
            self.len += len;
        }
    }

    fn slice(&self, from: usize, to: usize) -> &str {
        let bytes = &self.buf[from..to];
        debug_assert!(bytes.is_ascii());
        // SAFETY: only ASCII is ever written (digits, '.', ':', '[', ']', '>', '#' and
        // `Ipv6Addr`'s hexadecimal), so any byte range is UTF-8. Checking it on every span's
        // edge was a measurable share of encoding one.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl std::fmt::Write for EndsText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// `n` in decimal, written at the end of `digits`.
///
/// Two digits a step from a table: every span writes its TCP sequence number (ten digits at
/// most), and a digit a division was ~115 instructions a span (callgrind).
fn decimal(mut n: u32, digits: &mut [u8; 10]) -> &[u8] {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
                                2021222324252627282930313233343536373839\
                                4041424344454647484950515253545556575859\
                                6061626364656667686970717273747576777879\
                                8081828384858687888990919293949596979899";
    let mut i = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    &digits[i..]
}

/// `tracer.tcp.edge` built on the stack: it changes with every request.
struct EdgeText {
    buf: [u8; 128],
    len: usize,
}

impl EdgeText {
    /// The prefix (at most 96 bytes: two bracketed IPv6 ends) and the number, in decimal.
    fn new(prefix: &str, seq: u32) -> EdgeText {
        let mut t = EdgeText {
            buf: [0; 128],
            len: 0,
        };
        let prefix = &prefix.as_bytes()[..prefix.len().min(t.buf.len() - 10)];
        t.buf[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 10];
        let number = decimal(seq, &mut digits);
        t.buf[prefix.len()..prefix.len() + number.len()].copy_from_slice(number);
        t.len = prefix.len() + number.len();
        t
    }

    fn as_str(&self) -> &str {
        let bytes = &self.buf[..self.len];
        debug_assert!(bytes.is_ascii());
        // SAFETY: the prefix is an `EndsText` slice (ASCII only, see `EndsText::slice`) and the
        // rest decimal digits. Checking it was ~100 instructions a span.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

/// The attributes a connection gives all its spans (a server's add `client.address`).
fn connection_attributes(ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
    if ends.has_peer() {
        f("network.peer.address", Value::Str(ends.remote_ip()));
        f(
            "network.peer.port",
            Value::Int(i64::from(ends.remote.port())),
        );
    }
    f("network.local.address", Value::Str(ends.local_ip()));
    f(
        "network.local.port",
        Value::Int(i64::from(ends.local.port())),
    );
}

/// One attribute as a span's `attributes` field.
#[inline(always)]
fn encode_attribute(out: &mut Vec<u8>, key: &str, value: Value<'_>) {
    match value {
        Value::Str(s) => wire::string_attribute(out, wire::span::ATTRIBUTES, key, s),
        Value::Int(i) => wire::int_attribute(out, wire::span::ATTRIBUTES, key, i),
    }
}

/// An attribute value as the span's attribute list yields it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
}

/// An exchange ready for export.
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// How the parent was found (`tracer.link.source`, `tracer.link.confidence`).
    pub link: Option<(Source, Confidence)>,
    /// The trace id of the `traceparent` the probes inserted into this request, if any.
    pub injected: Option<[u8; 16]>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub exchange: Exchange,
    pub ends: Arc<Endpoints>,
}

impl Span {
    /// A span with the linker's ids, or fresh random ones; `mono_to_unix` converts the probes'
    /// CLOCK_MONOTONIC nanoseconds to Unix nanoseconds.
    pub fn new(
        exchange: Exchange,
        ends: Arc<Endpoints>,
        ids: Option<SpanIds>,
        mono_to_unix: impl Fn(u64) -> u64,
    ) -> Self {
        let ids = ids.unwrap_or_else(|| {
            let (trace_id, span_id) = random_ids();
            SpanIds {
                trace_id,
                span_id,
                link: None,
                injected: None,
                decided: 0,
            }
        });
        Span {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            parent_span_id: ids.link.map(|l| l.parent),
            link: ids.link.map(|l| (l.source, l.confidence)),
            injected: ids.injected,
            start_unix_nano: mono_to_unix(exchange.start_ns),
            end_unix_nano: mono_to_unix(exchange.end_ns.max(exchange.start_ns)),
            exchange,
            ends,
        }
    }

    pub fn server_side(&self) -> bool {
        self.exchange.role == Role::Server
    }

    fn kind(&self) -> SpanKind {
        if self.server_side() {
            SpanKind::Server
        } else {
            SpanKind::Client
        }
    }

    /// The span's name (low-cardinality: `url.path` and the like keep the real values).
    pub fn name_into(&self, out: &mut String) {
        out.clear();
        self.exchange.detail.name_into(out);
    }

    fn status(&self) -> (StatusCode, &'static str) {
        self.exchange.detail.status(self.server_side())
    }

    /// The span's attributes, in order: the tracer's (TCP edge, link, injected context) and
    /// those of its request and response, then its protocol's constant ones, then its
    /// connection's.
    pub fn attributes(&self, mut f: impl FnMut(&str, Value<'_>)) {
        self.request_attributes(&mut f);
        protocol::constant_attributes(self.exchange.detail.protocol(), self.ends.tls, &mut f);
        connection_attributes(&self.ends, &mut f);
        if self.server_side() && self.ends.has_peer() {
            f("client.address", Value::Str(self.ends.remote_ip()));
        }
    }

    /// The attributes that change from one request to the next: the tracer's own, then the
    /// protocol's.
    ///
    /// `f` goes to the protocol's attributes by value, last: passed on as `&mut f` every call
    /// went through one out-of-line `FnMut for &mut F` shim, where the keys' lengths are not
    /// known (~5% of the agent's instructions, callgrind on the nginx replay).
    #[inline(always)]
    fn request_attributes(&self, mut f: impl FnMut(&str, Value<'_>)) {
        let ex = &self.exchange;
        if let Some(seq) = ex.tcp_seq {
            // The collector joins this span with the other end's by this key, across hosts.
            let edge = EdgeText::new(self.ends.edge_prefix(self.server_side()), seq);
            f("tracer.tcp.edge", Value::Str(edge.as_str()));
            f("tracer.tcp.seq", Value::Int(i64::from(seq)));
        }
        if let Some((source, confidence)) = self.link {
            f("tracer.link.source", Value::Str(source.name()));
            f("tracer.link.confidence", Value::Str(confidence.name()));
        }
        if let Some(sent) = self.injected {
            f("tracer.context.injected", Value::Str("traceparent"));
            if sent != self.trace_id {
                // What the callee does under the header is in this trace.
                let mut hex = [0u8; 32];
                f(
                    "tracer.context.sent_trace_id",
                    Value::Str(hex_into(&sent, &mut hex)),
                );
            }
        }
        protocol::attributes(ex, &self.ends, f);
    }

    /// The span as `prost` structs: OTLP/JSON, `--stdout`, tests.
    pub fn to_proto(&self) -> ProtoSpan {
        let mut attributes: Vec<KeyValue> = Vec::with_capacity(20);
        self.attributes(|k, v| {
            attributes.push(match v {
                Value::Str(s) => kv_str(k, s),
                Value::Int(i) => kv_int(k, i),
            });
        });
        let mut name = String::new();
        self.name_into(&mut name);
        let (code, message) = self.status();
        ProtoSpan {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            kind: self.kind() as i32,
            start_time_unix_nano: self.start_unix_nano,
            end_time_unix_nano: self.end_unix_nano,
            attributes,
            status: Some(Status {
                code: code as i32,
                message: message.into(),
            }),
            ..Default::default()
        }
    }

    /// Appends the span as an OTLP `Span` message body (without its own tag and length) to
    /// `out`; `name` is scratch space reused across calls.
    pub fn encode(&self, out: &mut Vec<u8>, name: &mut String) {
        use wire::*;
        bytes_field(out, span::TRACE_ID, &self.trace_id);
        bytes_field(out, span::SPAN_ID, &self.span_id);
        if let Some(parent) = &self.parent_span_id {
            bytes_field(out, span::PARENT_SPAN_ID, parent);
        }
        self.name_into(name);
        bytes_field(out, span::NAME, name.as_bytes());
        varint_field(out, span::KIND, self.kind() as u64);
        fixed64_field(out, span::START_TIME_UNIX_NANO, self.start_unix_nano);
        fixed64_field(out, span::END_TIME_UNIX_NANO, self.end_unix_nano);
        self.request_attributes(
            #[inline(always)]
            |k, v| encode_attribute(out, k, v),
        );
        out.extend_from_slice(protocol::encoded_constant_attributes(
            self.exchange.detail.protocol(),
            self.ends.tls,
            encode_attribute,
        ));
        out.extend_from_slice(self.ends.encoded(self.server_side()));
        let (code, message) = self.status();
        let code = code as u64;
        let mut len = 0;
        if !message.is_empty() {
            len += field_len(message.len());
        }
        if code != 0 {
            len += 1 + varint_len(code);
        }
        tag(out, span::STATUS, LEN);
        varint(out, len as u64);
        if !message.is_empty() {
            bytes_field(out, status::MESSAGE, message.as_bytes());
        }
        if code != 0 {
            varint_field(out, status::CODE, code);
        }
    }
}

/// Non-zero random 64-bit numbers, as ids are made of.
///
/// Ids must be unique, not secret: like the OpenTelemetry SDKs, the agent draws them from a fast
/// generator (xoshiro) seeded by the OS once per thread. `ThreadRng`'s ChaCha was 1.5% of the
/// agent's time. All-zero ids are invalid in OTLP and W3C trace context; they are drawn again.
fn with_ids<T>(f: impl FnOnce(&mut dyn FnMut() -> u64) -> T) -> T {
    use rand::{rngs::SmallRng, RngCore as _, SeedableRng as _};
    use std::cell::RefCell;
    thread_local! {
        static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
    }
    RNG.with_borrow_mut(|rng| {
        f(&mut || loop {
            let v = rng.next_u64();
            if v != 0 {
                return v;
            }
        })
    })
}

/// A fresh trace id and span id.
pub fn random_ids() -> ([u8; 16], [u8; 8]) {
    with_ids(|nonzero| {
        // Both halves non-zero: the trace id is.
        let (low, span, high) = (nonzero(), nonzero(), nonzero());
        let mut trace = [0u8; 16];
        trace[..8].copy_from_slice(&high.to_be_bytes());
        trace[8..].copy_from_slice(&low.to_be_bytes());
        (trace, span.to_be_bytes())
    })
}

/// A fresh span id as a number (never 0).
pub fn random_span_id() -> u64 {
    with_ids(|nonzero| nonzero())
}

/// Lower-case hex, as trace and span ids are shown.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The offset from CLOCK_MONOTONIC (what `bpf_ktime_get_ns` returns) to the Unix epoch, read
/// now. Re-read periodically: NTP can step the wall clock.
pub fn monotonic_to_unix_offset() -> i128 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let mono1 = now(libc::CLOCK_MONOTONIC);
    let real = now(libc::CLOCK_REALTIME);
    let mono2 = now(libc::CLOCK_MONOTONIC);
    real - (mono1 + mono2) / 2
}

/// Lowercase hex of `bytes` in `out` (twice as long).
fn hex_into<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
    std::str::from_utf8(&out[..2 * bytes.len()]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn decimals_are_written_as_display_writes_them() {
        let mut digits = [0u8; 10];
        for n in (0..2_000).chain([9_999, 10_000, 65_535, 99_999_999, 1 << 31, u32::MAX]) {
            assert_eq!(decimal(n, &mut digits), n.to_string().as_bytes(), "{n}");
        }
    }

    /// Both ends of a connection write the same edge key, whatever their address families.
    #[test]
    fn edge_keys_match_across_ends() {
        let client = Endpoints::new(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let server = Endpoints::new(
            "[::ffff:10.0.0.2]:80".parse().unwrap(),
            "[::ffff:10.0.0.1]:40000".parse().unwrap(),
        );
        let c = EdgeText::new(client.edge_prefix(false), u32::MAX);
        let s = EdgeText::new(server.edge_prefix(true), u32::MAX);
        assert_eq!(c.as_str(), "10.0.0.1:40000>10.0.0.2:80#4294967295");
        assert_eq!(c.as_str(), s.as_str());
        assert_eq!(client.edge_prefix(true), "10.0.0.2:80>10.0.0.1:40000#");
        // The attributes keep the address as the process saw it.
        assert_eq!(server.server(true), ("::ffff:10.0.0.2", 80));
        assert_eq!(client.server(false), ("10.0.0.2", 80));
        let v6 = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let longest = Endpoints::new(v6.parse().unwrap(), v6.parse().unwrap());
        let t = EdgeText::new(longest.edge_prefix(false), u32::MAX);
        assert_eq!(t.as_str(), format!("{v6}>{v6}#4294967295"));
        assert_eq!(longest.text.len, ENDS_TEXT_BYTES, "the longest ends fit");
        for (ip, end) in [
            ("0.0.0.0:0", "0.0.0.0:0"),
            ("255.10.0.1:65535", "255.10.0.1:65535"),
            ("[::1]:80", "[::1]:80"),
            ("[::ffff:10.0.0.1]:8080", "10.0.0.1:8080"),
        ] {
            let at: SocketAddr = ip.parse().unwrap();
            let ends = Endpoints::new(at, at);
            assert_eq!(ends.local_ip(), at.ip().to_string());
            assert_eq!(ends.edge_prefix(false), format!("{end}>{end}#"));
        }
        assert_eq!(EdgeText::new("a>b#", 0).as_str(), "a>b#0");
        assert_eq!(
            EdgeText::new("a>b#", 1_000_000_000).as_str(),
            "a>b#1000000000"
        );
    }

    fn exchange(role: Role, status: Option<u16>) -> Exchange {
        Exchange {
            conn: 1,
            role,
            detail: protocol::Detail::Http(protocol::http::Detail {
                request: protocol::http::head::RequestText::new(
                    "GET",
                    "/x/42",
                    Some("localhost:8080"),
                    Some("curl/8.0 \u{e9}"),
                ),
                status,
            }),
            start_ns: 1_000,
            end_ns: 3_000,
            request_bytes: 10,
            response_bytes: u64::MAX,
            span: 0,
            tcp_seq: Some(4_000_000_000),
        }
    }

    fn ends() -> Arc<Endpoints> {
        Arc::new(Endpoints::new(
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:5555".parse().unwrap(),
        ))
    }

    #[test]
    fn server_span_follows_http_semantic_conventions() {
        let s = Span::new(exchange(Role::Server, Some(503)), ends(), None, |t| t + 10).to_proto();
        assert_eq!(s.name, "GET /x/{id}");
        assert_eq!(s.kind, SpanKind::Server as i32);
        assert_eq!(
            (s.start_time_unix_nano, s.end_time_unix_nano),
            (1_010, 3_010)
        );
        assert_eq!(s.status.unwrap().code, StatusCode::Error as i32);
        let s = Span::new(exchange(Role::Server, Some(404)), ends(), None, |t| t).to_proto();
        assert_eq!(s.status.unwrap().code, StatusCode::Unset as i32);
        let s = Span::new(exchange(Role::Client, Some(404)), ends(), None, |t| t).to_proto();
        assert_eq!(s.status.unwrap().code, StatusCode::Error as i32);
    }

    /// The hand-written encoder and the `prost` structs must describe the same span, for every
    /// shape of span the agent makes: attributes short enough for one-byte lengths and longer.
    #[test]
    fn direct_encoding_decodes_to_the_proto_span() {
        let long = "x".repeat(300);
        for role in [Role::Server, Role::Client] {
            for status in [Some(200), Some(404), Some(503), None] {
                for (linked, long_text) in [(false, false), (true, false), (false, true)] {
                    let mut ex = exchange(role, status);
                    if long_text {
                        let path = format!("/{long}");
                        ex.detail = protocol::Detail::Http(protocol::http::Detail {
                            request: protocol::http::head::RequestText::new(
                                "GET",
                                &path,
                                None,
                                Some(&long),
                            ),
                            status,
                        });
                    }
                    let mut span = Span::new(ex, ends(), None, |t| t * 7);
                    if linked {
                        span.parent_span_id = Some([9; 8]);
                        span.link = Some((Source::TcpSeq, Confidence::High));
                    }
                    let mut buf = Vec::new();
                    span.encode(&mut buf, &mut String::new());
                    let decoded = ProtoSpan::decode(buf.as_slice()).unwrap();
                    assert_eq!(
                        decoded,
                        span.to_proto(),
                        "{role:?} {status:?} {linked} {long_text}"
                    );
                }
            }
        }
    }
}
