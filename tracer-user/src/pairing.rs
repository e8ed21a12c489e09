//! The per-connection layer every protocol shares: turning the records of many connections into
//! request/response exchanges.
//!
//! The probes send one record per data syscall: how many bytes moved (`len`) and a captured
//! prefix of them (`payload`, possibly short or empty). Each connection is two byte streams, one
//! per direction, and records of one connection arrive in order. This layer keeps, per
//! connection, what does not depend on the protocol: the TCP sequence number of each stream,
//! the direction of the last record (a "message" is a run of records in one direction; the
//! kernel captures a budget of bytes per message, so a direction change is the natural point
//! for a protocol to resynchronize after losing track), idle expiry, and the connection's
//! phase: detecting (the first bytes of a message are shown to each enabled protocol), speaking
//! one protocol (whose [`Session`] frames the streams and pairs responses with requests), or
//! muted (no protocol recognised it, or it switched to one the agent does not read).
//!
//! The protocols themselves live in [`crate::protocol`]; helpers they share for framing
//! (a head parsed across records, the captured bytes at a position) are here.

use std::{collections::HashMap, hash::BuildHasherDefault};

use tracer_common::direction::{EGRESS, INGRESS};

use crate::{
    context::RemoteContext,
    hashing::IdentityHasher,
    protocol::{self, http::memo::HeadMemo, Detail, Detection, Protocols, Session},
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
    /// What the request does (an HTTP method, a Redis command) and to what (a path, a key):
    /// a proxy forwards both unchanged, and ids in `target` tie a call to the request it serves.
    pub operation: &'a str,
    pub target: &'a str,
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
    /// The connection's other end is on this host too (loopback, or the host's own address),
    /// where the agent may see it as well: its heads are worth keeping for that end
    /// (`protocol::http::memo`).
    fn peer_on_host(&self) -> bool {
        false
    }
}

/// No linking (unit tests of the pairing alone).
impl Observer for () {
    fn request(&mut self, _: ConnId, _: Role, _: &RequestStart<'_>) -> SpanKey {
        0
    }
    fn answered(&mut self, _: ConnId, _: Role, _: SpanKey) {}
}

/// Caller-assigned unique id of a connection, already well mixed (see `pipeline::conn_id`).
pub type ConnId = u64;

/// A map keyed by connection id. The ids are hashes already, so they are used as they are:
/// SipHash on every record was a measurable share of the agent's time.
pub type ConnMap<V> = HashMap<ConnId, V, BuildHasherDefault<IdentityHasher>>;

/// Captured bytes of one head buffered across records; beyond this the message is given up
/// (real heads are a few hundred bytes, and the probes capture 2 KiB per message anyway).
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Idle timeouts after which outstanding requests are given up and the connection forgotten.
/// Long enough that a slow backend is still paired, short enough that connections whose close
/// the probes never saw (the process exited) do not pile up.
const EXPIRY_FACTOR: u64 = 10;

/// Requests waiting for a response on one connection. Real pipelines are a handful deep; a
/// longer queue means responses are being missed, and the oldest are given up.
pub(crate) const MAX_PENDING: usize = 64;

/// How many first bytes of a message detection looks at, at most.
const PROBE_BYTES: usize = 32;

/// What the traced process is on a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Reads requests, writes responses.
    Server,
    /// Writes requests, reads responses.
    Client,
}

impl Role {
    pub(crate) fn request_direction(self) -> u32 {
        match self {
            Role::Server => INGRESS,
            Role::Client => EGRESS,
        }
    }

    /// The other end's role.
    pub(crate) fn opposite(self) -> Role {
        match self {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        }
    }

    /// The role of whoever sends requests in `direction`.
    pub(crate) fn sending_requests(direction: u32) -> Role {
        if direction == INGRESS {
            Role::Server
        } else {
            Role::Client
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
    /// Bytes the probes inserted into the stream within this syscall (`--inject-context`):
    /// the next byte's sequence number is that much further on.
    pub inserted: u32,
}

impl Chunk<'_> {
    /// The payload, never claimed longer than what the syscall moved.
    pub(crate) fn captured(&self) -> &[u8] {
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        &self.payload[..self.payload.len().min(len)]
    }

    /// Some bytes of the record were not captured.
    pub(crate) fn has_hole(&self) -> bool {
        (self.captured().len() as u64) < self.len
    }

    /// When bytes of this record begin a request. Read data exists once the read returns;
    /// written data exists (from the caller's point of view) once the write is issued.
    pub(crate) fn request_start(&self) -> u64 {
        if self.direction == INGRESS {
            self.ts_exit
        } else {
            self.ts_enter
        }
    }
}

/// Where and by whom a request began: its start time, the TCP sequence number of its first
/// byte, the thread.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Mark {
    pub ns: u64,
    pub seq: Option<u32>,
    pub tid: u32,
}

impl Mark {
    /// A request beginning `pos` bytes into `chunk`, whose first byte has TCP sequence number
    /// `record_seq`.
    pub(crate) fn at(chunk: &Chunk, record_seq: Option<u32>, pos: u64) -> Mark {
        Mark {
            ns: chunk.request_start(),
            seq: record_seq.map(|s| s.wrapping_add(pos as u32)),
            tid: chunk.tid,
        }
    }
}

/// One request and its response.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange {
    pub conn: ConnId,
    pub role: Role,
    /// What the protocol says about the request and its response.
    pub detail: Detail,
    /// Server: exit of the read that brought the first request byte. Client: entry of the write
    /// that sent it.
    pub start_ns: u64,
    /// Exit of the syscall that moved the last response byte; for a request without response,
    /// when it was given up.
    pub end_ns: u64,
    /// The request's bytes, as counted by the syscalls.
    pub request_bytes: u64,
    /// The response's bytes, as counted by the syscalls.
    pub response_bytes: u64,
    /// The linker's key for this exchange's span.
    pub span: SpanKey,
    /// TCP sequence number of the request's first byte.
    pub tcp_seq: Option<u32>,
}

/// Turns the records of many connections into exchanges.
pub struct Pairer {
    idle_timeout_ns: u64,
    protocols: Protocols,
    conns: ConnMap<Conn>,
    parse_failures: u64,
    /// HTTP heads parsed at one end of a same-host connection, for the other end.
    http_memo: HeadMemo,
}

impl Pairer {
    /// `idle_timeout_ns`: quiet time after which a response whose end cannot be known is
    /// considered finished. `protocols`: those detection may choose.
    #[must_use]
    pub fn new(idle_timeout_ns: u64, protocols: Protocols) -> Self {
        Pairer {
            idle_timeout_ns,
            protocols,
            conns: ConnMap::default(),
            parse_failures: 0,
            http_memo: HeadMemo::default(),
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
            record_seq: None,
            last_ns: 0,
            http_memo: &mut self.http_memo,
        };
        state.on_chunk(chunk, &mut cx, self.protocols);
    }

    /// The connection closed at `ts`: a response running until the end ends here, requests
    /// still waiting are reported without a response, and the state is dropped.
    pub fn on_close(&mut self, conn: ConnId, ts: u64, out: &mut Vec<Exchange>) {
        if let Some(mut state) = self.conns.remove(&conn) {
            if let Phase::Speaking(session) = &mut state.phase {
                session.flush(conn, ts, out);
            }
        }
    }

    /// Call periodically with the monotonic time. After `idle_timeout_ns` of quiet, a response
    /// whose end cannot be known is reported as ending with its last record; after ten times
    /// that, waiting requests are reported without a response and the connection is forgotten.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Exchange>) {
        let idle = self.idle_timeout_ns;
        let expiry = idle.saturating_mul(EXPIRY_FACTOR);
        self.conns.retain(|&id, state| {
            let quiet = now.saturating_sub(state.last_ns);
            let Phase::Speaking(session) = &mut state.phase else {
                return quiet < expiry;
            };
            if quiet >= expiry {
                session.flush(id, now, out);
                return false;
            }
            if quiet >= idle {
                session.idle(id, out);
            }
            true
        });
    }

    /// True once no enabled protocol recognised the connection (or it switched to one the agent
    /// does not read): the caller should stop tracing it.
    #[must_use]
    pub fn is_muted(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| matches!(c.phase, Phase::Muted))
    }

    /// Drops the state of a connection without reporting anything.
    pub fn forget(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// Connections with state, muted ones included.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// HTTP heads taken from the parse of the connection's other end (see
    /// `protocol::http::memo`).
    #[must_use]
    pub fn heads_reused(&self) -> u64 {
        self.http_memo.hits()
    }

    /// Heads given up: cut by uncaptured bytes, unfinished at a direction change, too long, or
    /// malformed on a connection whose protocol is known.
    #[must_use]
    pub fn parse_failures(&self) -> u64 {
        self.parse_failures
    }
}

/// What a record's processing may need besides the connection's own state.
pub(crate) struct Cx<'a> {
    pub id: ConnId,
    failures: &'a mut u64,
    pub out: &'a mut Vec<Exchange>,
    pub observer: &'a mut dyn Observer,
    /// The TCP sequence number of the current record's first byte.
    pub record_seq: Option<u32>,
    /// The connection's last activity (the latest record's exit).
    pub last_ns: u64,
    /// HTTP heads kept across connections: a head's two ends are two connections here.
    pub http_memo: &'a mut HeadMemo,
}

impl Cx<'_> {
    /// A head was given up (see [`Pairer::parse_failures`]).
    pub(crate) fn failed(&mut self) {
        *self.failures = self.failures.saturating_add(1);
    }
}

// The session inline, not boxed: a box is one more pointer to follow on every record, and
// `tracer replay` measured 404 against 391 ns a record with it (nginx recording, medians of 3).
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// No request seen yet. `skip`: the current message cannot start a request (its start was
    /// not captured, or it is a response); wait for the next one.
    Detect {
        skip: bool,
    },
    Speaking(Session),
    /// No enabled protocol, or one the agent does not read: records are ignored.
    Muted,
}

struct Conn {
    phase: Phase,
    /// Direction of the previous record (0 before the first).
    last_dir: u32,
    /// Exit of the latest record: the connection's last activity.
    last_ns: u64,
    /// The first bytes of a message too short for detection to decide, and where it began;
    /// handed to the protocol that recognises it.
    detect_buf: Vec<u8>,
    detect_mark: Mark,
    /// TCP sequence number of the next byte in each direction (`INGRESS`, `EGRESS`), counted
    /// from the last record that carried one.
    stream_seq: [Option<u32>; 2],
}

impl Conn {
    fn new() -> Self {
        Conn {
            phase: Phase::Detect { skip: false },
            last_dir: 0,
            last_ns: 0,
            detect_buf: Vec::new(),
            detect_mark: Mark::default(),
            stream_seq: [None; 2],
        }
    }

    fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx, protocols: Protocols) {
        self.last_ns = self.last_ns.max(chunk.ts_exit);
        cx.last_ns = self.last_ns;
        if matches!(self.phase, Phase::Muted) {
            return;
        }
        let cursor = &mut self.stream_seq[usize::from(chunk.direction == EGRESS)];
        cx.record_seq = chunk.tcp_seq.or(*cursor);
        *cursor = (cx.record_seq).map(|s| {
            s.wrapping_add(chunk.len as u32)
                .wrapping_add(chunk.inserted)
        });
        if chunk.direction != self.last_dir {
            match &mut self.phase {
                Phase::Speaking(session) => session.direction_changed(self.last_dir, cx),
                Phase::Detect { skip } => {
                    *skip = false;
                    self.detect_buf.clear();
                }
                Phase::Muted => {}
            }
            self.last_dir = chunk.direction;
        }
        let speaking = match &mut self.phase {
            Phase::Detect { skip: false } => self.detect(chunk, cx, protocols),
            Phase::Detect { skip: true } | Phase::Muted => true,
            Phase::Speaking(session) => session.on_chunk(chunk, cx),
        };
        if !speaking {
            self.mute();
        }
    }

    /// Shows the first bytes of a message to the protocols until one recognises a request,
    /// which decides the protocol and the role. Returns false when none can.
    fn detect(&mut self, chunk: &Chunk, cx: &mut Cx, protocols: Protocols) -> bool {
        let payload = chunk.captured();
        let mut probe = [0u8; PROBE_BYTES];
        let from_buf = self.detect_buf.len().min(probe.len());
        probe[..from_buf].copy_from_slice(&self.detect_buf[..from_buf]);
        let from_payload = payload.len().min(probe.len() - from_buf);
        probe[from_buf..from_buf + from_payload].copy_from_slice(&payload[..from_payload]);
        let probe = &probe[..from_buf + from_payload];
        if probe.is_empty() {
            // The message starts with bytes nobody saw; judging its middle would be a guess.
            self.phase = Phase::Detect { skip: true };
            return true;
        }
        match protocol::detect(protocols, probe, chunk.direction) {
            Detection::Found(protocol, role) => {
                let mark = if self.detect_buf.is_empty() {
                    Mark::at(chunk, cx.record_seq, 0)
                } else {
                    self.detect_mark
                };
                let buffered = std::mem::take(&mut self.detect_buf);
                let mut session = Session::start(protocol, role, buffered, mark);
                let speaking = session.on_chunk(chunk, cx);
                self.phase = Phase::Speaking(session);
                speaking
            }
            Detection::Undecided if !chunk.has_hole() && probe.len() < PROBE_BYTES => {
                if self.detect_buf.is_empty() {
                    self.detect_mark = Mark::at(chunk, cx.record_seq, 0);
                }
                self.detect_buf.extend_from_slice(payload);
                true
            }
            // Joined in the middle of a conversation (a response), or lost the rest of a short
            // prefix: the next message may start a request.
            Detection::NotAStart | Detection::Undecided => {
                self.detect_buf.clear();
                self.phase = Phase::Detect { skip: true };
                true
            }
            Detection::Nothing => false,
        }
    }

    fn mute(&mut self) {
        // Release the memory: the entry now only remembers the verdict.
        self.phase = Phase::Muted;
        self.detect_buf = Vec::new();
    }
}

/// The result of parsing a head (or any prefix-parsable unit) from the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse<T> {
    Complete(T),
    /// The bytes look like the beginning of a head that has not ended yet.
    Partial,
    Invalid,
}

/// How a head progressed over one record.
pub(crate) enum HeadStep<T> {
    /// `consumed`: bytes of this record that belonged to the head.
    Done {
        head: T,
        consumed: usize,
    },
    NeedMore,
    /// Cut by uncaptured bytes, too long, or malformed.
    Failed,
}

/// A parsed head knows how many bytes it took.
pub(crate) trait Head {
    fn head_len(&self) -> usize;
}

/// Advances a head over the captured bytes `avail` of a record. `hole_after`: the record goes on
/// past `avail` with bytes that were not captured.
///
/// The common case, a whole head inside one record, is parsed in place; bytes are copied into
/// `buf` only when a head continues in the next record.
pub(crate) fn head_step<T: Head>(
    buf: &mut Vec<u8>,
    avail: &[u8],
    hole_after: bool,
    parse: impl FnOnce(&[u8]) -> Parse<T>,
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
pub(crate) fn captured_from(payload: &[u8], pos: u64) -> &[u8] {
    usize::try_from(pos)
        .ok()
        .and_then(|p| payload.get(p..))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tracer_common::direction::{EGRESS, INGRESS};

    use super::*;

    /// A connection of one-byte messages (a ping-pong of a protocol nobody reads) is muted at
    /// its first message: no protocol may wait on bytes that say nothing, or every record of
    /// it would keep coming to the agent.
    #[test]
    fn tiny_messages_of_an_unknown_protocol_are_muted_at_once() {
        for byte in 0..=255u8 {
            let mut p = Pairer::new(1_000, Protocols::all());
            let chunk = Chunk {
                direction: EGRESS,
                ts_enter: 1,
                ts_exit: 2,
                len: 1,
                payload: &[byte],
                tid: 1,
                tcp_seq: None,
                inserted: 0,
            };
            p.on_chunk(1, &chunk, &mut Vec::new(), &mut ());
            let reply = Chunk {
                direction: INGRESS,
                ..chunk
            };
            p.on_chunk(1, &reply, &mut Vec::new(), &mut ());
            p.on_chunk(1, &chunk, &mut Vec::new(), &mut ());
            // HTTP's methods, Redis's arrays and DNS over TCP's length (which dnsmasq reads a
            // byte at a time) may start with these: waiting is right.
            let may_start = b"GHPDCOT*\x00\x01\x02\x03".contains(&byte);
            assert_eq!(p.is_muted(1), !may_start, "byte {byte:#04x}");
        }
    }
}
