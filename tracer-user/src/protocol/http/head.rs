//! HTTP/1.x message-head parsers for traffic watched from the side.
//!
//! The bytes come from syscall captures: a head may be cut anywhere, and the connection may not
//! speak HTTP at all. So the parsers answer `Partial` only while the bytes are still a plausible
//! prefix of a head, and `Invalid` as soon as they cannot be one, which lets the caller stop
//! buffering early. Each call parses from scratch (no state is kept between calls); heads are
//! small and the caller bounds what it buffers.
//!
//! Only the headers the tracer reports or needs for framing are looked at. The others, credentials
//! included, are validated and skipped without being copied anywhere.

use crate::{
    context::{self, RemoteContext},
    pairing::Parse,
};

/// More header lines than this is not a real client or server: `Invalid`.
pub const MAX_HEADERS: usize = 100;

/// Longest method token accepted (`Invalid` beyond), so that a run of letters in binary data is
/// not buffered for long as a "partial method".
const MAX_METHOD_LEN: usize = 20;

/// The methods that make a connection count as HTTP, each with the space that ends it.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

const VERSION_PREFIX: &[u8] = b"HTTP/1.";

/// The start line and the headers of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub text: RequestText,
    /// `None` when absent, or when `Transfer-Encoding` is present (which overrides it).
    pub content_length: Option<u64>,
    /// The last transfer coding is `chunked`: the body is framed by chunk sizes.
    pub chunked: bool,
    /// Bytes from the start of the buffer to just after the empty line ending the head.
    pub head_len: usize,
    /// The caller's trace context (`traceparent`, else B3), if it sent one.
    pub context: Option<RemoteContext>,
}

/// What a span reports of its request: method, path, host and user agent, kept in one
/// allocation. The agent holds one per request until its response ends; four strings each were
/// ~7% of its time (each allocated here and freed later on the exporter's thread).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequestText {
    text: String,
    path_at: u32,
    host_at: u32,
    user_agent_at: u32,
    has_host: bool,
    has_user_agent: bool,
}

impl RequestText {
    /// `path` is the target without query string or fragment (query strings often carry
    /// tokens); `host` the authority of an absolute-form target, else the `Host` header.
    #[cfg(test)]
    pub fn new(method: &str, path: &str, host: Option<&str>, user_agent: Option<&str>) -> Self {
        Self::from_bytes(
            method.as_bytes(),
            path.as_bytes(),
            host.map(str::as_bytes),
            user_agent.map(str::as_bytes),
        )
    }

    /// As `new`, from the bytes on the wire (invalid UTF-8 is replaced).
    pub(crate) fn from_bytes(
        method: &[u8],
        path: &[u8],
        host: Option<&[u8]>,
        user_agent: Option<&[u8]>,
    ) -> Self {
        let parts = [
            method,
            path,
            host.unwrap_or_default(),
            user_agent.unwrap_or_default(),
        ];
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            bytes.extend_from_slice(part);
        }
        // One UTF-8 check for the four parts (four were 3% of the agent); the rare invalid text
        // is built again part by part, each with its invalid bytes replaced.
        let path_at = method.len();
        let host_at = path_at + path.len();
        let ends = [path_at, host_at, host_at + parts[2].len()];
        let (text, [path_at, host_at, user_agent_at]) = match String::from_utf8(bytes) {
            // Each part valid on its own: a character split between two parts is valid in the
            // whole text but not in either part.
            Ok(text) if ends.iter().all(|&at| text.is_char_boundary(at)) => (text, ends),
            _ => {
                let mut text = String::new();
                let mut ends = [0; 3];
                for (part, end) in parts.iter().zip(&mut ends) {
                    text.push_str(&String::from_utf8_lossy(part));
                    *end = text.len();
                }
                text.push_str(&String::from_utf8_lossy(parts[3]));
                (text, ends)
            }
        };
        let [path_at, host_at, user_agent_at] =
            [path_at, host_at, user_agent_at].map(|at| at as u32);
        RequestText {
            text,
            path_at,
            host_at,
            user_agent_at,
            has_host: host.is_some(),
            has_user_agent: user_agent.is_some(),
        }
    }

    pub fn method(&self) -> &str {
        &self.text[..self.path_at as usize]
    }

    pub fn path(&self) -> &str {
        &self.text[self.path_at as usize..self.host_at as usize]
    }

    pub fn host(&self) -> Option<&str> {
        self.has_host
            .then(|| &self.text[self.host_at as usize..self.user_agent_at as usize])
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.has_user_agent
            .then(|| &self.text[self.user_agent_at as usize..])
    }
}

/// The status line and the headers of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// `None` when absent, or when `Transfer-Encoding` is present (which overrides it).
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub head_len: usize,
    /// The server will close the connection after this response: `Connection: close`, or
    /// HTTP/1.0 without `Connection: keep-alive`.
    pub close: bool,
    /// `Upgrade: h2c`: with a 101, the connection goes on in HTTP/2.
    pub upgrade_h2c: bool,
}

/// Parses the request head at the start of `buf`; bytes after the head are ignored.
#[must_use]
pub fn parse_request(buf: &[u8]) -> Parse<RequestHead> {
    request(buf).into()
}

/// Parses the response head at the start of `buf`; bytes after the head are ignored.
#[must_use]
pub fn parse_response(buf: &[u8]) -> Parse<ResponseHead> {
    response(buf).into()
}

/// `buf` starts with a well-known method and a space.
///
/// Deliberately narrower than `parse_request` (which takes any token as method): deciding that a
/// connection is HTTP from its first bytes must not be fooled by a binary protocol that happens
/// to start with a few letters.
#[must_use]
pub fn looks_like_request(buf: &[u8]) -> bool {
    METHODS.iter().any(|m| buf.starts_with(m))
}

/// `buf` starts like an HTTP/1.x status line.
#[must_use]
pub fn looks_like_response(buf: &[u8]) -> bool {
    buf.starts_with(VERSION_PREFIX)
}

/// What the first bytes of a message say about its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sniff {
    Request,
    Response,
    /// Too short to tell, but still a prefix of a request or response start.
    Undecided,
    Other,
}

/// Classifies the first bytes of a message; 8 bytes are always enough to decide.
pub(crate) fn sniff(buf: &[u8]) -> Sniff {
    if looks_like_request(buf) {
        return Sniff::Request;
    }
    if looks_like_response(buf) {
        return Sniff::Response;
    }
    let prefix_of = |sig: &[u8]| buf.len() < sig.len() && sig.starts_with(buf);
    if METHODS.iter().any(|m| prefix_of(m)) || prefix_of(VERSION_PREFIX) {
        Sniff::Undecided
    } else {
        Sniff::Other
    }
}

/// Why parsing stopped, so that the steps can use `?`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Partial,
    Invalid,
}

type Step<T> = Result<T, Stop>;

impl<T> From<Step<T>> for Parse<T> {
    fn from(step: Step<T>) -> Self {
        match step {
            Ok(v) => Parse::Complete(v),
            Err(Stop::Partial) => Parse::Partial,
            Err(Stop::Invalid) => Parse::Invalid,
        }
    }
}

fn request(buf: &[u8]) -> Step<RequestHead> {
    let line = request_line(buf)?;
    let (fields, head_len) = headers(buf, line.next)?;
    let (path, authority) = split_target(line.target);
    // RFC 9112 3.2.2: with an absolute-form target the authority in it wins over `Host`.
    let host = authority.filter(|a| !a.is_empty()).or(fields.host);
    Ok(RequestHead {
        text: RequestText::from_bytes(line.method, path, host, fields.user_agent),
        content_length: fields.body_length(),
        chunked: fields.chunked,
        head_len,
        context: fields.context(),
    })
}

fn response(buf: &[u8]) -> Step<ResponseHead> {
    let line = status_line(buf)?;
    let (fields, head_len) = headers(buf, line.next)?;
    Ok(ResponseHead {
        status: line.status,
        content_length: fields.body_length(),
        chunked: fields.chunked,
        head_len,
        close: fields.close || (line.minor == 0 && !fields.keep_alive),
        upgrade_h2c: fields.upgrade_h2c,
    })
}

struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    /// Index of the first header line.
    next: usize,
}

fn request_line(buf: &[u8]) -> Step<RequestLine<'_>> {
    let Some(method_end) = buf.iter().position(|&b| !is_tchar(b)) else {
        return Err(if buf.len() <= MAX_METHOD_LEN {
            Stop::Partial
        } else {
            Stop::Invalid
        });
    };
    if method_end == 0 || method_end > MAX_METHOD_LEN || buf[method_end] != b' ' {
        return Err(Stop::Invalid);
    }
    let target_start = method_end + 1;
    let rest = &buf[target_start..];
    let Some(target_len) = rest.iter().position(|&b| !is_target_byte(b)) else {
        return Err(Stop::Partial);
    };
    // An empty target, or a line ending right after it (HTTP/0.9), is not HTTP/1.x.
    if target_len == 0 || rest[target_len] != b' ' {
        return Err(Stop::Invalid);
    }
    let (_minor, after_version) = version(buf, target_start + target_len + 1)?;
    let next = line_end(buf, after_version)?;
    Ok(RequestLine {
        method: &buf[..method_end],
        target: &rest[..target_len],
        next,
    })
}

struct StatusLine {
    status: u16,
    minor: u8,
    next: usize,
}

fn status_line(buf: &[u8]) -> Step<StatusLine> {
    let (minor, at) = version(buf, 0)?;
    match buf.get(at) {
        None => return Err(Stop::Partial),
        Some(b' ') => {}
        Some(_) => return Err(Stop::Invalid),
    }
    let mut status = 0u16;
    for i in at + 1..at + 4 {
        match buf.get(i) {
            None => return Err(Stop::Partial),
            Some(d) if d.is_ascii_digit() => status = status * 10 + u16::from(d - b'0'),
            Some(_) => return Err(Stop::Invalid),
        }
    }
    if status < 100 {
        return Err(Stop::Invalid);
    }
    let after_code = at + 4;
    let next = match buf.get(after_code) {
        None => return Err(Stop::Partial),
        Some(b' ') => {
            let reason = &buf[after_code + 1..];
            match reason.iter().position(|&b| !is_value_byte(b)) {
                None => return Err(Stop::Partial),
                Some(len) => line_end(buf, after_code + 1 + len)?,
            }
        }
        // Some servers send no reason phrase and no space before the line end.
        Some(_) => line_end(buf, after_code)?,
    };
    Ok(StatusLine {
        status,
        minor,
        next,
    })
}

/// Parses `HTTP/1.x` at `at`: the minor version and the index after it.
fn version(buf: &[u8], at: usize) -> Step<(u8, usize)> {
    let rest = buf.get(at..).unwrap_or_default();
    let n = rest.len().min(VERSION_PREFIX.len());
    if rest[..n] != VERSION_PREFIX[..n] {
        return Err(Stop::Invalid);
    }
    match rest.get(VERSION_PREFIX.len()) {
        None => Err(Stop::Partial),
        Some(d) if d.is_ascii_digit() => Ok((d - b'0', at + VERSION_PREFIX.len() + 1)),
        Some(_) => Err(Stop::Invalid),
    }
}

/// Expects CRLF or a bare LF at `at`; returns the index after it.
fn line_end(buf: &[u8], at: usize) -> Step<usize> {
    match buf.get(at) {
        None => Err(Stop::Partial),
        Some(b'\n') => Ok(at + 1),
        Some(b'\r') => match buf.get(at + 1) {
            None => Err(Stop::Partial),
            Some(b'\n') => Ok(at + 2),
            Some(_) => Err(Stop::Invalid),
        },
        Some(_) => Err(Stop::Invalid),
    }
}

/// What the tracer takes from the header lines. Values borrow from the buffer so that nothing
/// is allocated until the head is known to be complete.
#[derive(Default)]
struct Fields<'a> {
    host: Option<&'a [u8]>,
    user_agent: Option<&'a [u8]>,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    upgrade_h2c: bool,
    traceparent: Option<&'a [u8]>,
    b3: Option<&'a [u8]>,
    b3_trace_id: Option<&'a [u8]>,
    b3_span_id: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn apply(&mut self, name: &[u8], value: &'a [u8]) -> Step<()> {
        if name.eq_ignore_ascii_case(b"host") {
            self.host.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            self.user_agent.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(value)?;
            // Conflicting lengths are how request smuggling works; no honest peer sends them.
            if self.content_length.is_some_and(|prev| prev != n) {
                return Err(Stop::Invalid);
            }
            self.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            // Only the last coding frames the body, across all the header's lines.
            if let Some(last) = value
                .split(|&b| b == b',')
                .map(trim)
                .rfind(|t| !t.is_empty())
            {
                self.chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"traceparent") {
            self.traceparent.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"b3") {
            self.b3.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"x-b3-traceid") {
            self.b3_trace_id.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"x-b3-spanid") {
            self.b3_span_id.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.upgrade_h2c = trim(value).eq_ignore_ascii_case(b"h2c");
        }
        Ok(())
    }

    /// W3C `traceparent` wins over B3 when both came (the OpenTelemetry SDKs' default order).
    fn context(&self) -> Option<RemoteContext> {
        self.traceparent
            .and_then(context::parse_traceparent)
            .or_else(|| self.b3.and_then(context::parse_b3))
            .or_else(|| match (self.b3_trace_id, self.b3_span_id) {
                (Some(t), Some(s)) => context::parse_b3_ids(t, s),
                _ => None,
            })
    }

    /// RFC 9112 6.3: `Transfer-Encoding` makes `Content-Length` meaningless.
    fn body_length(&self) -> Option<u64> {
        if self.transfer_encoding {
            None
        } else {
            self.content_length
        }
    }
}

/// Parses the header lines from `at` up to and including the empty line.
///
/// One pass over the bytes, each looked up once: this runs for every head the agent sees, and
/// a search for the line end followed by separate validation passes was a tenth of its time
/// (tried again with `memchr` for the line end and colon: 20% slower than this loop).
fn headers(buf: &[u8], mut at: usize) -> Step<(Fields<'_>, usize)> {
    let mut fields = Fields::default();
    let mut count = 0;
    loop {
        let rest = buf.get(at..).unwrap_or_default();
        let name_len = token_run(rest);
        if name_len == 0 {
            // Not a name: the empty line that ends the head, or garbage (a folded line, a
            // colon without a name).
            return line_end(buf, at).map(|end| (fields, end));
        }
        count += 1;
        if count > MAX_HEADERS {
            return Err(Stop::Invalid);
        }
        match rest.get(name_len) {
            None => return Err(Stop::Partial),
            Some(b':') => {}
            // Whitespace before the colon, or a line without one.
            Some(_) => return Err(Stop::Invalid),
        }
        let value_start = name_len + 1;
        let Some(value_len) = value_run(&rest[value_start..]) else {
            return Err(Stop::Partial);
        };
        let value_end = value_start + value_len;
        let next = line_end(rest, value_end)?;
        fields.apply(&rest[..name_len], trim(&rest[value_start..value_end]))?;
        at += next;
    }
}

/// Where the run of field-value bytes at the start of `bytes` ends (`None`: it does not end in
/// `bytes`).
///
/// Eight bytes at a time: values are most of a head's bytes (a `Date` is 29), and nearly all are
/// plain ASCII up to the CR. A tab, or the last few bytes of the buffer, go byte by byte.
fn value_run(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(word) = word_at(bytes, at) {
        let flagged = control_or_del(word);
        if flagged != 0 {
            at += first_flagged(flagged);
            if bytes[at] != b'\t' {
                return Some(at);
            }
            break;
        }
        at += 8;
    }
    let tail = bytes[at..].iter().position(|&b| !is_value_byte(b))?;
    Some(at + tail)
}

/// Where the run of token bytes (a header name) at the start of `bytes` ends, or its length.
///
/// Eight bytes at a time while they are letters, digits and `-` (what real header names are
/// made of), then byte by byte from the first other byte, which is normally the colon.
fn token_run(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(word) = word_at(bytes, at) {
        let flagged = not_alphanumeric_or_dash(word);
        if flagged != 0 {
            at += first_flagged(flagged);
            break;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&b| !is_tchar(b))
        .unwrap_or(bytes.len() - at)
}

// Byte-parallel tests on eight bytes read as a little-endian word: each sets the high bit of
// the bytes it flags. The lowest flagged byte is always right (a borrow only runs upwards, from
// a flagged byte), which is all the scanners use.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

fn word_at(bytes: &[u8], at: usize) -> Option<u64> {
    let chunk = bytes.get(at..at + 8)?;
    Some(u64::from_le_bytes(chunk.try_into().expect("eight bytes")))
}

/// Index of the lowest flagged byte.
fn first_flagged(flagged: u64) -> usize {
    flagged.trailing_zeros() as usize / 8
}

/// Flags bytes below 0x20 (control characters, tab included) and DEL. The classic "has a byte
/// less than n": a byte below 0x20 borrows when 0x20 is subtracted, and `!word` keeps bytes
/// >= 0x80 (obs-text, allowed) unflagged.
fn control_or_del(word: u64) -> u64 {
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    let del = word ^ (ONES * 0x7f);
    let del = del.wrapping_sub(ONES) & !del & HIGHS;
    control | del
}

/// Flags bytes that are not ASCII letters, digits or `-`. Exact for every byte: the range tests
/// work on 7-bit values with the high bit set first, so no byte borrows from its neighbour.
fn not_alphanumeric_or_dash(word: u64) -> u64 {
    let low7 = word & !HIGHS;
    // High bit set where the byte is >= lo, resp. <= hi.
    let at_least = |x: u64, lo: u8| ((x | HIGHS) - ONES * u64::from(lo)) & HIGHS;
    let at_most = |x: u64, hi: u8| (((ONES * u64::from(hi)) | HIGHS) - x) & HIGHS;
    let folded = low7 | (ONES * 0x20); // upper-case letters to lower-case
    let letter = at_least(folded, b'a') & at_most(folded, b'z');
    let digit = at_least(low7, b'0') & at_most(low7, b'9');
    let dash = at_least(low7, b'-') & at_most(low7, b'-');
    let ascii = !word & HIGHS;
    !((letter | digit | dash) & ascii) & HIGHS
}

fn content_length(value: &[u8]) -> Step<u64> {
    // A list of identical values ("5, 5") is tolerated, as RFC 9110 8.6 allows.
    let mut result = None;
    for item in value.split(|&b| b == b',').map(trim) {
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(Stop::Invalid);
        }
        let n = item.iter().try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        });
        let Some(n) = n else {
            return Err(Stop::Invalid);
        };
        if result.is_some_and(|prev| prev != n) {
            return Err(Stop::Invalid);
        }
        result = Some(n);
    }
    result.ok_or(Stop::Invalid)
}

/// The path a request target reports (`url.path`, the route's source).
pub(crate) fn target_path(target: &[u8]) -> &[u8] {
    split_target(target).0
}

/// Splits a request target into the path to report and the authority it names, if any.
fn split_target(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    let Some(after_scheme) = absolute_form(target) else {
        // origin-form ("/p?q"), asterisk-form ("*") or authority-form ("host:443", CONNECT)
        return (strip_query(target), None);
    };
    let authority_len = after_scheme
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(after_scheme.len());
    let (authority, rest) = after_scheme.split_at(authority_len);
    // User info ("user:password@") is a credential: never reported.
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let path = strip_query(rest);
    let path: &[u8] = if path.is_empty() { b"/" } else { path };
    (path, Some(authority))
}

/// For `scheme://rest`, returns `rest`.
fn absolute_form(target: &[u8]) -> Option<&[u8]> {
    let sep = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..sep];
    let is_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    is_scheme.then(|| &target[sep + 3..])
}

fn strip_query(target: &[u8]) -> &[u8] {
    match target.iter().position(|&b| b == b'?' || b == b'#') {
        Some(i) => &target[..i],
        None => target,
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Byte classes as tables: these run once per byte of every head.
macro_rules! byte_table {
    (|$b:ident| $test:expr) => {{
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            let $b = i as u8;
            t[i] = $test;
            i += 1;
        }
        t
    }};
}

/// RFC 9110 5.6.2 token characters.
const TCHAR: [bool; 256] = byte_table!(|b| b.is_ascii_alphanumeric()
    || matches!(
        b,
        b'!' | b'#'
            | b'$'
            | b'%'
            | b'&'
            | b'\''
            | b'*'
            | b'+'
            | b'-'
            | b'.'
            | b'^'
            | b'_'
            | b'`'
            | b'|'
            | b'~'
    ));

/// Field value and reason phrase characters: visible, space, tab and obs-text (bytes >= 0x80
/// are let through because real clients send raw UTF-8).
const VALUE_BYTE: [bool; 256] = byte_table!(|b| b == b'\t' || (b >= b' ' && b != 0x7f));

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// Visible characters; bytes >= 0x80 are let through because real clients send raw UTF-8.
fn is_target_byte(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

fn is_value_byte(b: u8) -> bool {
    VALUE_BYTE[usize::from(b)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(buf: &[u8]) -> RequestHead {
        match parse_request(buf) {
            Parse::Complete(h) => h,
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn resp(buf: &[u8]) -> ResponseHead {
        match parse_response(buf) {
            Parse::Complete(h) => h,
            other => panic!("expected a complete response, got {other:?}"),
        }
    }

    /// The word-at-a-time scanners against the byte classes they stand for: every byte value
    /// at every place in a word, in buffers of every length around a word's, and random
    /// buffers of the bytes near the classes' edges.
    #[test]
    fn scanners_agree_with_the_byte_classes() {
        let first_not = |buf: &[u8], class: fn(u8) -> bool| buf.iter().position(|&b| !class(b));
        let check = |buf: &[u8]| {
            let token = first_not(buf, is_tchar).unwrap_or(buf.len());
            assert_eq!(token_run(buf), token, "token run of {buf:?}");
            assert_eq!(
                value_run(buf),
                first_not(buf, is_value_byte),
                "value run of {buf:?}"
            );
        };
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut buf = vec![b'a'; len];
                    buf[at] = b;
                    check(&buf);
                    buf.fill(b'~');
                    buf[at] = b;
                    check(&buf);
                }
            }
        }
        let edges = b"\0\t\n\r\x1f !\"(),-./09:;@AZ[\\]^_`az{|}~\x7f\x80\xff";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            let mut buf = Vec::new();
            for _ in 0..(seed >> 60) + 8 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                buf.push(edges[(seed >> 33) as usize % edges.len()]);
            }
            check(&buf);
        }
    }

    #[test]
    fn invalid_utf8_is_replaced_part_by_part() {
        // Invalid bytes in the path and user agent, and a two-byte character split between the
        // path and the host (valid in the text the parts make, not in either part).
        let h = req(b"GET /a\xffb\xc3 HTTP/1.1\r\nHost: \xa9h\r\nUser-Agent: u\xfe\r\n\r\n");
        assert_eq!(h.text.method(), "GET");
        assert_eq!(h.text.path(), "/a\u{fffd}b\u{fffd}");
        assert_eq!(h.text.host(), Some("\u{fffd}h"));
        assert_eq!(h.text.user_agent(), Some("u\u{fffd}"));
        // Only the split character.
        let h = req(b"GET /\xc3 HTTP/1.1\r\nHost: \xa9x\r\n\r\n");
        assert_eq!(h.text.path(), "/\u{fffd}");
        assert_eq!(h.text.host(), Some("\u{fffd}x"));
        assert_eq!(h.text.user_agent(), None);
    }

    #[test]
    fn get_with_query_string_stripped() {
        let buf = b"GET /api/users?id=7&token=secret#frag HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.0\r\n\r\n";
        let h = req(buf);
        assert_eq!(h.text.method(), "GET");
        assert_eq!(h.text.path(), "/api/users");
        assert_eq!(h.text.host(), Some("example.com"));
        assert_eq!(h.text.user_agent(), Some("curl/8.0"));
        assert_eq!(h.content_length, None);
        assert!(!h.chunked);
        assert_eq!(h.head_len, buf.len());
    }

    #[test]
    fn fragment_only_and_bytes_after_head() {
        let buf = b"GET /a#x HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n";
        let h = req(buf);
        assert_eq!(h.text.path(), "/a");
        assert_eq!(h.head_len, b"GET /a#x HTTP/1.1\r\n\r\n".len());
    }

    #[test]
    fn absolute_form_target() {
        let h = req(b"GET http://user:pw@proxy.test:8080/p/q?x=1 HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(h.text.path(), "/p/q");
        assert_eq!(h.text.host(), Some("proxy.test:8080"));

        let h = req(b"GET https://h.test?q HTTP/1.1\r\n\r\n");
        assert_eq!(h.text.path(), "/");
        assert_eq!(h.text.host(), Some("h.test"));
    }

    #[test]
    fn other_target_forms() {
        let h = req(b"CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n");
        assert_eq!(h.text.path(), "db.test:5432");
        assert_eq!(req(b"OPTIONS * HTTP/1.1\r\n\r\n").text.path(), "*");
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let h = req(
            b"POST /x HTTP/1.1\r\nhOsT: a.test\r\nCONTENT-LENGTH: 12\r\nuser-AGENT:  ua/1 \r\n\r\n",
        );
        assert_eq!(h.text.host(), Some("a.test"));
        assert_eq!(h.content_length, Some(12));
        assert_eq!(h.text.user_agent(), Some("ua/1"));
        let r = resp(b"HTTP/1.1 200 OK\r\ntransfer-ENCODING: Chunked\r\n\r\n");
        assert!(r.chunked);
    }

    #[test]
    fn lf_only_line_endings() {
        let buf = b"GET /lf HTTP/1.1\nHost: h\n\n";
        let h = req(buf);
        assert_eq!(h.text.path(), "/lf");
        assert_eq!(h.text.host(), Some("h"));
        assert_eq!(h.head_len, buf.len());
        let r = resp(b"HTTP/1.1 404 Not Found\nContent-Length: 3\n\nabc");
        assert_eq!(r.status, 404);
        assert_eq!(r.content_length, Some(3));
        assert_eq!(
            r.head_len,
            b"HTTP/1.1 404 Not Found\nContent-Length: 3\n\n".len()
        );
    }

    #[test]
    fn partial_on_every_truncation_of_a_valid_head() {
        let request = b"POST /upload?x HTTP/1.1\r\nHost: h.test\r\nContent-Length: 10\r\n\r\n";
        for n in 0..request.len() {
            assert_eq!(
                parse_request(&request[..n]),
                Parse::Partial,
                "request cut at {n}"
            );
        }
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        for n in 0..response.len() {
            assert_eq!(
                parse_response(&response[..n]),
                Parse::Partial,
                "response cut at {n}"
            );
        }
    }

    #[test]
    fn invalid_on_garbage_and_binary() {
        let cases: &[&[u8]] = &[
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\x00\x00\x00\x01binary",
            b"*3\r\n$3\r\nSET\r\n",
            b"GET\x00/ HTTP/1.1\r\n\r\n",
            b"GET  HTTP/1.1\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\rX\r\n\r\n",
            b"AVERYLONGMETHODNAMETHATISNOTREAL / HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert_eq!(
                parse_request(case),
                Parse::Invalid,
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        // Rejected before any line feed arrives.
        assert_eq!(parse_request(b"\x16\x03\x01"), Parse::Invalid);
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nX\x00"), Parse::Invalid);
        assert_eq!(parse_response(b"HTTP/1.1 2x0 OK\r\n\r\n"), Parse::Invalid);
        assert_eq!(parse_response(b"HTTP/1.1 099 Low\r\n\r\n"), Parse::Invalid);
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH_9.6\r\n"), Parse::Invalid);
    }

    #[test]
    fn too_many_headers() {
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let mut ok = buf.clone();
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(parse_request(&ok), Parse::Complete(_)));
        buf.extend_from_slice(b"X-Last: v\r\n\r\n");
        assert_eq!(parse_request(&buf), Parse::Invalid);
    }

    #[test]
    fn chunked_and_content_length() {
        let r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n");
        assert_eq!(
            (r.content_length, r.chunked, r.close),
            (Some(42), false, false)
        );
        let r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(r.chunked);
        // Transfer-Encoding wins over Content-Length, whatever the coding.
        let r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!((r.content_length, r.chunked), (None, true));
        let r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!((r.content_length, r.chunked), (None, false));
        let r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n");
        assert_eq!(r.content_length, Some(7));
        let h = req(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(h.chunked);
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        assert!(resp(b"HTTP/1.0 200 OK\r\n\r\n").close);
        assert!(!resp(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").close);
        assert!(resp(b"HTTP/1.1 200 OK\r\nConnection: upgrade, close\r\n\r\n").close);
        assert!(!resp(b"HTTP/1.1 200 OK\r\n\r\n").close);
    }

    #[test]
    fn continue_and_reasonless_status() {
        let buf = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\n";
        let r = resp(buf);
        assert_eq!(r.status, 100);
        assert_eq!(r.head_len, b"HTTP/1.1 100 Continue\r\n\r\n".len());
        assert_eq!(resp(&buf[r.head_len..]).status, 201);
        assert_eq!(resp(b"HTTP/1.1 503\r\n\r\n").status, 503);
        assert_eq!(resp(b"HTTP/1.1 200 \r\n\r\n").status, 200);
    }

    #[test]
    fn credentials_are_not_kept() {
        let h =
            req(b"GET / HTTP/1.1\r\nAuthorization: Bearer s3cr3t\r\nCookie: sid=s3cr3t\r\n\r\n");
        assert!(!format!("{h:?}").contains("s3cr3t"));
        let r = resp(b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=s3cr3t\r\n\r\n");
        assert!(!format!("{r:?}").contains("s3cr3t"));
    }

    #[test]
    fn sniffing() {
        assert!(looks_like_request(b"OPTIONS * HTTP/1.1"));
        assert!(!looks_like_request(b"GETX / HTTP/1.1"));
        assert!(!looks_like_request(b"PRI * HTTP/2.0"));
        assert!(looks_like_response(b"HTTP/1.0 200"));
        assert!(!looks_like_response(b"HTTP/2 200"));
        assert_eq!(sniff(b"DEL"), Sniff::Undecided);
        assert_eq!(sniff(b"HTTP/"), Sniff::Undecided);
        assert_eq!(sniff(b"DELETE /"), Sniff::Request);
        assert_eq!(sniff(b"HTTP/1.1 "), Sniff::Response);
        assert_eq!(sniff(b"\x16\x03\x01"), Sniff::Other);
        assert_eq!(sniff(b"GETS"), Sniff::Other);
    }

    #[test]
    fn never_panics_on_random_bytes() {
        use tracer_test_support::Rng;
        let seeds: &[&[u8]] = &[
            b"GET http://u@h:1/p?q HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 204 No Content\nConnection: keep-alive, close\n\n",
            b"",
        ];
        // Bytes that matter to the parsers, so that mutations reach deep states.
        let alphabet = b"\r\n :,;/?#@GETHTP1.0chunked\t\x00\xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut buf = Vec::new();
        for _ in 0..20_000 {
            buf.clear();
            let seed = seeds[rng.index(seeds.len())];
            buf.extend_from_slice(seed);
            for _ in 0..rng.index(8) {
                let byte = if rng.index(2) == 0 {
                    alphabet[rng.index(alphabet.len())]
                } else {
                    rng.next() as u8
                };
                match rng.index(3) {
                    0 if !buf.is_empty() => {
                        let i = rng.index(buf.len());
                        buf[i] = byte;
                    }
                    1 => {
                        let i = rng.index(buf.len() + 1);
                        buf.insert(i, byte);
                    }
                    _ => {
                        let n = rng.index(buf.len() + 1);
                        buf.truncate(n);
                    }
                }
            }
            for _ in 0..rng.index(64) {
                buf.push(rng.next() as u8);
            }
            if let Parse::Complete(h) = parse_request(&buf) {
                assert!(h.head_len <= buf.len());
            }
            if let Parse::Complete(h) = parse_response(&buf) {
                assert!(h.head_len <= buf.len());
            }
            let _ = (
                looks_like_request(&buf),
                looks_like_response(&buf),
                sniff(&buf),
            );
        }
    }
}
