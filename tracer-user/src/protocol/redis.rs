//! Redis (RESP2 and RESP3): one span per command, on the client and on the server side, per the
//! OpenTelemetry database conventions.
//!
//! Commands are arrays of bulk strings and Redis answers them in order, so replies pair FIFO
//! with commands, which covers pipelines and MULTI/EXEC (each queued command gets its `QUEUED`,
//! EXEC the array of results). Pub/sub messages are not replies: RESP3 sends them as pushes
//! (`>`), RESP2 as arrays once the connection subscribed, recognised by their first element.
//!
//! Only the command name and its key are kept; the other arguments (values, passwords) are
//! never read beyond their length, and appear in `db.query.text` as `?`. The arguments of
//! commands that carry credentials or scripts (AUTH, HELLO, MIGRATE, ACL, EVAL...) are not kept
//! at all.
//!
//! When the framing is lost (a command or reply whose type lines were not captured: the probes
//! capture 2 KiB of a message), the commands waiting for replies are dropped and the
//! connection is followed again from the client's next message: clients (pipelines included)
//! send their next command after reading the replies they wait for, so that message starts
//! with a command.

use std::collections::VecDeque;

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use super::resp::{self, Event, Walker};
use crate::{
    pairing::{Chunk, ConnId, Cx, Exchange, Mark, RequestStart, Role, SpanKey, MAX_PENDING},
    protocol::{self, Detection, Protocol},
    spans::{Endpoints, Value},
};

/// Commands the agent recognises a connection by (upper case). A connection's first command
/// must be one of them: an array of strings alone could be a reply seen mid-conversation.
const COMMANDS: &[&str] = &[
    "ACL",
    "APPEND",
    "AUTH",
    "BGSAVE",
    "BITCOUNT",
    "BITFIELD",
    "BITOP",
    "BITPOS",
    "BLMOVE",
    "BLPOP",
    "BRPOP",
    "BZPOPMAX",
    "BZPOPMIN",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "CONFIG",
    "COPY",
    "DBSIZE",
    "DECR",
    "DECRBY",
    "DEL",
    "DISCARD",
    "DUMP",
    "ECHO",
    "EVAL",
    "EVALSHA",
    "EVAL_RO",
    "EXEC",
    "EXISTS",
    "EXPIRE",
    "EXPIREAT",
    "FCALL",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION",
    "GEOADD",
    "GEODIST",
    "GEOPOS",
    "GEOSEARCH",
    "GET",
    "GETDEL",
    "GETEX",
    "GETRANGE",
    "GETSET",
    "HDEL",
    "HELLO",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HINCRBY",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HMSET",
    "HSCAN",
    "HSET",
    "HSETNX",
    "HVALS",
    "INCR",
    "INCRBY",
    "INCRBYFLOAT",
    "INFO",
    "KEYS",
    "LASTSAVE",
    "LINDEX",
    "LINSERT",
    "LLEN",
    "LMOVE",
    "LPOP",
    "LPOS",
    "LPUSH",
    "LPUSHX",
    "LRANGE",
    "LREM",
    "LSET",
    "LTRIM",
    "MEMORY",
    "MGET",
    "MIGRATE",
    "MONITOR",
    "MOVE",
    "MSET",
    "MSETNX",
    "MULTI",
    "OBJECT",
    "PERSIST",
    "PEXPIRE",
    "PEXPIREAT",
    "PFADD",
    "PFCOUNT",
    "PFMERGE",
    "PING",
    "PSETEX",
    "PSUBSCRIBE",
    "PTTL",
    "PUBLISH",
    "PUBSUB",
    "PUNSUBSCRIBE",
    "QUIT",
    "RANDOMKEY",
    "READONLY",
    "RENAME",
    "RENAMENX",
    "RESET",
    "RPOP",
    "RPOPLPUSH",
    "RPUSH",
    "RPUSHX",
    "SADD",
    "SAVE",
    "SCAN",
    "SCARD",
    "SCRIPT",
    "SDIFF",
    "SDIFFSTORE",
    "SELECT",
    "SET",
    "SETEX",
    "SETNX",
    "SETRANGE",
    "SINTER",
    "SINTERSTORE",
    "SISMEMBER",
    "SLOWLOG",
    "SMEMBERS",
    "SMOVE",
    "SPOP",
    "SPUBLISH",
    "SRANDMEMBER",
    "SREM",
    "SSCAN",
    "SSUBSCRIBE",
    "STRLEN",
    "SUBSCRIBE",
    "SUNION",
    "SUNIONSTORE",
    "SUNSUBSCRIBE",
    "SWAPDB",
    "TIME",
    "TOUCH",
    "TTL",
    "TYPE",
    "UNLINK",
    "UNSUBSCRIBE",
    "UNWATCH",
    "WAIT",
    "WATCH",
    "XACK",
    "XADD",
    "XAUTOCLAIM",
    "XCLAIM",
    "XDEL",
    "XGROUP",
    "XINFO",
    "XLEN",
    "XPENDING",
    "XRANGE",
    "XREAD",
    "XREADGROUP",
    "XREVRANGE",
    "XTRIM",
    "ZADD",
    "ZCARD",
    "ZCOUNT",
    "ZDIFF",
    "ZINCRBY",
    "ZINTER",
    "ZMSCORE",
    "ZPOPMAX",
    "ZPOPMIN",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZRANK",
    "ZREM",
    "ZREMRANGEBYRANK",
    "ZREMRANGEBYSCORE",
    "ZREVRANGE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
    "ZUNION",
    "ZUNIONSTORE",
];

/// Commands whose first argument is a sub-command (`CONFIG GET`), not a key.
const CONTAINERS: &[&str] = &[
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "FUNCTION", "MEMORY", "MODULE", "OBJECT",
    "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

/// Commands whose arguments may be credentials or code: none of them is kept.
const NO_ARGUMENTS: &[&str] = &[
    "ACL", "AUTH", "CLIENT", "CONFIG", "EVAL", "EVAL_RO", "EVALSHA", "FCALL", "FUNCTION", "HELLO",
    "MIGRATE", "MODULE", "SCRIPT",
];

const SUBSCRIBE: &[&str] = &[
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE",
];

/// The longest command name kept.
const MAX_COMMAND: usize = 32;

/// Recognises a command array whose first element is a known command.
pub(crate) fn detect(probe: &[u8], direction: u32) -> Detection {
    match command_start(probe) {
        Some(true) => Detection::Found(Protocol::Redis, Role::sending_requests(direction)),
        None => Detection::Undecided,
        Some(false) if looks_like_reply(probe) => Detection::NotAStart,
        Some(false) => Detection::Nothing,
    }
}

/// `*<n>\r\n$<len>\r\n<NAME>\r\n` with a known name: `Some(true)`; a prefix of that shape too
/// short to tell: `None`.
fn command_start(probe: &[u8]) -> Option<bool> {
    let mut at = 0;
    let expect = |byte: u8, at: &mut usize| -> Option<bool> {
        match probe.get(*at) {
            None => None,
            Some(&b) if b == byte => {
                *at += 1;
                Some(true)
            }
            Some(_) => Some(false),
        }
    };
    if !expect(b'*', &mut at)? {
        return Some(false);
    }
    if number(probe, &mut at)?.is_none_or(|n| n == 0) {
        return Some(false);
    }
    if !expect(b'$', &mut at)? {
        return Some(false);
    }
    let Some(len) = number(probe, &mut at)? else {
        return Some(false);
    };
    if len == 0 || len > MAX_COMMAND as u64 {
        return Some(false);
    }
    let len = len as usize;
    let name = probe.get(at..at + len);
    let Some(name) = name else {
        // The name goes on past the probe: undecided while it could still be one.
        let partial = &probe[at..];
        if partial
            .iter()
            .all(|b| b.is_ascii_alphabetic() || *b == b'_')
        {
            return None;
        }
        return Some(false);
    };
    Some(known_command(name))
}

/// A decimal number ending in CRLF at `at`: `Some(Some(n))`; not one: `Some(None)`; the probe
/// ends first: `None`.
fn number(probe: &[u8], at: &mut usize) -> Option<Option<u64>> {
    let mut n = 0u64;
    let mut digits = 0;
    loop {
        let b = *probe.get(*at)?;
        *at += 1;
        match b {
            b'0'..=b'9' if digits < 6 => {
                n = n * 10 + u64::from(b - b'0');
                digits += 1;
            }
            b'\r' if digits > 0 => {
                let lf = *probe.get(*at)?;
                *at += 1;
                return Some((lf == b'\n').then_some(n));
            }
            _ => return Some(None),
        }
    }
}

fn known_command(name: &[u8]) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.as_bytes().eq_ignore_ascii_case(name))
}

/// A reply seen mid-conversation (`+OK`, `-ERR`, `:1`, `$5`): wait for the client's next
/// command rather than give up on the connection.
fn looks_like_reply(probe: &[u8]) -> bool {
    match probe {
        [b'+' | b'-', first, ..] => first.is_ascii_alphanumeric(),
        [b':' | b'$' | b'*', rest @ ..] => {
            let digits = rest.strip_prefix(b"-").unwrap_or(rest);
            let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
            n > 0 && digits[n..].starts_with(b"\r\n")
        }
        _ => false,
    }
}

/// A command waiting for its reply.
struct Pending {
    detail: Detail,
    start: Mark,
    bytes: u64,
    span: SpanKey,
}

/// The Redis state of one connection.
pub(crate) struct Session {
    role: Role,
    commands: Walker,
    replies: Walker,
    pending: VecDeque<Pending>,
    /// Where the command being walked began.
    start: Mark,
    /// Lost track: ignore the traffic until the client's next message.
    desync: bool,
    /// A SUBSCRIBE was sent: RESP2 arrays may be messages now.
    subscribed: bool,
    /// The database SELECT chose.
    db: u32,
    events: Vec<Event>,
}

impl Session {
    /// `buffered`: the first bytes of the first command, held by detection; they began at
    /// `start`.
    pub(crate) fn start(role: Role, buffered: Vec<u8>, start: Mark) -> Self {
        let mut s = Session {
            role,
            commands: Walker::default(),
            replies: Walker::default(),
            pending: VecDeque::new(),
            start,
            desync: false,
            subscribed: false,
            db: 0,
            events: Vec::new(),
        };
        // Too short to hold a whole command (detection would have decided): only framing.
        s.commands
            .advance(&buffered, buffered.len() as u64, &mut s.events);
        s.events.clear();
        s
    }

    pub(crate) fn on_chunk(&mut self, chunk: &Chunk, cx: &mut Cx) -> bool {
        if self.desync {
            return true;
        }
        let commands = chunk.direction == self.role.request_direction();
        let mut events = std::mem::take(&mut self.events);
        let walker = if commands {
            &mut self.commands
        } else {
            &mut self.replies
        };
        walker.advance(chunk.captured(), chunk.len, &mut events);
        for event in events.drain(..) {
            match event {
                Event::Start { at } if commands => {
                    self.start = Mark::at(chunk, cx.record_seq, at);
                }
                Event::Start { .. } => {}
                Event::Done(v) if commands => self.command(v, chunk, cx),
                Event::Done(v) => self.reply(&v, chunk.ts_exit, cx),
                Event::Lost => {
                    if !commands {
                        // The reply being walked ends here, as far as anyone can tell.
                        if let Some(p) = self.pending.pop_front() {
                            self.finish(p, Reply::Unparsed, chunk.ts_exit, 0, cx);
                        }
                    }
                    self.lose(cx);
                    break;
                }
            }
        }
        self.events = events;
        true
    }

    /// After losing track: follow the connection again from the client's next message.
    pub(crate) fn direction_changed(&mut self, last_dir: u32, _cx: &mut Cx) {
        if self.desync && last_dir != self.role.request_direction() {
            self.desync = false;
            self.commands.reset();
            self.replies.reset();
        }
    }

    /// Replies are framed: nothing to end on silence (a blocking command may wait long).
    pub(crate) fn idle(&mut self, _conn: ConnId, _out: &mut Vec<Exchange>) {}

    /// Commands still waiting end without a reply at `give_up_ns`.
    pub(crate) fn flush(&mut self, conn: ConnId, give_up_ns: u64, out: &mut Vec<Exchange>) {
        for p in self.pending.drain(..) {
            out.push(exchange(conn, self.role, p, Reply::None, give_up_ns, 0));
        }
    }

    fn lose(&mut self, cx: &mut Cx) {
        cx.failed();
        self.pending.clear();
        self.desync = true;
        self.commands.reset();
        self.replies.reset();
    }

    /// A whole command was walked.
    fn command(&mut self, v: resp::Value, chunk: &Chunk, cx: &mut Cx) {
        if v.kind != b'*' || v.texts[0].is_empty() {
            // Inline commands (`PING\r\n`, telnet style) are not followed.
            self.lose(cx);
            return;
        }
        let mut name = String::from_utf8_lossy(&v.texts[0][..v.texts[0].len().min(MAX_COMMAND)])
            .to_ascii_uppercase();
        let arg1 = (v.count >= 2).then(|| String::from_utf8_lossy(&v.texts[1]).into_owned());
        let mut key = None;
        let mut more_args = u32::try_from(v.count.saturating_sub(1)).unwrap_or(u32::MAX);
        if CONTAINERS.contains(&name.as_str()) {
            if let Some(sub) = &arg1 {
                name.push(' ');
                name.push_str(&sub.to_ascii_uppercase());
                more_args = more_args.saturating_sub(1);
            }
        } else if !NO_ARGUMENTS.contains(&name.as_str()) {
            if let Some(k) = arg1 {
                key = Some(k);
                more_args = more_args.saturating_sub(1);
            }
        }
        if NO_ARGUMENTS.contains(&name.split(' ').next().unwrap_or_default()) {
            more_args = 0;
        }
        if name == "SELECT" {
            if let Some(db) = key.as_deref().and_then(|k| k.parse().ok()) {
                self.db = db;
            }
        }
        if SUBSCRIBE.contains(&name.as_str()) {
            self.subscribed = true;
        }
        let span = cx.observer.request(
            cx.id,
            self.role,
            &RequestStart {
                tid: self.start.tid,
                tcp_seq: self.start.seq,
                start_ns: self.start.ns,
                operation: &name,
                target: key.as_deref().unwrap_or_default(),
                context: None,
            },
        );
        if self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self.pending.pop_front() {
                self.finish(oldest, Reply::None, chunk.ts_exit, 0, cx);
            }
        }
        self.pending.push_back(Pending {
            detail: Detail {
                command: name,
                key,
                more_args,
                db: self.db,
                reply: Reply::None,
            },
            start: self.start,
            bytes: v.bytes,
            span,
        });
    }

    /// A whole reply (or push) was walked; the last of it moved in a record that exited at
    /// `end_ns`.
    fn reply(&mut self, v: &resp::Value, end_ns: u64, cx: &mut Cx) {
        if v.kind == b'>' || (self.subscribed && v.kind == b'*') {
            let word = &v.texts[0];
            let is = |w: &str| word.eq_ignore_ascii_case(w.as_bytes());
            if ["message", "pmessage", "smessage"].into_iter().any(is) {
                return;
            }
            if SUBSCRIBE.iter().any(|w| is(w)) {
                // One confirmation per channel: the first answers the command.
                let waiting = self
                    .pending
                    .front()
                    .is_some_and(|p| SUBSCRIBE.contains(&p.detail.command.as_str()));
                if !waiting {
                    return;
                }
            } else if v.kind == b'>' {
                // Another out-of-band push (client-side caching's invalidations...).
                return;
            }
        }
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        let reply = if matches!(v.kind, b'-' | b'!') {
            let text = String::from_utf8_lossy(&v.texts[0]);
            // The error's code is its first word (`ERR`, `WRONGTYPE`, `NOAUTH`...).
            let code = text.split(' ').next().unwrap_or_default();
            Reply::Error(code.chars().take(MAX_COMMAND).collect())
        } else {
            Reply::Ok
        };
        self.finish(p, reply, end_ns, v.bytes, cx);
    }

    fn finish(&mut self, p: Pending, reply: Reply, end_ns: u64, bytes: u64, cx: &mut Cx) {
        if p.span != 0 {
            cx.observer.answered(cx.id, self.role, p.span);
        }
        cx.out
            .push(exchange(cx.id, self.role, p, reply, end_ns, bytes));
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
        detail: protocol::Detail::Redis(Box::new(Detail { reply, ..p.detail })),
        start_ns: p.start.ns,
        end_ns: end_ns.max(p.start.ns),
        request_bytes: p.bytes,
        response_bytes,
        span: p.span,
        tcp_seq: p.start.seq,
    }
}

/// How a command was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    /// An error reply, by its code (`ERR`, `WRONGTYPE`...).
    Error(String),
    /// The connection ended (or the command was given up) first.
    None,
    /// A reply began, but its framing was lost.
    Unparsed,
}

/// What the span of a Redis command says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    /// Upper case; with its sub-command for commands that have them (`CONFIG GET`).
    pub command: String,
    pub key: Option<String>,
    /// Arguments after the key (or the sub-command), shown as `?`.
    pub more_args: u32,
    pub db: u32,
    pub reply: Reply,
}

impl Detail {
    pub fn name_into(&self, out: &mut String) {
        out.push_str(&self.command);
    }

    /// Errors and commands without a reply are errors, on both sides (the database
    /// conventions).
    pub fn status(&self, _server_side: bool) -> (StatusCode, &'static str) {
        match self.reply {
            Reply::Ok | Reply::Unparsed => (StatusCode::Unset, ""),
            Reply::Error(_) => (StatusCode::Error, ""),
            Reply::None => (StatusCode::Error, "the connection ended before a reply"),
        }
    }

    /// `db.query.text`: the command, its key, `?` for each other argument (at most 8 shown).
    fn query_text(&self) -> String {
        let mut text = self.command.clone();
        if let Some(key) = &self.key {
            text.push(' ');
            text.push_str(key);
        }
        for _ in 0..self.more_args.min(8) {
            text.push_str(" ?");
        }
        if self.more_args > 8 {
            text.push_str(" ...");
        }
        text
    }

    /// Not inlined into the encoder, which HTTP's spans keep small (their attributes inline).
    #[inline(never)]
    pub fn attributes(&self, ex: &Exchange, ends: &Endpoints, mut f: impl FnMut(&str, Value<'_>)) {
        let (server_ip, server_port) = ends.server(ex.role == Role::Server);
        f("db.operation.name", Value::Str(&self.command));
        f("db.query.text", Value::Str(&self.query_text()));
        f("db.namespace", Value::Str(&self.db.to_string()));
        f("server.address", Value::Str(server_ip));
        f("server.port", Value::Int(i64::from(server_port)));
        match &self.reply {
            Reply::Error(code) => {
                f("db.response.status_code", Value::Str(code));
                f("error.type", Value::Str(code));
            }
            Reply::None => f("error.type", Value::Str("no_response")),
            Reply::Ok | Reply::Unparsed => {}
        }
    }
}

/// The attributes every Redis span has.
pub fn constant_attributes(mut f: impl FnMut(&str, Value<'_>)) {
    f("db.system.name", Value::Str("redis"));
}

#[cfg(test)]
mod tests;
