//! Crash safety: kill -9 the collector in the middle of ingest; after a restart every span it
//! acknowledged is there.
mod support;

use std::time::{Duration, Instant};

use prost::Message as _;
use support::*;

#[tokio::test]
async fn acknowledged_spans_survive_kill_9() {
    let mut c = Collector::start("crash", &[]);
    let url = c.http_url();
    let client = reqwest::Client::new();
    let mut acked: Vec<[u8; 16]> = Vec::new();
    let base = now_nanos();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut n: u32 = 0;
    // Send batches of 200 spans (one trace each) as fast as the collector takes them.
    while Instant::now() < deadline {
        n += 1;
        let mut trace = [0u8; 16];
        trace[..4].copy_from_slice(&n.to_be_bytes());
        trace[15] = 1;
        let spans = (1..=200u8)
            .map(|i| span(trace, i, (i > 1).then_some(1), "op", base, u64::from(i), 5))
            .collect();
        let body = request("crash-svc", spans).encode_to_vec();
        let resp = client
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        acked.push(trace);
    }
    // Kill while a request is in flight.
    let inflight = {
        let mut trace = [0xEEu8; 16];
        trace[0] = 0;
        let body =
            request("crash-svc", vec![span(trace, 1, None, "op", base, 0, 5)]).encode_to_vec();
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            client
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
        })
    };
    c.kill9();
    let _ = inflight.await;
    assert!(
        acked.len() >= 5,
        "only {} batches were acknowledged before the kill",
        acked.len()
    );

    c.spawn();
    for trace in &acked {
        let (st, body) = c.get(&format!("/api/traces/{}", hex::encode(trace))).await;
        assert_eq!(st, 200, "acknowledged trace {} lost", hex::encode(trace));
        assert_eq!(
            body["data"][0]["spans"].as_array().unwrap().len(),
            200,
            "spans of an acknowledged batch lost"
        );
    }
    eprintln!(
        "{} acknowledged batches of 200 spans all present after kill -9",
        acked.len()
    );
}
