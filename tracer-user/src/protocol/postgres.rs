//! PostgreSQL (frontend/backend protocol 3): one span per query (a simple `Query`, or each
//! `Execute` of the extended protocol), on the client side and, for a traced server, on the
//! backend's side, per the OpenTelemetry database conventions.
//!
//! Messages are a type byte and a length, so both streams are walked by length; only the
//! bodies a span needs are read (a query's text, a statement's `Parse`, a portal's `Bind`, a
//! `CommandComplete` tag, an `ErrorResponse`'s SQLSTATE), never a password message or a row.
//! A simple query ends at `ReadyForQuery`; an `Execute` at its `CommandComplete` (or error),
//! and its text is that of the statement its portal was bound to, found from the `Parse`.
//!
//! Rows (`DataRow`) are messages too, and a result of more than a few hundred bytes goes past
//! what the probes capture: the rest of that response is then skipped as a whole, and the
//! queries waiting end with its last bytes (no status, as for an HTTP response without a
//! length) when the client sends its next message, or on idle.

use std::collections::{HashMap, VecDeque};

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use super::{
    framing::{Event as Msg, Frame, Framer},
    sql,
};
use crate::{
    pairing::{Chunk, ConnId, Cx, Exchange, Mark, RequestStart, Role, SpanKey, MAX_PENDING},
    protocol::{self, Detection, Protocol},
    spans::{Endpoints, Value},
};

/// Protocol codes of the first (untyped) message a client sends.
const PROTOCOL_3_0: u32 = 196_608;
const PROTOCOL_3_2: u32 = 196_610;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Prepared statements and portals remembered per connection (their texts); beyond, the
/// oldest are forgotten and their executions have no text.
const MAX_STATEMENTS: usize = 256;

/// Recognises a startup message (or an SSL/GSS request) and a simple query seen mid-connection.
pub(crate) fn detect(probe: &[u8], direction: u32) -> Detection {
    let found = Detection::Found(Protocol::Postgres, Role::sending_requests(direction));
    if probe.first() == Some(&b'Q') {
        return match probe.get(1..9) {
            // Waited on only once its length is there and plausible: fewer bytes say nothing,
            // and waiting on them would keep a connection of tiny messages from being muted.
            None => match probe.get(1..5) {
                Some(l) if (8..1 << 20).contains(&u32::from_be_bytes([l[0], l[1], l[2], l[3]])) => {
                    Detection::Undecided
                }
                _ => Detection::Nothing,
            },
            Some(rest) => {
                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let sql_start = rest[4..].iter().all(u8::is_ascii_alphabetic);
                if (8..1 << 30).contains(&len) && sql_start {
                    found
                } else {
                    Detection::Nothing
                }
            }
        };
    }
    let Some(head) = probe.get(..8) else {
        // A startup message's length, once there, must be plausible.
        return match probe.get(..4) {
            Some(l) if (8..10_000).contains(&u32::from_be_bytes([l[0], l[1], l[2], l[3]])) => {
                Detection::Undecided
            }
            _ => Detection::Nothing,
        };
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    match code {
        SSL_REQUEST | GSSENC_REQUEST if len == 8 => found,
        PROTOCOL_3_0 | PROTOCOL_3_2 if (9..10_000).contains(&len) => found,
        _ => Detection::Nothing,
    }
}

/// Bytes of a client message's body worth keeping: the texts of queries and statements, the
/// names in a Bind or Execute, the startup parameters. Never a password message (`p`).
fn client_keep(kind: u8) -> usize {
    match kind {
        b'Q' | b'P' => 4096,
        0 => 512,
        b'B' => 256,
        b'E' => 128,
        _ => 0,
    }
}

/// Of a server message: a CommandComplete's tag, an ErrorResponse's fields (for the SQLSTATE).
fn server_keep(kind: u8) -> usize {
    match kind {
        b'C' => 64,
        b'E' => 256,
        _ => 0,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Before the startup message.
    Startup,
    /// The client asked for TLS (or GSS encryption): the server's one-byte answer decides.
    SslAnswer,
    /// Typed messages both ways.
    Ready,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum UnitKind {
    Simple,
    Execute,
    /// A Sync: where an extended-protocol batch ends (its ReadyForQuery).
    Sync,
}

/// A query waiting for its result (or a Sync marking a batch's end).
struct Unit {
    kind: UnitKind,
    detail: Detail,
    start: Mark,
    bytes: u64,
    response_bytes: u64,
    span: SpanKey,
}

/// The PostgreSQL state of one connection.
pub(crate) struct Session {
    role: Role,
    client: Framer,
    server: Framer,
    stage: Stage,
    /// The connection's first client bytes are yet to be seen (typed or startup).
    first: bool,
    database: String,
    statements: HashMap<String, Option<String>>,
    portals: HashMap<String, Option<String>>,
    units: VecDeque<Unit>,
    /// Where the messages that make the next query began.
    cycle_start: Option<Mark>,
    /// The server's framing was lost: the rest of its response is skipped; the waiting
    /// queries end with its last bytes.
    server_lost: bool,
    last_server_ns: u64,
    /// The client's framing was lost: wait for its next message.
    client_lost: bool,
    events: Vec<Msg>,
}

impl Session {
    pub(crate) fn start(role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        let mut s = Session {
            role,
            client: Framer::new(Frame::Typed),
            server: Framer::new(Frame::Typed),
            stage: Stage::Startup,
            first: true,
            database: String::new(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            units: VecDeque::new(),
            cycle_start: Some(start),
            server_lost: false,
            last_server_ns: 0,
            client_lost: false,
            events: Vec::new(),
        };
        if !buffered.is_empty() {
            s.first_bytes(buffered[0]);
            let mut events = std::mem::take(&mut s.events);
            s.client
                .advance(&buffered, buffered.len() as u64, client_keep, &mut events);
            // Too short to hold a whole message (detection would have decided): framing only.
            events.clear();
            s.events = events;
        }
        s
    }

    /// A startup message begins with its length (first byte 0); a connection joined later,
    /// with a typed message.
    fn first_bytes(&mut self, first: u8) {
        if self.first {
            self.first = false;
            if first == 0 {
                self.client.expect_untyped();
            } else {
                self.stage = Stage::Ready;
            }
        }
    }

    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> bool {
        let from_client = chunk.direction == self.role.request_direction();
        if from_client && self.client_lost {
            return true;
        }
        let mut events = std::mem::take(&mut self.events);
        if from_client {
            if let Some(&b) = chunk.captured().first() {
                self.first_bytes(b);
            }
            self.client
                .advance(chunk.captured(), chunk.len, client_keep, &mut events);
            for e in events.drain(..) {
                match e {
                    Msg::Start { at } => {
                        if self.cycle_start.is_none() {
                            self.cycle_start = Some(Mark::at(chunk, cx.record_seq, at));
                        }
                    }
                    Msg::Done {
                        kind, body, bytes, ..
                    } => {
                        self.client_message(kind, &body, bytes, chunk, cx);
                    }
                    Msg::Lost { .. } => {
                        cx.failed();
                        self.units.clear();
                        self.client_lost = true;
                        break;
                    }
                }
            }
        } else {
            self.last_server_ns = chunk.ts_exit;
            if self.stage == Stage::SslAnswer {
                // `S`/`G`: encryption follows, which the agent does not read. `N`: refused, a
                // startup message comes next.
                self.events = events;
                if chunk.captured().first() != Some(&b'N') {
                    return false;
                }
                self.stage = Stage::Startup;
                self.client.expect_untyped();
                return true;
            }
            if self.server_lost {
                self.events = events;
                self.add_response_bytes(chunk.len);
                return true;
            }
            self.server
                .advance(chunk.captured(), chunk.len, server_keep, &mut events);
            for e in events.drain(..) {
                match e {
                    Msg::Start { .. } => {}
                    Msg::Done {
                        kind, body, bytes, ..
                    } => {
                        self.add_response_bytes(bytes);
                        self.server_message(kind, &body, chunk.ts_exit, cx);
                    }
                    Msg::Lost { rest } => {
                        self.add_response_bytes(rest);
                        self.server_lost = true;
                        break;
                    }
                }
            }
        }
        self.events = events;
        true
    }

    /// The client's turn again: a response whose framing was lost ends here.
    pub(crate) fn direction_changed(&mut self, last_dir: u32, cx: &mut Cx) {
        if last_dir == self.role.request_direction() {
            return;
        }
        if self.server_lost {
            self.end_lost_response(cx.id, cx.out);
        }
        if self.client_lost {
            self.client_lost = false;
            self.client = Framer::new(Frame::Typed);
            self.cycle_start = None;
        }
    }

    pub(crate) fn idle(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        if self.server_lost {
            self.end_lost_response(conn, out);
        }
    }

    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        if self.server_lost {
            self.end_lost_response(conn, out);
        }
        for unit in self.units.drain(..) {
            if unit.kind != UnitKind::Sync {
                out.push(exchange(
                    conn,
                    self.role,
                    unit,
                    Outcome::NoResponse,
                    give_up_ns,
                ));
            }
        }
    }

    /// The waiting queries end with the last bytes of the response whose framing was lost.
    fn end_lost_response(&mut self, conn: ConnId, out: &mut Vec<Exchange>) {
        for unit in self.units.drain(..) {
            if unit.kind != UnitKind::Sync {
                let outcome = match &unit.detail.outcome {
                    Outcome::Error(_) => unit.detail.outcome.clone(),
                    _ => Outcome::Unknown,
                };
                out.push(exchange(
                    conn,
                    self.role,
                    unit,
                    outcome,
                    self.last_server_ns,
                ));
            }
        }
        self.server_lost = false;
        self.server = Framer::new(Frame::Typed);
    }

    fn add_response_bytes(&mut self, n: u64) {
        if let Some(u) = self.units.front_mut() {
            u.response_bytes = u.response_bytes.saturating_add(n);
        }
    }

    fn client_message(&mut self, kind: u8, body: &[u8], bytes: u64, chunk: &Chunk, cx: &mut Cx) {
        match (self.stage, kind) {
            (Stage::Startup, 0) => {
                self.cycle_start = None;
                let code = body
                    .get(..4)
                    .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                match code {
                    SSL_REQUEST | GSSENC_REQUEST => self.stage = Stage::SslAnswer,
                    PROTOCOL_3_0 | PROTOCOL_3_2 => {
                        self.database = startup_database(&body[4..]);
                        self.stage = Stage::Ready;
                    }
                    _ => {}
                }
            }
            (Stage::Ready, b'Q') => {
                let text = cstr(body).map(|t| sql::sanitize(&t));
                self.push_unit(UnitKind::Simple, text, bytes, chunk, cx);
            }
            (Stage::Ready, b'P') => {
                let Some(name_end) = body.iter().position(|&b| b == 0) else {
                    return;
                };
                // The text is whole only if its terminating 0 was kept.
                let text = cstr(&body[name_end + 1..]).map(|t| sql::sanitize(&t));
                remember(&mut self.statements, lossy(&body[..name_end]), text);
            }
            (Stage::Ready, b'B') => {
                let mut parts = body.split(|&b| b == 0);
                let portal = parts.next().map(lossy).unwrap_or_default();
                let statement = parts.next().map(lossy).unwrap_or_default();
                let text = self.statements.get(&statement).cloned().flatten();
                remember(&mut self.portals, portal, text);
            }
            (Stage::Ready, b'E') => {
                let portal = body
                    .split(|&b| b == 0)
                    .next()
                    .map(lossy)
                    .unwrap_or_default();
                let text = self.portals.get(&portal).cloned().flatten();
                self.push_unit(UnitKind::Execute, text, bytes, chunk, cx);
            }
            (Stage::Ready, b'S') => {
                self.units.push_back(Unit {
                    kind: UnitKind::Sync,
                    detail: Detail::default(),
                    start: Mark::default(),
                    bytes: 0,
                    response_bytes: 0,
                    span: 0,
                });
                self.cycle_start = None;
            }
            _ => {}
        }
    }

    fn push_unit(
        &mut self,
        kind: UnitKind,
        text: Option<String>,
        bytes: u64,
        chunk: &Chunk,
        cx: &mut Cx,
    ) {
        let start = self
            .cycle_start
            .take()
            .unwrap_or_else(|| Mark::at(chunk, cx.record_seq, 0));
        let (operation, collection) = text
            .as_deref()
            .map_or((None, None), sql::operation_and_collection);
        let span = cx.observer.request(
            cx.id,
            self.role,
            &RequestStart {
                tid: start.tid,
                tcp_seq: start.seq,
                start_ns: start.ns,
                operation: operation.as_deref().unwrap_or_default(),
                target: collection.as_deref().unwrap_or_default(),
                context: None,
            },
        );
        if self.units.len() >= MAX_PENDING {
            if let Some(oldest) = self.units.pop_front() {
                if oldest.kind != UnitKind::Sync {
                    let end = oldest.start.ns;
                    cx.out
                        .push(exchange(cx.id, self.role, oldest, Outcome::NoResponse, end));
                }
            }
        }
        self.units.push_back(Unit {
            kind,
            detail: Detail {
                operation,
                collection,
                text,
                database: self.database.clone(),
                outcome: Outcome::Pending,
            },
            start,
            bytes,
            response_bytes: 0,
            span,
        });
    }

    fn server_message(&mut self, kind: u8, body: &[u8], end_ns: u64, cx: &mut Cx) {
        match kind {
            b'C' => {
                let rows = cstr(body).and_then(|tag| returned_rows(&tag));
                self.complete(Outcome::Ok { rows }, end_ns, cx);
            }
            b'I' | b's' => self.complete(Outcome::Ok { rows: None }, end_ns, cx),
            b'E' => {
                let code = sqlstate(body).unwrap_or_else(|| "error".into());
                self.complete(Outcome::Error(code), end_ns, cx);
            }
            b'Z' => self.ready_for_query(end_ns, cx),
            _ => {}
        }
    }

    /// A statement finished: an Execute ends now; a simple query (which may hold several
    /// statements) at its ReadyForQuery.
    fn complete(&mut self, outcome: Outcome, end_ns: u64, cx: &mut Cx) {
        let Some(front) = self.units.front_mut() else {
            return;
        };
        match front.kind {
            UnitKind::Simple => {
                if !matches!(front.detail.outcome, Outcome::Error(_)) {
                    front.detail.outcome = outcome;
                }
            }
            UnitKind::Execute => {
                if let Some(unit) = self.units.pop_front() {
                    self.finish(unit, outcome, end_ns, cx);
                }
            }
            UnitKind::Sync => {}
        }
    }

    /// The end of a simple query, or of an extended batch: Executes after an error were not
    /// run (no span).
    fn ready_for_query(&mut self, end_ns: u64, cx: &mut Cx) {
        while let Some(unit) = self.units.pop_front() {
            match unit.kind {
                UnitKind::Simple => {
                    let outcome = match &unit.detail.outcome {
                        Outcome::Pending => Outcome::Ok { rows: None },
                        other => other.clone(),
                    };
                    self.finish(unit, outcome, end_ns, cx);
                    return;
                }
                UnitKind::Sync => return,
                UnitKind::Execute => {}
            }
        }
    }

    fn finish(&mut self, unit: Unit, outcome: Outcome, end_ns: u64, cx: &mut Cx) {
        if unit.span != 0 {
            cx.observer.answered(cx.id, self.role, unit.span);
        }
        cx.out
            .push(exchange(cx.id, self.role, unit, outcome, end_ns));
    }
}

fn exchange(conn: ConnId, role: Role, unit: Unit, outcome: Outcome, end_ns: u64) -> Exchange {
    Exchange {
        conn,
        role,
        detail: protocol::Detail::Postgres(Box::new(Detail {
            outcome,
            ..unit.detail
        })),
        start_ns: unit.start.ns,
        end_ns: end_ns.max(unit.start.ns),
        request_bytes: unit.bytes,
        response_bytes: unit.response_bytes,
        span: unit.span,
        tcp_seq: unit.start.seq,
    }
}

/// Keeps `name`'s text, forgetting everything once the map is full (statements named by a
/// driver's counter would otherwise grow without end).
fn remember(map: &mut HashMap<String, Option<String>>, name: String, text: Option<String>) {
    if map.len() >= MAX_STATEMENTS && !map.contains_key(&name) {
        map.clear();
    }
    map.insert(name, text);
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The text up to the first 0, if the 0 was kept (a text cut by the capture is not used).
fn cstr(body: &[u8]) -> Option<String> {
    let end = body.iter().position(|&b| b == 0)?;
    Some(lossy(&body[..end]))
}

/// The `database` startup parameter (the user name when absent, as the server does).
fn startup_database(params: &[u8]) -> String {
    let mut parts = params.split(|&b| b == 0);
    let (mut database, mut user) = (None, None);
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        match k {
            b"database" => database = Some(lossy(v)),
            b"user" => user = Some(lossy(v)),
            b"" => break,
            _ => {}
        }
    }
    database.or(user).unwrap_or_default()
}

/// An ErrorResponse's SQLSTATE (its `C` field).
fn sqlstate(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == b'C' {
            return Some(lossy(&tail[..end]));
        }
        rest = &tail[end + 1..];
    }
    None
}

/// Rows a CommandComplete tag reports (`SELECT 5`, `INSERT 0 1`, `UPDATE 3`...).
fn returned_rows(tag: &str) -> Option<u64> {
    let (command, rest) = tag.split_once(' ')?;
    matches!(command, "SELECT" | "FETCH" | "MOVE" | "COPY")
        .then(|| rest.rsplit(' ').next()?.parse().ok())
        .flatten()
}

/// How a query ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// Not yet known.
    #[default]
    Pending,
    Ok {
        rows: Option<u64>,
    },
    /// An ErrorResponse, by its SQLSTATE.
    Error(String),
    /// The response's framing was lost: it ended, but how is unknown.
    Unknown,
    /// The connection ended first.
    NoResponse,
}

/// What the span of a PostgreSQL query says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detail {
    pub operation: Option<String>,
    pub collection: Option<String>,
    /// Sanitised (literals as `?`); none when the statement was prepared before the agent saw
    /// the connection.
    pub text: Option<String>,
    pub database: String,
    pub outcome: Outcome,
}

impl Detail {
    /// `{operation} {table}`, the operation alone, or `postgresql`.
    pub fn name_into(&self, out: &mut String) {
        sql::span_name_into(
            out,
            self.operation.as_deref(),
            self.collection.as_deref(),
            "postgresql",
        );
    }

    pub fn status(&self, _server_side: bool) -> (StatusCode, &'static str) {
        match self.outcome {
            Outcome::Error(_) => (StatusCode::Error, ""),
            Outcome::NoResponse => (StatusCode::Error, "the connection ended before a result"),
            _ => (StatusCode::Unset, ""),
        }
    }

    /// Not inlined into the encoder, which HTTP's spans keep small (their attributes inline).
    #[inline(never)]
    pub fn attributes(&self, ex: &Exchange, ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
        let (server_ip, server_port) = ends.server(ex.role == Role::Server);
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
            Outcome::Ok { rows: Some(n) } => {
                f("db.response.returned_rows", Value::Int(*n as i64));
            }
            Outcome::Error(code) => {
                f("db.response.status_code", Value::Str(code));
                f("error.type", Value::Str(code));
            }
            Outcome::NoResponse => f("error.type", Value::Str("no_response")),
            _ => {}
        }
    }
}

/// The attributes every PostgreSQL span has.
pub fn constant_attributes(mut f: impl FnMut(&str, Value<'_>)) {
    f("db.system.name", Value::Str("postgresql"));
}

#[cfg(test)]
mod tests;
