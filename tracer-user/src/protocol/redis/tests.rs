//! Redis framing, pairing and span details, through the generic connection layer.
use tracer_common::direction::{EGRESS, INGRESS};

use super::{Detail, Reply};
use crate::{
    pairing::{Chunk, Exchange, Pairer, Role},
    protocol::{
        self,
        test_run::{Run, C},
        Protocols,
    },
    spans::{Endpoints, Span, Value},
};

/// What came out: role, command, reply.
fn take(r: &mut Run) -> Vec<(Role, String, Reply)> {
    std::mem::take(&mut r.out)
        .into_iter()
        .map(|e| {
            let d = redis(&e);
            (e.role, d.command.clone(), d.reply.clone())
        })
        .collect()
}

fn redis(e: &Exchange) -> &Detail {
    match &e.detail {
        protocol::Detail::Redis(d) => d,
        other => panic!("not a Redis exchange: {other:?}"),
    }
}

/// A command as clients send it: an array of bulk strings.
fn cmd(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn ok(command: &str) -> (Role, String, Reply) {
    (Role::Client, command.into(), Reply::Ok)
}

#[test]
fn commands_and_replies_pair_with_keys_and_sanitised_text() {
    let mut r = Run::new();
    r.rec(EGRESS, &cmd(&["set", "user:42", "secret value"]));
    r.rec(INGRESS, b"+OK\r\n");
    r.rec(EGRESS, &cmd(&["GET", "user:42"]));
    r.rec(INGRESS, b"$12\r\nsecret value\r\n");
    r.rec(EGRESS, &cmd(&["LPUSH", "q", "a"]));
    r.rec(
        INGRESS,
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
    );
    let out = std::mem::take(&mut r.out);
    let got: Vec<_> = out.iter().map(|e| redis(e).clone()).collect();
    assert_eq!(got[0].command, "SET");
    assert_eq!(got[0].key.as_deref(), Some("user:42"));
    assert_eq!(got[0].query_text(), "SET user:42 ?");
    assert_eq!(got[1].query_text(), "GET user:42");
    assert_eq!(got[2].reply, Reply::Error("WRONGTYPE".into()));
    assert_eq!((out[0].start_ns, out[0].end_ns), (10, 25));
    assert_eq!(out[1].response_bytes, 19);
    // The value is nowhere in the span.
    let ends = std::sync::Arc::new(Endpoints::new(
        "127.0.0.1:40000".parse().unwrap(),
        "127.0.0.1:6379".parse().unwrap(),
    ));
    for ex in out {
        let span = Span::new(ex, ends.clone(), None, |t| t);
        span.attributes(|k, v| {
            if let Value::Str(s) = v {
                assert!(!s.contains("secret"), "{k} = {s}");
            }
        });
        let proto = span.to_proto();
        assert!(proto.name == "SET" || proto.name == "GET" || proto.name == "LPUSH");
    }
}

#[test]
fn pipelines_and_transactions_pair_in_order() {
    let mut r = Run::new();
    let mut batch = cmd(&["MULTI"]);
    batch.extend(cmd(&["INCR", "a"]));
    batch.extend(cmd(&["INCR", "b"]));
    batch.extend(cmd(&["EXEC"]));
    r.rec(EGRESS, &batch);
    // The replies split at an awkward place.
    let replies = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:7\r\n";
    r.rec(INGRESS, &replies[..20]);
    r.rec(INGRESS, &replies[20..]);
    assert_eq!(
        take(&mut r),
        vec![ok("MULTI"), ok("INCR"), ok("INCR"), ok("EXEC")]
    );
}

#[test]
fn pubsub_messages_are_not_replies() {
    let mut r = Run::new();
    r.rec(EGRESS, &cmd(&["SUBSCRIBE", "news", "sport"]));
    r.rec(
        INGRESS,
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$5\r\nsport\r\n:2\r\n",
    );
    r.rec(
        INGRESS,
        b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n",
    );
    // RESP3: a push, whatever the connection did.
    r.rec(
        INGRESS,
        b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nyo\r\n",
    );
    r.rec(EGRESS, &cmd(&["PING"]));
    r.rec(INGRESS, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert_eq!(take(&mut r), vec![ok("SUBSCRIBE"), ok("PING")]);
}

#[test]
fn credentials_and_scripts_are_never_kept() {
    let mut r = Run::new();
    r.rec(EGRESS, &cmd(&["AUTH", "admin", "hunter2"]));
    r.rec(INGRESS, b"+OK\r\n");
    r.rec(EGRESS, &cmd(&["HELLO", "3", "AUTH", "admin", "hunter2"]));
    r.rec(INGRESS, b"%1\r\n+server\r\n+redis\r\n");
    r.rec(EGRESS, &cmd(&["CONFIG", "SET", "requirepass", "hunter2"]));
    r.rec(INGRESS, b"+OK\r\n");
    r.rec(EGRESS, &cmd(&["EVAL", "return 'hunter2'", "0"]));
    r.rec(INGRESS, b"$7\r\nhunter2\r\n");
    let texts: Vec<_> = std::mem::take(&mut r.out)
        .iter()
        .map(|e| redis(e).query_text())
        .collect();
    assert_eq!(texts, ["AUTH", "HELLO", "CONFIG SET", "EVAL"]);
}

#[test]
fn select_sets_the_namespace() {
    let mut r = Run::new();
    r.rec(EGRESS, &cmd(&["SELECT", "3"]));
    r.rec(INGRESS, b"+OK\r\n");
    r.rec(EGRESS, &cmd(&["GET", "k"]));
    r.rec(INGRESS, b"$-1\r\n");
    let out = std::mem::take(&mut r.out);
    assert_eq!((redis(&out[0]).db, redis(&out[1]).db), (3, 3));
}

#[test]
fn server_side_and_unanswered_commands() {
    let mut r = Run::new();
    r.rec(INGRESS, &cmd(&["BLPOP", "jobs", "0"]));
    r.p.on_close(C, 500, &mut r.out);
    assert_eq!(
        take(&mut r),
        vec![(Role::Server, "BLPOP".into(), Reply::None)]
    );
}

#[test]
fn lost_framing_resumes_at_the_next_command() {
    let mut r = Run::new();
    r.rec(EGRESS, &cmd(&["GET", "a"]));
    // A reply of 300 elements whose type lines were past what the probes captured.
    r.rec_len(INGRESS, 3000, b"*300\r\n$1\r\nx\r\n");
    assert_eq!(
        take(&mut r),
        vec![(Role::Client, "GET".into(), Reply::Unparsed)]
    );
    assert_eq!(r.p.parse_failures(), 1);
    // The rest of that reply: ignored.
    r.rec(INGRESS, b"$1\r\ny\r\n");
    r.rec(EGRESS, &cmd(&["GET", "b"]));
    r.rec(INGRESS, b"$1\r\nz\r\n");
    assert_eq!(take(&mut r), vec![ok("GET")]);
}

#[test]
fn detection() {
    // A reply seen first (a connection older than the agent): wait for a command.
    let mut r = Run::new();
    r.rec(INGRESS, b"$5\r\nhello\r\n");
    r.rec(EGRESS, &cmd(&["PING"]));
    r.rec(INGRESS, b"+PONG\r\n");
    assert_eq!(take(&mut r), vec![ok("PING")]);
    // A command split before its name is complete.
    let mut r = Run::new();
    let c = cmd(&["HGETALL", "h"]);
    r.rec(EGRESS, &c[..10]);
    r.rec(EGRESS, &c[10..]);
    r.rec(INGRESS, b"*0\r\n");
    assert_eq!(take(&mut r), vec![ok("HGETALL")]);
    // An array of strings that is not a command (a reply, mid-conversation): no span; the
    // next message may start a command.
    let mut r = Run::new();
    r.rec(EGRESS, &cmd(&["hullo", "world"]));
    r.rec(INGRESS, b"+OK\r\n");
    assert!(r.out.is_empty(), "{:?}", r.out);
    assert!(!r.p.is_muted(C));
    let mut r = Run::new();
    r.rec(EGRESS, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert!(r.p.is_muted(C));
    // Only the protocols asked for.
    let mut p = Pairer::new(1, Protocols::of(&[protocol::Protocol::Http1]));
    let c = cmd(&["PING"]);
    let chunk = Chunk {
        direction: EGRESS,
        ts_enter: 1,
        ts_exit: 2,
        len: c.len() as u64,
        payload: &c,
        tid: 1,
        tcp_seq: None,
        inserted: 0,
    };
    p.on_chunk(C, &chunk, &mut Vec::new(), &mut ());
    assert!(p.is_muted(C));
}
