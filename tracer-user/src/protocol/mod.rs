//! The protocols the agent reads, behind one seam.
//!
//! Each protocol is a module with the same parts: `detect` (does a message starting with these
//! bytes, going this way, begin one of its requests, and so which end is the client), a
//! `Session` (the framing of a connection's two streams and the pairing of responses with
//! requests, fed by [`crate::pairing`]), and a `Detail` (what the span of one exchange says: its
//! name, status and attributes, given as a list through a callback so that the protobuf and JSON
//! encodings cannot drift). This module dispatches to them with enums, not trait objects: the
//! match is on the agent's hot path, once per record.
//!
//! Adding a protocol: its module, a variant in [`Protocol`], [`Session`] and [`Detail`], and an
//! arm in each `match` below.

pub mod dns;
mod framing;
pub mod h2;
pub mod http;
pub mod mysql;
pub mod postgres;
pub mod redis;
mod resp;
mod sql;
#[cfg(test)]
mod test_run;

use std::sync::OnceLock;

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use crate::{
    pairing::{Chunk, ConnId, Cx, Exchange, Mark, Role},
    spans::{Endpoints, Value},
};

/// A protocol the agent can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Redis,
    Postgres,
    Mysql,
    Dns,
}

impl Protocol {
    /// Every protocol, in the order detection tries them.
    pub const ALL: [Protocol; 6] = [
        Protocol::Http2,
        Protocol::Http1,
        Protocol::Redis,
        Protocol::Postgres,
        Protocol::Mysql,
        Protocol::Dns,
    ];

    /// The name `--protocols` takes.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http",
            Protocol::Http2 => "http2",
            Protocol::Redis => "redis",
            Protocol::Postgres => "postgresql",
            Protocol::Mysql => "mysql",
            Protocol::Dns => "dns",
        }
    }

    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// The protocols detection may choose (`--protocols`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocols(u32);

impl Protocols {
    pub fn all() -> Self {
        Protocols::of(&Protocol::ALL)
    }

    pub fn of(protocols: &[Protocol]) -> Self {
        Protocols(protocols.iter().fold(0, |bits, p| bits | p.bit()))
    }

    pub fn contains(self, p: Protocol) -> bool {
        self.0 & p.bit() != 0
    }
}

/// What the first bytes of a connection's first message say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Detection {
    /// They begin a request of this protocol, which makes the traced process this role.
    Found(Protocol, Role),
    /// Too short to tell, but still a possible start.
    Undecided,
    /// A message of the protocol that cannot start a conversation (a response): wait for the
    /// next message.
    NotAStart,
    /// Not this protocol.
    Nothing,
}

/// Asks each enabled protocol, in order; the first to recognise a request wins.
pub(crate) fn detect(protocols: Protocols, probe: &[u8], direction: u32) -> Detection {
    let mut verdict = Detection::Nothing;
    for p in Protocol::ALL {
        if !protocols.contains(p) {
            continue;
        }
        let d = match p {
            Protocol::Http1 => http::detect(probe, direction),
            Protocol::Http2 => h2::detect(probe, direction),
            Protocol::Redis => redis::detect(probe, direction),
            Protocol::Postgres => postgres::detect(probe, direction),
            Protocol::Mysql => mysql::detect(probe, direction),
            Protocol::Dns => dns::detect(probe, direction),
        };
        match d {
            Detection::Found(..) => return d,
            Detection::Undecided => verdict = Detection::Undecided,
            Detection::NotAStart if verdict == Detection::Nothing => verdict = d,
            Detection::NotAStart | Detection::Nothing => {}
        }
    }
    verdict
}

/// A connection's protocol state, once its protocol is known.
/// HTTP's session inline (a connection holds its session, and most connections are HTTP), the
/// others boxed: they are larger, and would make every connection as large as the largest.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Session {
    Http(http::Session),
    Http2(Box<h2::Session>),
    Redis(Box<redis::Session>),
    Postgres(Box<postgres::Session>),
    Mysql(Box<mysql::Session>),
    Dns(Box<dns::Session>),
}

impl Session {
    /// The connection's first request was recognised; `buffered`: bytes detection held, which
    /// began at `start`.
    pub(crate) fn start(protocol: Protocol, role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        match protocol {
            Protocol::Http1 => Session::Http(http::Session::start(role, buffered, start)),
            Protocol::Http2 => Session::Http2(Box::new(h2::Session::start(role, buffered, start))),
            Protocol::Redis => {
                Session::Redis(Box::new(redis::Session::start(role, buffered, start)))
            }
            Protocol::Postgres => {
                Session::Postgres(Box::new(postgres::Session::start(role, buffered, start)))
            }
            Protocol::Mysql => {
                Session::Mysql(Box::new(mysql::Session::start(role, buffered, start)))
            }
            Protocol::Dns => Session::Dns(Box::new(dns::Session::start(role, buffered, start))),
        }
    }

    /// Feeds a record; false when the connection stops speaking the protocol.
    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> bool {
        match self {
            Session::Http(s) => match s.on_chunk(chunk, cx) {
                http::Flow::Speaking => true,
                http::Flow::Stopped => false,
                http::Flow::H2c { stream_1, consumed } => {
                    let role = s.role();
                    *self = Session::Http2(Box::new(h2::Session::upgraded(role, stream_1)));
                    if consumed >= chunk.len {
                        return true;
                    }
                    // The record's bytes after the 101 are the first of HTTP/2.
                    let rest = Chunk {
                        payload: chunk
                            .captured()
                            .get(consumed as usize..)
                            .unwrap_or_default(),
                        len: chunk.len - consumed,
                        tcp_seq: chunk.tcp_seq.map(|s| s.wrapping_add(consumed as u32)),
                        ..*chunk
                    };
                    let record_seq = cx.record_seq;
                    cx.record_seq = record_seq.map(|s| s.wrapping_add(consumed as u32));
                    let speaking = self.on_chunk(&rest, cx);
                    cx.record_seq = record_seq;
                    speaking
                }
            },
            Session::Http2(s) => s.on_chunk(chunk, cx),
            Session::Redis(s) => s.on_chunk(chunk, cx),
            Session::Postgres(s) => s.on_chunk(chunk, cx),
            Session::Mysql(s) => s.on_chunk(chunk, cx),
            Session::Dns(s) => s.on_chunk(chunk, cx),
        }
    }

    /// The direction changed; the previous record went `last_dir`.
    pub(crate) fn direction_changed(&mut self, last_dir: u32, cx: &mut Cx) {
        match self {
            Session::Http(s) => s.direction_changed(last_dir, cx),
            Session::Http2(s) => s.direction_changed(last_dir, cx),
            Session::Redis(s) => s.direction_changed(last_dir, cx),
            Session::Postgres(s) => s.direction_changed(last_dir, cx),
            Session::Mysql(s) => s.direction_changed(last_dir, cx),
            Session::Dns(s) => s.direction_changed(last_dir, cx),
        }
    }

    /// The connection went quiet: a response whose end cannot be known is reported now.
    pub(crate) fn idle(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        match self {
            Session::Http(s) => s.idle(conn, out),
            Session::Http2(s) => s.idle(conn, out),
            Session::Redis(s) => s.idle(conn, out),
            Session::Postgres(s) => s.idle(conn, out),
            Session::Mysql(s) => s.idle(conn, out),
            Session::Dns(s) => s.idle(conn, out),
        }
    }

    /// The connection ended (closed, or forgotten after a long silence) at `give_up_ns`:
    /// everything still open is reported.
    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        match self {
            Session::Http(s) => s.flush(conn, give_up_ns, out),
            Session::Http2(s) => s.flush(conn, give_up_ns, out),
            Session::Redis(s) => s.flush(conn, give_up_ns, out),
            Session::Postgres(s) => s.flush(conn, give_up_ns, out),
            Session::Mysql(s) => s.flush(conn, give_up_ns, out),
            Session::Dns(s) => s.flush(conn, give_up_ns, out),
        }
    }
}

/// What the span of one exchange says, by protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    Http(http::Detail),
    Http2(Box<h2::Detail>),
    // Boxed: an exchange moves a few times on its way to the exporter, and these are two to
    // three times HTTP's size (which moves inline).
    Redis(Box<redis::Detail>),
    Postgres(Box<postgres::Detail>),
    Mysql(Box<mysql::Detail>),
    Dns(dns::Detail),
}

impl Detail {
    pub fn protocol(&self) -> Protocol {
        match self {
            Detail::Http(_) => Protocol::Http1,
            Detail::Http2(_) => Protocol::Http2,
            Detail::Redis(_) => Protocol::Redis,
            Detail::Postgres(_) => Protocol::Postgres,
            Detail::Mysql(_) => Protocol::Mysql,
            Detail::Dns(_) => Protocol::Dns,
        }
    }

    /// Appends the span's name (low-cardinality) to `out`.
    pub fn name_into(&self, out: &mut String) {
        match self {
            Detail::Http(d) => d.name_into(out),
            Detail::Http2(d) => d.name_into(out),
            Detail::Redis(d) => d.name_into(out),
            Detail::Postgres(d) => d.name_into(out),
            Detail::Mysql(d) => d.name_into(out),
            Detail::Dns(d) => d.name_into(out),
        }
    }

    /// The span's status code and message.
    pub fn status(&self, server_side: bool) -> (StatusCode, &'static str) {
        match self {
            Detail::Http(d) => d.status(server_side),
            Detail::Http2(d) => d.status(server_side),
            Detail::Redis(d) => d.status(server_side),
            Detail::Postgres(d) => d.status(server_side),
            Detail::Mysql(d) => d.status(server_side),
            Detail::Dns(d) => d.status(server_side),
        }
    }
}

/// The attributes of one exchange's request and response, in order.
#[inline(always)]
pub fn attributes(ex: &Exchange, ends: &Endpoints, f: impl FnMut(&str, Value<'_>)) {
    match &ex.detail {
        Detail::Http(d) => d.attributes(ex, ends, f),
        Detail::Http2(d) => d.attributes(ex, ends, f),
        Detail::Redis(d) => d.attributes(ex, ends, f),
        Detail::Postgres(d) => d.attributes(ex, ends, f),
        Detail::Mysql(d) => d.attributes(ex, ends, f),
        Detail::Dns(d) => d.attributes(ex, ends, f),
    }
}

/// The attributes every span of `protocol` has (over TLS if `tls`).
pub fn constant_attributes(protocol: Protocol, tls: bool, f: impl FnMut(&str, Value<'_>)) {
    match protocol {
        Protocol::Http1 => http::constant_attributes(tls, f),
        Protocol::Http2 => h2::constant_attributes(tls, f),
        Protocol::Redis => redis::constant_attributes(f),
        Protocol::Postgres => postgres::constant_attributes(f),
        Protocol::Mysql => mysql::constant_attributes(f),
        Protocol::Dns => dns::constant_attributes(f),
    }
}

/// [`constant_attributes`], encoded once per protocol and TLS by `encode`.
pub fn encoded_constant_attributes(
    protocol: Protocol,
    tls: bool,
    encode: fn(&mut Vec<u8>, &str, Value<'_>),
) -> &'static [u8] {
    static ENCODED: [OnceLock<Vec<u8>>; 2 * Protocol::ALL.len()] =
        [const { OnceLock::new() }; 2 * Protocol::ALL.len()];
    ENCODED[2 * protocol as usize + usize::from(tls)].get_or_init(|| {
        let mut out = Vec::new();
        constant_attributes(protocol, tls, |k, v| encode(&mut out, k, v));
        out
    })
}

#[cfg(test)]
mod size {
    /// A connection's state is mostly its session: HTTP's, inline, sets it.
    #[test]
    fn sessions_are_as_small_as_http_s() {
        let http = std::mem::size_of::<super::http::Session>();
        assert!(std::mem::size_of::<super::Session>() <= http + 8);
    }
}
