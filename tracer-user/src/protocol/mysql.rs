//! MySQL and MariaDB (the client/server protocol): one span per command (`COM_QUERY`,
//! `COM_STMT_EXECUTE` with the text of its `COM_STMT_PREPARE`, `COM_STMT_PREPARE`, `COM_PING`,
//! `COM_INIT_DB`...), on the client side and on the server's, per the OpenTelemetry database
//! conventions.
//!
//! Packets are a 3-byte length and a sequence number, and the protocol answers one command at a
//! time. A response whose first packet is an OK or an ERR ends with it; a result set (column
//! definitions, rows, a final EOF or OK) runs until the client's next command, or the
//! connection's idle timeout, and ends with its last bytes: rows go past what the probes
//! capture long before a result ends, so counting packets to its end would rarely work.

use std::collections::{HashMap, VecDeque};

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use super::{
    framing::{Event as Packet, Frame, Framer},
    sql,
};
use crate::{
    pairing::{Chunk, ConnId, Cx, Exchange, Mark, RequestStart, Role, SpanKey, MAX_PENDING},
    protocol::{self, Detection, Protocol},
    spans::{Endpoints, Value},
};

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_PING: u8 = 0x0e;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;

/// Capability flags of the handshake response.
const CLIENT_CONNECT_WITH_DB: u32 = 0x0000_0008;
const CLIENT_SSL: u32 = 0x0000_0800;
const CLIENT_PLUGIN_AUTH_LENENC: u32 = 0x0020_0000;
const CLIENT_SECURE_CONNECTION: u32 = 0x0000_8000;

/// Prepared statements remembered per connection.
const MAX_STATEMENTS: usize = 256;

/// The server's greeting (protocol 10 and a version), or a query of a connection joined late.
pub(crate) fn detect(probe: &[u8], direction: u32) -> Detection {
    let Some(head) = probe.get(..6) else {
        // A client reads a packet's 4-byte header alone, then its payload: a header of a
        // greeting or a query (shorter than 64 KiB, sequence number 0) is worth waiting on.
        // Fewer bytes say nothing, and waiting on them would keep a connection of tiny
        // messages from ever being muted.
        return if probe.len() >= 4 && probe[2] == 0 && probe[3] == 0 {
            Detection::Undecided
        } else {
            Detection::Nothing
        };
    };
    let (len, seq, first, next) = (
        u32::from_le_bytes([head[0], head[1], head[2], 0]),
        head[3],
        head[4],
        head[5],
    );
    if len < 2 || seq != 0 {
        return Detection::Nothing;
    }
    match first {
        // The greeting comes from the server: the end that writes it serves.
        0x0a if next.is_ascii_digit() => Detection::Found(
            Protocol::Mysql,
            Role::sending_requests(direction).opposite(),
        ),
        COM_QUERY if next.is_ascii_alphabetic() && len < 1 << 24 => {
            Detection::Found(Protocol::Mysql, Role::sending_requests(direction))
        }
        _ => Detection::Nothing,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Waiting for the client's handshake response.
    Handshake,
    /// Authenticating: until the server's OK.
    Auth,
    Command,
}

struct Unit {
    detail: Detail,
    start: Mark,
    bytes: u64,
    response_bytes: u64,
    span: SpanKey,
    /// A COM_STMT_PREPARE: its OK carries the statement's id.
    prepare: Option<Option<String>>,
    /// The first packet of the response said how it went; the rest of it runs to its end.
    answered: bool,
}

/// The MySQL/MariaDB state of one connection.
pub(crate) struct Session {
    role: Role,
    client: Framer,
    server: Framer,
    stage: Stage,
    /// `mariadb` or `mysql`, from the greeting.
    system: &'static str,
    database: String,
    statements: HashMap<u32, Option<String>>,
    units: VecDeque<Unit>,
    command_start: Option<Mark>,
    last_server_ns: u64,
    server_lost: bool,
    client_lost: bool,
    /// The first bytes of the first packet, held by detection (a header too short to decide);
    /// they belong to the stream of the first record.
    held: Vec<u8>,
    events: Vec<Packet>,
}

impl Session {
    pub(crate) fn start(role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        let mut s = Session {
            role,
            client: Framer::new(Frame::MysqlPacket),
            server: Framer::new(Frame::MysqlPacket),
            stage: Stage::Handshake,
            system: "mysql",
            database: String::new(),
            statements: HashMap::new(),
            units: VecDeque::new(),
            command_start: Some(start),
            last_server_ns: 0,
            server_lost: false,
            client_lost: false,
            held: Vec::new(),
            events: Vec::new(),
        };
        s.held = buffered;
        s
    }

    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> bool {
        let from_client = chunk.direction == self.role.request_direction();
        if from_client && self.client_lost {
            return true;
        }
        let mut events = std::mem::take(&mut self.events);
        if !self.held.is_empty() {
            // Too short to hold a whole packet: framing only (its start is `command_start`).
            let held = std::mem::take(&mut self.held);
            let stream = if from_client {
                &mut self.client
            } else {
                &mut self.server
            };
            stream.advance(&held, held.len() as u64, |_| 4096, &mut events);
            events.clear();
        }
        let mut speaking = true;
        if from_client {
            self.client
                .advance(chunk.captured(), chunk.len, |_| 4096, &mut events);
            for e in events.drain(..) {
                match e {
                    Packet::Start { at } => {
                        if self.command_start.is_none() {
                            self.command_start = Some(Mark::at(chunk, cx.record_seq, at));
                        }
                    }
                    Packet::Done {
                        kind: seq,
                        body,
                        bytes,
                        ..
                    } => {
                        speaking = self.client_packet(seq, &body, bytes, chunk, cx);
                        self.command_start = None;
                        if !speaking {
                            break;
                        }
                    }
                    Packet::Lost { .. } => {
                        cx.failed();
                        self.units.clear();
                        self.client_lost = true;
                        break;
                    }
                }
            }
        } else {
            self.last_server_ns = chunk.ts_exit;
            if self.server_lost {
                self.add_response_bytes(chunk.len);
            } else {
                self.server
                    .advance(chunk.captured(), chunk.len, |_| 512, &mut events);
                for e in events.drain(..) {
                    match e {
                        Packet::Start { .. } => {}
                        Packet::Done {
                            kind: seq,
                            body,
                            bytes,
                            ..
                        } => {
                            self.add_response_bytes(bytes);
                            self.server_packet(seq, &body, chunk.ts_exit, cx);
                        }
                        Packet::Lost { rest } => {
                            self.add_response_bytes(rest);
                            self.server_lost = true;
                            break;
                        }
                    }
                }
            }
        }
        events.clear();
        self.events = events;
        speaking
    }

    /// The client's turn: the response before it is over.
    pub(crate) fn direction_changed(&mut self, last_dir: u32, cx: &mut Cx) {
        if last_dir == self.role.request_direction() {
            return;
        }
        self.end_responses(cx.id, cx.out);
        if self.client_lost {
            self.client_lost = false;
            self.client = Framer::new(Frame::MysqlPacket);
        }
    }

    pub(crate) fn idle(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        self.end_responses(conn, out);
    }

    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        self.end_responses(conn, out);
        for unit in self.units.drain(..) {
            out.push(exchange(conn, self.role, unit, give_up_ns));
        }
    }

    /// Responses under way (a result set, or one whose framing was lost) end with their last
    /// bytes.
    fn end_responses(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        while self.units.front().is_some_and(|u| u.answered) {
            if let Some(unit) = self.units.pop_front() {
                out.push(exchange(conn, self.role, unit, self.last_server_ns));
            }
        }
        if self.server_lost {
            self.server_lost = false;
            self.server = Framer::new(Frame::MysqlPacket);
            if let Some(unit) = self.units.front_mut() {
                unit.detail.outcome = Outcome::Unknown;
                unit.answered = true;
            }
            self.end_responses(conn, out);
        }
    }

    fn add_response_bytes(&mut self, n: u64) {
        if let Some(u) = self.units.front_mut() {
            u.response_bytes = u.response_bytes.saturating_add(n);
        }
    }

    /// Returns false when the connection switches to TLS.
    fn client_packet(
        &mut self,
        seq: u8,
        body: &[u8],
        bytes: u64,
        chunk: &Chunk,
        cx: &mut Cx,
    ) -> bool {
        if self.stage == Stage::Handshake && seq == 0 {
            // A connection older than the agent: its first packet is a command.
            self.stage = Stage::Command;
        }
        match self.stage {
            Stage::Handshake => {
                let Some(caps) = body.get(..4) else {
                    return true;
                };
                let caps = u32::from_le_bytes([caps[0], caps[1], caps[2], caps[3]]);
                if caps & CLIENT_SSL != 0 && body.len() <= 32 {
                    // An SSL request: TLS follows.
                    return false;
                }
                self.database = handshake_database(body, caps).unwrap_or_default();
                self.stage = Stage::Auth;
                true
            }
            // Authentication data (passwords, scrambles): never read.
            Stage::Auth => true,
            Stage::Command if seq != 0 => true,
            Stage::Command => {
                let Some((&command, args)) = body.split_first() else {
                    return true;
                };
                let (operation, text, prepare): (Option<&str>, Option<String>, _) = match command {
                    COM_QUERY => (None, Some(sql::sanitize(&lossy(args))), None),
                    COM_STMT_PREPARE => {
                        let text = Some(sql::sanitize(&lossy(args)));
                        (None, text.clone(), Some(text))
                    }
                    COM_STMT_EXECUTE => {
                        let id = args
                            .get(..4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                        let text = id.and_then(|id| self.statements.get(&id).cloned().flatten());
                        (None, text, None)
                    }
                    COM_INIT_DB => {
                        self.database = lossy(args);
                        (Some("USE"), None, None)
                    }
                    COM_PING => (Some("PING"), None, None),
                    COM_STMT_RESET => (Some("RESET"), None, None),
                    // No response comes: no span.
                    COM_QUIT | COM_STMT_CLOSE | COM_STMT_SEND_LONG_DATA => return true,
                    _ => (Some("COMMAND"), None, None),
                };
                let (mut op, collection) = text
                    .as_deref()
                    .map_or((None, None), sql::operation_and_collection);
                if command == COM_STMT_PREPARE {
                    op = Some("PREPARE".into());
                }
                let operation = op.or(operation.map(str::to_owned));
                self.push_unit(
                    Detail {
                        system: self.system,
                        operation,
                        collection,
                        text,
                        database: self.database.clone(),
                        outcome: Outcome::NoResponse,
                    },
                    prepare,
                    bytes,
                    chunk,
                    cx,
                );
                true
            }
        }
    }

    fn push_unit(
        &mut self,
        detail: Detail,
        prepare: Option<Option<String>>,
        bytes: u64,
        chunk: &Chunk,
        cx: &mut Cx,
    ) {
        let start = self
            .command_start
            .unwrap_or_else(|| Mark::at(chunk, cx.record_seq, 0));
        let span = cx.observer.request(
            cx.id,
            self.role,
            &RequestStart {
                tid: start.tid,
                tcp_seq: start.seq,
                start_ns: start.ns,
                operation: detail.operation.as_deref().unwrap_or_default(),
                target: detail.collection.as_deref().unwrap_or_default(),
                context: None,
            },
        );
        if self.units.len() >= MAX_PENDING {
            if let Some(oldest) = self.units.pop_front() {
                let end = oldest.start.ns;
                cx.out.push(exchange(cx.id, self.role, oldest, end));
            }
        }
        self.units.push_back(Unit {
            detail,
            start,
            bytes,
            response_bytes: 0,
            span,
            prepare,
            answered: false,
        });
    }

    fn server_packet(&mut self, seq: u8, body: &[u8], end_ns: u64, cx: &mut Cx) {
        match self.stage {
            Stage::Handshake => {
                if seq == 0 && body.first() == Some(&0x0a) {
                    let version = body[1..].split(|&b| b == 0).next().unwrap_or_default();
                    if version
                        .windows(7)
                        .any(|w| w.eq_ignore_ascii_case(b"mariadb"))
                    {
                        self.system = "mariadb";
                    }
                }
            }
            Stage::Auth => {
                if body.first() == Some(&0x00) {
                    self.stage = Stage::Command;
                }
            }
            Stage::Command => {
                let Some(unit) = self.units.iter_mut().find(|u| !u.answered) else {
                    return;
                };
                if unit.span != 0 {
                    cx.observer.answered(cx.id, self.role, unit.span);
                }
                unit.answered = true;
                match body.first() {
                    Some(0xff) => {
                        let code = body
                            .get(1..3)
                            .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
                        unit.detail.outcome = Outcome::Error(code.to_string());
                    }
                    Some(0x00) => {
                        if let Some(text) = unit.prepare.take() {
                            if let Some(id) = body.get(1..5) {
                                let id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                                if self.statements.len() >= MAX_STATEMENTS {
                                    self.statements.clear();
                                }
                                self.statements.insert(id, text);
                            }
                        }
                        unit.detail.outcome = Outcome::Ok;
                    }
                    _ => {
                        // A result set: it runs until the client's next command.
                        unit.detail.outcome = Outcome::Ok;
                        return;
                    }
                }
                // OK and ERR end their response (a prepare's definitions that follow are
                // ignored: no command waits for them).
                if let Some(i) = self.units.iter().position(|u| u.answered) {
                    if let Some(unit) = self.units.remove(i) {
                        cx.out.push(exchange(cx.id, self.role, unit, end_ns));
                    }
                }
            }
        }
    }
}

fn exchange(conn: ConnId, role: Role, unit: Unit, end_ns: u64) -> Exchange {
    Exchange {
        conn,
        role,
        detail: protocol::Detail::Mysql(Box::new(unit.detail)),
        start_ns: unit.start.ns,
        end_ns: end_ns.max(unit.start.ns),
        request_bytes: unit.bytes,
        response_bytes: unit.response_bytes,
        span: unit.span,
        tcp_seq: unit.start.seq,
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The database a HandshakeResponse41 names (`CLIENT_CONNECT_WITH_DB`): after the capability
/// flags, max packet size, character set and 23 reserved bytes come the user name, the auth
/// response (skipped by its length, never read), then the database.
fn handshake_database(body: &[u8], caps: u32) -> Option<String> {
    if caps & CLIENT_CONNECT_WITH_DB == 0 {
        return None;
    }
    let mut at = 32;
    let user_end = body.get(at..)?.iter().position(|&b| b == 0)?;
    at += user_end + 1;
    let auth_len = if caps & CLIENT_PLUGIN_AUTH_LENENC != 0 {
        let (len, used) = lenenc(body.get(at..)?)?;
        at += used;
        len
    } else if caps & CLIENT_SECURE_CONNECTION != 0 {
        let len = *body.get(at)?;
        at += 1;
        u64::from(len)
    } else {
        let end = body.get(at..)?.iter().position(|&b| b == 0)?;
        end as u64 + 1
    };
    at += usize::try_from(auth_len).ok()?;
    let rest = body.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(lossy(&rest[..end]))
}

/// A length-encoded integer: its value and the bytes it took.
fn lenenc(b: &[u8]) -> Option<(u64, usize)> {
    match *b.first()? {
        n @ 0..=0xfa => Some((u64::from(n), 1)),
        0xfc => Some((u64::from(u16::from_le_bytes([*b.get(1)?, *b.get(2)?])), 3)),
        0xfd => Some((
            u64::from(u32::from_le_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, 0])),
            4,
        )),
        _ => None,
    }
}

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An ERR packet, by its error code (`1146`...).
    Error(String),
    /// The response's framing was lost.
    Unknown,
    /// No response (yet, or ever).
    #[default]
    NoResponse,
}

/// What the span of a MySQL/MariaDB command says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detail {
    /// `mysql` or `mariadb` (`db.system.name`), from the server's greeting.
    pub system: &'static str,
    pub operation: Option<String>,
    pub collection: Option<String>,
    /// Sanitised (literals as `?`).
    pub text: Option<String>,
    pub database: String,
    pub outcome: Outcome,
}

impl Detail {
    pub fn name_into(&self, out: &mut String) {
        sql::span_name_into(
            out,
            self.operation.as_deref(),
            self.collection.as_deref(),
            self.system,
        );
    }

    pub fn status(&self, _server_side: bool) -> (StatusCode, &'static str) {
        match self.outcome {
            Outcome::Error(_) => (StatusCode::Error, ""),
            Outcome::NoResponse => (StatusCode::Error, "the connection ended before a response"),
            _ => (StatusCode::Unset, ""),
        }
    }

    /// Not inlined into the encoder, which HTTP's spans keep small (their attributes inline).
    #[inline(never)]
    pub fn attributes(&self, ex: &Exchange, ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
        let (server_ip, server_port) = ends.server(ex.role == Role::Server);
        f("db.system.name", Value::Str(self.system));
        sql::statement_attributes(
            self.operation.as_deref(),
            self.collection.as_deref(),
            &self.database,
            self.text.as_deref(),
            &mut f,
        );
        f("server.address", Value::Str(server_ip));
        f("server.port", Value::Int(i64::from(server_port)));
        match &self.outcome {
            Outcome::Error(code) => {
                f("db.response.status_code", Value::Str(code));
                f("error.type", Value::Str(code));
            }
            Outcome::NoResponse => f("error.type", Value::Str("no_response")),
            _ => {}
        }
    }
}

/// MySQL's spans have no constant attribute: `db.system.name` depends on the server.
pub fn constant_attributes(_f: impl FnMut(&str, Value<'_>)) {}

#[cfg(test)]
mod tests;
