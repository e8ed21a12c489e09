//! PostgreSQL framing, pairing and span details, through the generic connection layer.
use tracer_common::direction::{EGRESS, INGRESS};

use super::{Detail, Outcome};
use crate::{
    pairing::{Exchange, Role},
    protocol::{
        self,
        test_run::{Run, C},
    },
};

/// What came out: name, text, outcome.
fn take(r: &mut Run) -> Vec<(String, Option<String>, Outcome)> {
    std::mem::take(&mut r.out)
        .into_iter()
        .map(|e| {
            let d = pg(&e);
            let mut name = String::new();
            d.name_into(&mut name);
            (name, d.text.clone(), d.outcome.clone())
        })
        .collect()
}

/// A client that starts the connection (startup, authentication done, ready).
fn connected(database: &str) -> Run {
    let mut r = Run::new();
    r.rec(EGRESS, &startup(&[("user", "app"), ("database", database)]));
    let mut auth = msg(b'R', &0u32.to_be_bytes());
    auth.extend(msg(b'S', b"server_version\x0015\x00"));
    auth.extend(ready());
    r.rec(INGRESS, &auth);
    assert!(r.out.is_empty());
    r
}

fn pg(e: &Exchange) -> &Detail {
    match &e.detail {
        protocol::Detail::Postgres(d) => d,
        other => panic!("not a PostgreSQL exchange: {other:?}"),
    }
}

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend(cstrs(&[k, v]));
    }
    body.push(0);
    let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstrs(&[sql]))
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cstrs(&[tag]))
}

fn error(code: &str) -> Vec<u8> {
    let mut body = cstrs(&["SERROR", &format!("C{code}"), "Mrelation does not exist"]);
    body.push(0);
    msg(b'E', &body)
}

fn ok(name: &str, text: &str, rows: Option<u64>) -> (String, Option<String>, Outcome) {
    (name.into(), Some(text.into()), Outcome::Ok { rows })
}

#[test]
fn simple_queries_with_rows_errors_and_the_database() {
    let mut r = connected("shop");
    r.rec(
        EGRESS,
        &query("SELECT name FROM users WHERE email = 'a@b.c'"),
    );
    let mut resp = msg(b'T', b"\x00\x01name\x00rest");
    resp.extend(msg(b'D', b"\x00\x01\x00\x00\x00\x03bob"));
    resp.extend(complete("SELECT 1"));
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    r.rec(EGRESS, &query("SELECT * FROM missing"));
    let mut resp = error("42P01");
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    let out = std::mem::take(&mut r.out);
    assert_eq!(pg(&out[0]).database, "shop");
    assert_eq!(
        pg(&out[0]).text.as_deref(),
        Some("SELECT name FROM users WHERE email = ?")
    );
    assert_eq!(pg(&out[0]).outcome, Outcome::Ok { rows: Some(1) });
    assert_eq!(pg(&out[1]).outcome, Outcome::Error("42P01".into()));
    assert_eq!((out[0].start_ns, out[0].end_ns), (30, 45));
    assert_eq!(out[0].role, Role::Client);
}

#[test]
fn extended_protocol_takes_the_text_from_the_parse() {
    let mut r = connected("shop");
    let mut batch = msg(
        b'P',
        &[
            cstrs(&["s1", "UPDATE stock SET n = n - $1 WHERE id = 7"]),
            vec![0, 0],
        ]
        .concat(),
    );
    batch.extend(msg(b'B', &[cstrs(&["", "s1"]), vec![0; 6]].concat()));
    batch.extend(msg(b'E', &[cstrs(&[""]), vec![0; 4]].concat()));
    batch.extend(msg(b'B', &[cstrs(&["", "s1"]), vec![0; 6]].concat()));
    batch.extend(msg(b'E', &[cstrs(&[""]), vec![0; 4]].concat()));
    batch.extend(msg(b'S', b""));
    r.rec(EGRESS, &batch);
    let mut resp = msg(b'1', b"");
    resp.extend(msg(b'2', b""));
    resp.extend(complete("UPDATE 1"));
    resp.extend(msg(b'2', b""));
    resp.extend(complete("UPDATE 1"));
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    let text = "UPDATE stock SET n = n - $1 WHERE id = ?";
    assert_eq!(
        take(&mut r),
        vec![
            ok("UPDATE stock", text, None),
            ok("UPDATE stock", text, None)
        ]
    );
    // A statement prepared once, executed later by name.
    let mut batch = msg(b'B', &[cstrs(&["p", "s1"]), vec![0; 6]].concat());
    batch.extend(msg(b'E', &[cstrs(&["p"]), vec![0; 4]].concat()));
    batch.extend(msg(b'S', b""));
    r.rec(EGRESS, &batch);
    // An error: the batch's other Executes (none here) would not run.
    let mut resp = msg(b'2', b"");
    resp.extend(error("23505"));
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    assert_eq!(
        take(&mut r),
        vec![(
            "UPDATE stock".into(),
            Some(text.into()),
            Outcome::Error("23505".into())
        )]
    );
}

#[test]
fn executes_after_an_error_are_not_spans() {
    let mut r = connected("shop");
    let mut batch = msg(
        b'P',
        &[cstrs(&["", "INSERT INTO t VALUES (1)"]), vec![0, 0]].concat(),
    );
    batch.extend(msg(b'B', &[cstrs(&["", ""]), vec![0; 6]].concat()));
    batch.extend(msg(b'E', &[cstrs(&[""]), vec![0; 4]].concat()));
    batch.extend(msg(b'P', &[cstrs(&["", "SELECT 1"]), vec![0, 0]].concat()));
    batch.extend(msg(b'B', &[cstrs(&["", ""]), vec![0; 6]].concat()));
    batch.extend(msg(b'E', &[cstrs(&[""]), vec![0; 4]].concat()));
    batch.extend(msg(b'S', b""));
    r.rec(EGRESS, &batch);
    let mut resp = msg(b'1', b"");
    resp.extend(msg(b'2', b""));
    resp.extend(error("23505"));
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    let got = take(&mut r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].2, Outcome::Error("23505".into()));
}

#[test]
fn a_large_result_ends_with_its_last_bytes() {
    let mut r = connected("shop");
    r.rec(EGRESS, &query("SELECT * FROM big"));
    // 64 KiB of rows, of which the probes captured the first 512 bytes.
    let mut rows = msg(b'T', b"\x00\x01a\x00");
    while rows.len() < 512 {
        rows.extend(msg(b'D', b"\x00\x01\x00\x00\x00\x10aaaaaaaaaaaaaaaa"));
    }
    r.rec_len(INGRESS, 65_536, &rows[..512]);
    r.rec_len(INGRESS, 65_536, &[]);
    assert!(r.out.is_empty());
    r.rec(EGRESS, &query("SELECT 1"));
    let got = std::mem::take(&mut r.out);
    assert_eq!(got.len(), 1);
    assert_eq!(pg(&got[0]).outcome, Outcome::Unknown);
    assert_eq!(
        got[0].end_ns, 55,
        "the exit of the last record of the response"
    );
    assert_eq!(got[0].response_bytes, 2 * 65_536);
    // The next query pairs normally.
    let mut resp = complete("SELECT 1");
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    assert_eq!(take(&mut r), vec![ok("SELECT", "SELECT ?", Some(1))]);
}

#[test]
fn passwords_are_never_read() {
    let mut r = Run::new();
    r.rec(EGRESS, &startup(&[("user", "app"), ("database", "shop")]));
    r.rec(INGRESS, &msg(b'R', &3u32.to_be_bytes()));
    r.rec(EGRESS, &msg(b'p', &cstrs(&["hunter2"])));
    let mut resp = msg(b'R', &0u32.to_be_bytes());
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    r.rec(EGRESS, &query("ALTER ROLE app PASSWORD 'hunter3'"));
    let mut resp = complete("ALTER ROLE");
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    let got = take(&mut r);
    assert_eq!(got, vec![ok("ALTER", "ALTER ROLE app PASSWORD ?", None)]);
}

#[test]
fn tls_is_muted_and_a_refusal_continues() {
    let ssl = [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f];
    let mut r = Run::new();
    r.rec(EGRESS, &ssl);
    r.rec(INGRESS, b"S");
    assert!(r.p.is_muted(C));
    let mut r = Run::new();
    r.rec(EGRESS, &ssl);
    r.rec(INGRESS, b"N");
    r.rec(EGRESS, &startup(&[("user", "app")]));
    r.rec(INGRESS, &ready());
    r.rec(EGRESS, &query("SELECT 1"));
    let mut resp = complete("SELECT 1");
    resp.extend(ready());
    r.rec(INGRESS, &resp);
    let out = std::mem::take(&mut r.out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        pg(&out[0]).database,
        "app",
        "the user's name when no database is given"
    );
}

#[test]
fn server_side_and_a_connection_joined_late() {
    let mut r = Run::new();
    // The backend's view: the query arrives; the connection predates the agent.
    r.rec(
        INGRESS,
        &query("DELETE FROM sessions WHERE expires < now()"),
    );
    let mut resp = complete("DELETE 3");
    resp.extend(ready());
    r.rec(EGRESS, &resp);
    let out = std::mem::take(&mut r.out);
    assert_eq!(out[0].role, Role::Server);
    assert_eq!(
        pg(&out[0]).text.as_deref(),
        Some("DELETE FROM sessions WHERE expires < now()")
    );
}
