//! DNS, over UDP and TCP: one span per query, from the query's send to its response's read,
//! matched by query id and name.
//!
//! The probes follow UDP sockets connected to port 53 (stub resolvers such as glibc's and
//! dig connect theirs), where each record is one datagram, and TCP connections, where messages
//! come after a two-byte length. Only the header and the question are read: the answers are
//! counted, not kept.

use std::collections::VecDeque;

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use crate::{
    pairing::{Chunk, ConnId, Cx, Exchange, Mark, RequestStart, Role, SpanKey, MAX_PENDING},
    protocol::{self, Detection, Protocol},
    spans::{Endpoints, Value},
};

/// Header bytes of a DNS message.
const HEADER: usize = 12;

/// Bytes of a message kept: the header and the question (names are at most 255 bytes).
const KEEP: usize = 512;

/// A query (a standard query with one question) at the start of `probe`, with or without the
/// two-byte length of DNS over TCP.
pub(crate) fn detect(probe: &[u8], direction: u32) -> Detection {
    let found = Detection::Found(Protocol::Dns, Role::sending_requests(direction));
    for message in [probe, probe.get(2..).unwrap_or_default()] {
        match header_kind(message) {
            Some(Kind::Query) => return found,
            Some(Kind::Response) => return Detection::NotAStart,
            None => {}
        }
    }
    // Too short to tell: the start of a length-prefixed query (DNS over TCP; a datagram
    // comes whole), its length plausible for a query and its flags, once there, a query's.
    // (dnsmasq reads the length one byte at a time.)
    let undecided = probe.len() < HEADER + 4
        && match probe {
            [high] => *high < 4,
            [high, low, ..] => (17..1024).contains(&u16::from_be_bytes([*high, *low])),
            [] => false,
        }
        && probe.get(4).is_none_or(|f| f & 0xf8 == 0);
    if undecided {
        Detection::Undecided
    } else {
        Detection::Nothing
    }
}

enum Kind {
    Query,
    Response,
}

/// A header with one question, whose name starts with a plausible label.
fn header_kind(m: &[u8]) -> Option<Kind> {
    let h = m.get(..HEADER + 2)?;
    let flags = u16::from_be_bytes([h[2], h[3]]);
    let count = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let opcode = (flags >> 11) & 0xf;
    let label = usize::from(h[HEADER]);
    let plausible_name = (1..=63).contains(&label)
        && (h[HEADER + 1].is_ascii_alphanumeric() || h[HEADER + 1] == b'_');
    if opcode != 0 || count(4) != 1 || !plausible_name {
        return None;
    }
    if flags & 0x8000 == 0 {
        (count(6) == 0 && count(8) == 0 && count(10) <= 1).then_some(Kind::Query)
    } else {
        Some(Kind::Response)
    }
}

/// What a message's first bytes say.
struct Message {
    id: u16,
    response: bool,
    rcode: u8,
    answers: u16,
    name: Option<String>,
    qtype: u16,
}

fn parse(m: &[u8]) -> Option<Message> {
    let h = m.get(..HEADER)?;
    let flags = u16::from_be_bytes([h[2], h[3]]);
    let mut message = Message {
        id: u16::from_be_bytes([h[0], h[1]]),
        response: flags & 0x8000 != 0,
        rcode: (flags & 0xf) as u8,
        answers: u16::from_be_bytes([h[6], h[7]]),
        name: None,
        qtype: 0,
    };
    if u16::from_be_bytes([h[4], h[5]]) == 0 {
        return Some(message);
    }
    let mut name = String::new();
    let mut at = HEADER;
    loop {
        let len = usize::from(*m.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // A compression pointer has no place in a question; nor do names past 255 bytes.
        if len > 63 || name.len() + len > 255 {
            return Some(message);
        }
        let label = m.get(at..at + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        }));
        at += len;
    }
    let qtype = m.get(at..at + 2)?;
    message.qtype = u16::from_be_bytes([qtype[0], qtype[1]]);
    message.name = Some(if name.is_empty() { ".".into() } else { name });
    Some(message)
}

/// A query waiting for its response.
struct Pending {
    id: u16,
    detail: Detail,
    start: Mark,
    bytes: u64,
    span: SpanKey,
}

/// The DNS state of one connection (a connected UDP socket or a TCP connection).
pub(crate) struct Session {
    role: Role,
    /// Decided by the first record: UDP (a record is a datagram) or TCP (length-prefixed).
    tcp: Option<bool>,
    /// TCP: the message being walked (its kept bytes, what is left of it) and its length's
    /// bytes seen so far.
    length: Vec<u8>,
    body: Vec<u8>,
    left: usize,
    lost: bool,
    start: Mark,
    pending: VecDeque<Pending>,
}

impl Session {
    pub(crate) fn start(role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        let mut s = Session {
            role,
            tcp: None,
            length: Vec::new(),
            body: Vec::new(),
            left: 0,
            lost: false,
            start,
            pending: VecDeque::new(),
        };
        if !buffered.is_empty() {
            // Only TCP splits a message: the held bytes are the start of one.
            s.tcp = Some(true);
            s.walk_tcp(&buffered, buffered.len() as u64, None);
        }
        s
    }

    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> bool {
        let payload = chunk.captured();
        let tcp = *self.tcp.get_or_insert_with(|| {
            chunk.len < HEADER as u64
                || payload
                    .get(..2)
                    .map(|l| u64::from(u16::from_be_bytes([l[0], l[1]])) + 2)
                    == Some(chunk.len)
        });
        if tcp {
            self.walk_tcp(payload, chunk.len, Some((chunk, cx)));
        } else {
            self.start = Mark::at(chunk, cx.record_seq, 0);
            self.message(payload, chunk.len, chunk, cx);
        }
        true
    }

    /// Walks length-prefixed messages (the length's two bytes must have been captured).
    /// `record`: the record and context, none for the bytes detection held.
    fn walk_tcp(&mut self, captured: &[u8], total: u64, mut record: Option<(&Chunk, &mut Cx)>) {
        let mut i = 0usize;
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        while i < total && !self.lost {
            if self.left == 0 {
                if self.length.is_empty() {
                    if let Some((chunk, cx)) = record.as_mut() {
                        self.start = Mark::at(chunk, cx.record_seq, i as u64);
                    }
                }
                let Some(&b) = captured.get(i) else {
                    self.lost = true;
                    if let Some((_, cx)) = record.as_mut() {
                        cx.failed();
                    }
                    return;
                };
                self.length.push(b);
                i += 1;
                if self.length.len() == 2 {
                    self.left = usize::from(u16::from_be_bytes([self.length[0], self.length[1]]));
                    self.length.clear();
                    self.body.clear();
                }
                continue;
            }
            let take = self.left.min(total - i);
            let room = KEEP.saturating_sub(self.body.len());
            let here = captured.get(i..).unwrap_or_default();
            self.body
                .extend_from_slice(&here[..here.len().min(take).min(room)]);
            self.left -= take;
            i += take;
            if self.left == 0 {
                let body = std::mem::take(&mut self.body);
                if let Some((chunk, cx)) = record.as_mut() {
                    self.message(&body, body.len() as u64 + 2, chunk, cx);
                }
                self.body = body;
            }
        }
    }

    /// A whole message (`bytes` long) whose first bytes are `m`.
    fn message(&mut self, m: &[u8], bytes: u64, chunk: &Chunk, cx: &mut Cx) {
        let Some(message) = parse(m) else {
            cx.failed();
            return;
        };
        if message.response {
            let matching = self.pending.iter().position(|p| {
                p.id == message.id && (message.name.is_none() || p.detail.name == message.name)
            });
            let Some(p) = matching.and_then(|i| self.pending.remove(i)) else {
                return;
            };
            if p.span != 0 {
                cx.observer.answered(cx.id, self.role, p.span);
            }
            let reply = Reply::Answered {
                rcode: message.rcode,
                answers: message.answers,
            };
            cx.out
                .push(exchange(cx.id, self.role, p, reply, chunk.ts_exit, bytes));
            return;
        }
        let detail = Detail {
            name: message.name,
            qtype: message.qtype,
            tcp: self.tcp == Some(true),
            reply: Reply::None,
        };
        let span = cx.observer.request(
            cx.id,
            self.role,
            &RequestStart {
                tid: self.start.tid,
                tcp_seq: self.start.seq,
                start_ns: self.start.ns,
                operation: "query",
                target: detail.name.as_deref().unwrap_or_default(),
                context: None,
            },
        );
        if self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self.pending.pop_front() {
                let end = cx.last_ns;
                cx.out
                    .push(exchange(cx.id, self.role, oldest, Reply::None, end, 0));
            }
        }
        self.pending.push_back(Pending {
            id: message.id,
            detail,
            start: self.start,
            bytes,
            span,
        });
    }

    pub(crate) fn direction_changed(&mut self, _last_dir: u32, _cx: &mut Cx) {
        if self.lost {
            // TCP framing lost: start again at the next message of the other side.
            self.lost = false;
            self.left = 0;
            self.length.clear();
            self.body.clear();
        }
    }

    /// Unanswered queries wait for their response until the connection closes or expires
    /// (resolvers retry after seconds).
    pub(crate) fn idle(&mut self, _conn: ConnId, _out: &mut Vec<Exchange>) {}

    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        for p in self.pending.drain(..) {
            out.push(exchange(conn, self.role, p, Reply::None, give_up_ns, 0));
        }
    }
}

fn exchange(
    conn: ConnId,
    role: Role,
    p: Pending,
    reply: Reply,
    end_ns: u64,
    response_bytes: u64,
) -> Exchange {
    Exchange {
        conn,
        role,
        detail: protocol::Detail::Dns(Detail { reply, ..p.detail }),
        start_ns: p.start.ns,
        end_ns: end_ns.max(p.start.ns),
        request_bytes: p.bytes,
        response_bytes,
        span: p.span,
        tcp_seq: p.start.seq,
    }
}

/// How a query was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Answered {
        rcode: u8,
        answers: u16,
    },
    /// No response before the socket closed (or the query was given up).
    None,
}

/// What the span of a DNS query says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    /// The question's name (`.` for the root); none when it could not be read.
    pub name: Option<String>,
    pub qtype: u16,
    pub tcp: bool,
    pub reply: Reply,
}

/// RFC 1035 / 6895 names of the common record types.
fn type_name(qtype: u16) -> Option<&'static str> {
    Some(match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => return None,
    })
}

fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "OTHER",
    }
}

impl Detail {
    /// `DNS A`: the type, not the name (span names stay few).
    pub fn name_into(&self, out: &mut String) {
        out.push_str("DNS ");
        match type_name(self.qtype) {
            Some(t) => out.push_str(t),
            None => out.push_str(&format!("TYPE{}", self.qtype)),
        }
    }

    /// A server failure, a refusal, a malformed query or no response is an error; NXDOMAIN is
    /// an answer.
    pub fn status(&self, _server_side: bool) -> (StatusCode, &'static str) {
        match self.reply {
            Reply::Answered { rcode: 0 | 3, .. } => (StatusCode::Unset, ""),
            Reply::Answered { .. } => (StatusCode::Error, ""),
            Reply::None => (StatusCode::Error, "no response before the socket closed"),
        }
    }

    /// Not inlined into the encoder, which HTTP's spans keep small (their attributes inline).
    #[inline(never)]
    pub fn attributes(&self, ex: &Exchange, ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
        let (server_ip, server_port) = ends.server(ex.role == Role::Server);
        if let Some(name) = &self.name {
            f("dns.question.name", Value::Str(name));
        }
        let type_text;
        let qtype = match type_name(self.qtype) {
            Some(t) => t,
            None => {
                type_text = format!("TYPE{}", self.qtype);
                &type_text
            }
        };
        f("dns.question.type", Value::Str(qtype));
        f(
            "network.transport",
            Value::Str(if self.tcp { "tcp" } else { "udp" }),
        );
        f("server.address", Value::Str(server_ip));
        f("server.port", Value::Int(i64::from(server_port)));
        match self.reply {
            Reply::Answered { rcode, answers } => {
                f("dns.response.code", Value::Str(rcode_name(rcode)));
                f("dns.answer.count", Value::Int(i64::from(answers)));
                if self.status(false).0 == StatusCode::Error {
                    f("error.type", Value::Str(rcode_name(rcode)));
                }
            }
            Reply::None => f("error.type", Value::Str("no_response")),
        }
    }
}

/// The attributes every DNS span has.
pub fn constant_attributes(_f: impl FnMut(&str, Value<'_>)) {}

#[cfg(test)]
mod tests;
