//! MySQL framing, pairing and span details, through the generic connection layer.
use tracer_common::direction::{EGRESS, INGRESS};

use super::{Detail, Outcome};
use crate::{
    pairing::{Exchange, Role},
    protocol::{
        self,
        test_run::{Run, C},
    },
};

fn packet(seq: u8, body: &[u8]) -> Vec<u8> {
    let len = body.len() as u32;
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(body);
    out
}

fn my(e: &Exchange) -> &Detail {
    match &e.detail {
        protocol::Detail::Mysql(d) => d,
        other => panic!("not a MySQL exchange: {other:?}"),
    }
}

/// A client connection through greeting, handshake response (database `shop`) and OK.
fn connected() -> Run {
    let mut r = Run::new();
    let mut greeting = vec![0x0a];
    greeting.extend_from_slice(b"10.11.19-MariaDB\0");
    greeting.extend_from_slice(&[0; 40]);
    r.rec(INGRESS, &packet(0, &greeting));
    // Capabilities: CONNECT_WITH_DB | SECURE_CONNECTION | PROTOCOL_41.
    let caps: u32 = 0x8 | 0x8000 | 0x200;
    let mut resp = caps.to_le_bytes().to_vec();
    resp.extend_from_slice(&[0; 28]);
    resp.extend_from_slice(b"app\0");
    resp.push(4);
    resp.extend_from_slice(b"pw!!");
    resp.extend_from_slice(b"shop\0");
    r.rec(EGRESS, &packet(1, &resp));
    r.rec(INGRESS, &packet(2, &[0, 0, 0, 2, 0, 0, 0]));
    r
}

#[test]
fn queries_errors_and_result_sets() {
    let mut r = connected();
    r.rec(
        EGRESS,
        &packet(0, b"\x03INSERT INTO t VALUES (1, 'secret')"),
    );
    r.rec(INGRESS, &packet(1, &[0, 1, 0, 2, 0, 0, 0]));
    r.rec(EGRESS, &packet(0, b"\x03SELECT * FROM nowhere"));
    r.rec(
        INGRESS,
        &packet(1, b"\xff\x7a\x04#42S02Table 'shop.nowhere' doesn't exist"),
    );
    let out = std::mem::take(&mut r.out);
    assert_eq!(
        my(&out[0]).text.as_deref(),
        Some("INSERT INTO t VALUES (?, ?)")
    );
    assert_eq!(my(&out[0]).database, "shop");
    assert_eq!(my(&out[0]).system, "mariadb");
    assert_eq!(my(&out[1]).outcome, Outcome::Error("1146".into()));
    // A result set: it ends with its last bytes, when the client speaks again.
    r.rec(EGRESS, &packet(0, b"\x03SELECT a FROM t"));
    r.rec(INGRESS, &[packet(1, &[1]), packet(2, b"\x03def")].concat());
    r.rec(
        INGRESS,
        &[packet(3, b"\x01x"), packet(4, &[0xfe, 0, 0, 2, 0])].concat(),
    );
    assert!(r.out.is_empty());
    r.rec(EGRESS, &packet(0, b"\x0e"));
    let out = std::mem::take(&mut r.out);
    assert_eq!(my(&out[0]).collection.as_deref(), Some("t"));
    assert_eq!(out[0].end_ns, 105, "the exit of the result's last record");
    r.rec(INGRESS, &packet(1, &[0, 0, 0, 2, 0, 0, 0]));
    let out = std::mem::take(&mut r.out);
    assert_eq!(my(&out[0]).operation.as_deref(), Some("PING"));
}

#[test]
fn prepared_statements_take_their_text_from_the_prepare() {
    let mut r = connected();
    r.rec(EGRESS, &packet(0, b"\x16UPDATE t SET n = ? WHERE id = 3"));
    // OK_prepare: statement id 5, then a parameter definition and EOF.
    let ok = [0u8, 5, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
    r.rec(
        INGRESS,
        &[
            packet(1, &ok),
            packet(2, b"\x03def"),
            packet(3, &[0xfe, 0, 0, 2, 0]),
        ]
        .concat(),
    );
    r.rec(EGRESS, &packet(0, &[0x17, 5, 0, 0, 0, 0, 1, 0, 0, 0]));
    r.rec(INGRESS, &packet(1, &[0, 1, 0, 2, 0, 0, 0]));
    r.rec(EGRESS, &packet(0, &[0x19, 5, 0, 0, 0]));
    let out = std::mem::take(&mut r.out);
    let names: Vec<_> = out
        .iter()
        .map(|e| {
            let mut n = String::new();
            my(e).name_into(&mut n);
            (n, my(e).text.clone().unwrap_or_default())
        })
        .collect();
    let text = "UPDATE t SET n = ? WHERE id = ?".to_string();
    assert_eq!(
        names,
        vec![
            ("PREPARE t".into(), text.clone()),
            ("UPDATE t".into(), text)
        ],
        "COM_STMT_CLOSE has no response and no span"
    );
    assert_eq!(out[0].role, Role::Client);
}

#[test]
fn tls_requests_are_muted_and_late_joins_start_at_a_query() {
    let mut r = Run::new();
    r.rec(INGRESS, &packet(0, b"\x0a8.0.36\0rest"));
    let caps: u32 = 0x800 | 0x200 | 0x8000;
    let mut ssl = caps.to_le_bytes().to_vec();
    ssl.extend_from_slice(&[0; 28]);
    r.rec(EGRESS, &packet(1, &ssl));
    assert!(r.p.is_muted(C));
    // The server side of a connection older than the agent.
    let mut r = Run::new();
    r.rec(INGRESS, &packet(0, b"\x03DELETE FROM sessions"));
    r.rec(EGRESS, &packet(1, &[0, 3, 0, 2, 0, 0, 0]));
    let out = std::mem::take(&mut r.out);
    assert_eq!(out[0].role, Role::Server);
    assert_eq!(my(&out[0]).system, "mysql");
    assert_eq!(my(&out[0]).operation.as_deref(), Some("DELETE"));
}
