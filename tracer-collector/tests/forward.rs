//! Fan-out: a collector forwards what it stored through a real OTLP relay not written here
//! (rotel, from PyPI) to a second collector, and every span arrives at the far end, from
//! protobuf and JSON senders alike (gRPC shares the protobuf path); an upstream that is down
//! costs ingest nothing.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use prost::Message as _;
use support::*;
use tracer_test_support::topology::rotel;

fn batch(
    trace: u8,
    spans: u64,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    let now = now_nanos();
    let mut req = request(
        "forwarded",
        (0..spans)
            .map(|i| span([trace; 16], (i + 1) as u8, None, "GET /f", now, i, 10))
            .collect(),
    );
    // Distinct span ids within the trace.
    for (i, s) in req.resource_spans[0].scope_spans[0]
        .spans
        .iter_mut()
        .enumerate()
    {
        s.span_id = ((i + 1) as u64).to_be_bytes().to_vec();
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_batches_reach_a_backend_through_a_real_relay() {
    let far = Collector::start("forward-far", &[]);
    let relay_port = free_port();
    let mut relay = Command::new(rotel())
        .args([
            "start",
            "--otlp-http-endpoint",
            &format!("127.0.0.1:{relay_port}"),
        ])
        .args([
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--exporter", "otlp", "--otlp-exporter-protocol", "http"])
        .args([
            "--otlp-exporter-endpoint",
            &format!("http://127.0.0.1:{}", far.http_port),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rotel");
    wait_for("rotel listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", relay_port)).is_ok()
    });
    let near = Collector::start(
        "forward-near",
        &[
            "--forward",
            &format!("http://127.0.0.1:{relay_port}/v1/traces"),
        ],
    );
    let client = reqwest::Client::new();
    // Protobuf and JSON over HTTP.
    for (trace, json) in [(0x41u8, false), (0x42, true), (0x43, false)] {
        let req = batch(trace, 25);
        let (content_type, body) = if json {
            ("application/json", serde_json::to_vec(&req).unwrap())
        } else {
            ("application/x-protobuf", req.encode_to_vec())
        };
        let r = client
            .post(near.http_url())
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    for trace in [0x41u8, 0x42, 0x43] {
        let path = format!("/api/traces/{}", hex::encode([trace; 16]));
        let mut spans = 0;
        for _ in 0..100 {
            let (status, body) = far.get(&path).await;
            if status == 200 {
                spans = body["data"][0]["spans"].as_array().map_or(0, Vec::len);
                if spans == 25 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(spans, 25, "trace {trace:#x} at the far end");
    }
    let acknowledged = near
        .metric(&format!(
            "tracer_collector_forward_requests_total{{upstream=\"http://127.0.0.1:{relay_port}/v1/traces\"}}"
        ))
        .await;
    assert_eq!(acknowledged, 3);
    let _ = relay.kill();
    let _ = relay.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_costs_ingest_nothing() {
    let dead = free_port();
    let c = Collector::start(
        "forward-dead",
        &["--forward", &format!("http://127.0.0.1:{dead}/v1/traces")],
    );
    let started = std::time::Instant::now();
    for trace in 0x50u8..0x55 {
        let r = reqwest::Client::new()
            .post(c.http_url())
            .header("content-type", "application/x-protobuf")
            .body(batch(trace, 5).encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            200,
            "stored even though the upstream is down"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, _) = c
        .get(&format!("/api/traces/{}", hex::encode([0x50u8; 16])))
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let retries = c
        .metric(&format!(
            "tracer_collector_forward_retries_total{{upstream=\"http://127.0.0.1:{dead}/v1/traces\"}}"
        ))
        .await;
    assert!(retries >= 1, "{retries} retries");
}
