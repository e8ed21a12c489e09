//! DNS messages, through the generic connection layer.
use tracer_common::direction::{EGRESS, INGRESS};

use super::{Detail, Reply};
use crate::protocol::{
    self,
    test_run::{Run, C},
};

/// A standard query (RD set), or its response with `rcode` and `answers` answers.
fn message(id: u16, name: &str, qtype: u16, response: Option<(u8, u16)>) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    let flags: u16 = match response {
        None => 0x0100,
        Some((rcode, _)) => 0x8180 | u16::from(rcode),
    };
    m.extend_from_slice(&flags.to_be_bytes());
    let answers = response.map_or(0, |r| r.1);
    for count in [1u16, answers, 0, 0] {
        m.extend_from_slice(&count.to_be_bytes());
    }
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    for _ in 0..answers {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
    }
    m
}

/// The DNS details that came out.
fn take(r: &mut Run) -> Vec<Detail> {
    std::mem::take(&mut r.out)
        .into_iter()
        .map(|e| match e.detail {
            protocol::Detail::Dns(d) => d,
            other => panic!("not DNS: {other:?}"),
        })
        .collect()
}

fn detail(name: &str, qtype: u16, tcp: bool, reply: Reply) -> Detail {
    Detail {
        name: Some(name.into()),
        qtype,
        tcp,
        reply,
    }
}

#[test]
fn queries_pair_with_responses_by_id_in_any_order() {
    let mut r = Run::new();
    // A stub resolver's lookup: A and AAAA sent together, answered in the other order.
    r.rec(EGRESS, &message(7, "db.svc.test", 1, None));
    r.rec(EGRESS, &message(8, "db.svc.test", 28, None));
    r.rec(INGRESS, &message(8, "db.svc.test", 28, Some((0, 0))));
    r.rec(INGRESS, &message(7, "db.svc.test", 1, Some((0, 2))));
    // A response nobody asked for is not a span.
    r.rec(INGRESS, &message(99, "x.test", 1, Some((0, 1))));
    assert_eq!(
        take(&mut r),
        vec![
            detail(
                "db.svc.test",
                28,
                false,
                Reply::Answered {
                    rcode: 0,
                    answers: 0
                }
            ),
            detail(
                "db.svc.test",
                1,
                false,
                Reply::Answered {
                    rcode: 0,
                    answers: 2
                }
            ),
        ]
    );
    // NXDOMAIN is an answer; SERVFAIL an error; a query the socket closed on, no response.
    r.rec(EGRESS, &message(9, "nothing.invalid", 1, None));
    r.rec(INGRESS, &message(9, "nothing.invalid", 1, Some((3, 0))));
    r.rec(EGRESS, &message(10, "broken.test", 1, None));
    r.rec(INGRESS, &message(10, "broken.test", 1, Some((2, 0))));
    r.rec(EGRESS, &message(11, "slow.test", 1, None));
    r.p.on_close(C, 1_000, &mut r.out);
    let got = take(&mut r);
    let statuses: Vec<_> = got.iter().map(|d| d.status(false).0 as i32).collect();
    assert_eq!(statuses, [0, 2, 2]);
    assert_eq!(got[2].reply, Reply::None);
    let mut name = String::new();
    got[0].name_into(&mut name);
    assert_eq!(name, "DNS A");
}

#[test]
fn dns_over_tcp_is_length_prefixed() {
    let mut r = Run::new();
    let q = message(1, "svc.test", 33, None);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    // A server reading the length, then the message.
    r.rec(INGRESS, &framed[..2]);
    r.rec(INGRESS, &framed[2..]);
    let a = message(1, "svc.test", 33, Some((0, 1)));
    let mut framed = (a.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&a);
    r.rec(EGRESS, &framed);
    assert_eq!(
        take(&mut r),
        vec![detail(
            "svc.test",
            33,
            true,
            Reply::Answered {
                rcode: 0,
                answers: 1
            }
        )]
    );
}

#[test]
fn other_traffic_is_not_dns() {
    let mut r = Run::new();
    r.rec(
        EGRESS,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00\x00\x00",
    );
    assert!(r.p.is_muted(C));
}
