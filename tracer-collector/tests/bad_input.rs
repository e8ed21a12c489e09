//! Bad input at the ingest door: each gets the right status and a message, nothing of a rejected
//! batch is stored, and the collector keeps serving.
mod support;

use std::io::Write as _;

use prost::Message as _;
use support::*;

async fn post(
    url: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("the collector answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn malformed_oversized_and_unauthenticated_requests_are_refused() {
    let c = Collector::start(
        "bad-input",
        &["--token", "s3cret", "--max-body-bytes", "100000"],
    );
    let url = c.http_url();
    let auth = [("authorization", "Bearer s3cret")];
    let trace = [7u8; 16];
    let good = request(
        "svc",
        vec![span(trace, 1, None, "root", now_nanos(), 0, 10)],
    )
    .encode_to_vec();

    // Missing and wrong token.
    let (st, body) = post(&url, "application/x-protobuf", &[], good.clone()).await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("missing bearer token"), "{body}");
    let (st, _) = post(
        &url,
        "application/x-protobuf",
        &[("authorization", "Bearer nope")],
        good.clone(),
    )
    .await;
    assert_eq!(st, 401);

    // Wrong content type.
    let (st, body) = post(&url, "text/plain", &auth, good.clone()).await;
    assert_eq!(st, 415, "{body}");
    assert!(
        body.contains("application/x-protobuf or application/json"),
        "{body}"
    );

    // Malformed protobuf and JSON.
    let (st, body) = post(
        &url,
        "application/x-protobuf",
        &auth,
        b"\xff\xff\xff\xff garbage".to_vec(),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    let (st, body) = post(
        &url,
        "application/json",
        &auth,
        b"{\"resourceSpans\": [".to_vec(),
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        body.contains("not an OTLP ExportTraceServiceRequest in JSON"),
        "{body}"
    );

    // Oversized, plain and as a gzip bomb.
    let (st, body) = post(&url, "application/x-protobuf", &auth, vec![0u8; 200_000]).await;
    assert_eq!(st, 413, "{body}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![0u8; 5_000_000]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 100_000);
    let (st, body) = post(
        &url,
        "application/x-protobuf",
        &[auth[0], ("content-encoding", "gzip")],
        bomb,
    )
    .await;
    assert_eq!(st, 413, "{body}");

    // One bad span spoils the batch: the good span beside it is not stored either.
    let mut bad_batch = request(
        "svc",
        vec![span([9u8; 16], 1, None, "fine", now_nanos(), 0, 10)],
    );
    bad_batch.resource_spans[0].scope_spans[0].spans.push(
        opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: vec![1, 2, 3],
            span_id: vec![1; 8],
            ..Default::default()
        },
    );
    let (st, body) = post(
        &url,
        "application/x-protobuf",
        &auth,
        bad_batch.encode_to_vec(),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("trace_id must be 16 bytes"), "{body}");
    let (st, _) = c
        .get(&format!("/api/traces/{}", hex::encode([9u8; 16])))
        .await;
    assert_eq!(st, 404, "nothing of a rejected batch is stored");

    // Spans dated far ahead (an immortal 2^63 ns, or two days out) are refused on both
    // decoding paths: retention deletes by start time, and they would outlive and outrank
    // every real span.
    for (encoding, start) in [
        ("application/x-protobuf", i64::MAX as u64),
        ("application/json", now_nanos() + 2 * 86_400_000_000_000),
    ] {
        let future = request("svc", vec![span([8u8; 16], 1, None, "late", start, 0, 10)]);
        let body = if encoding == "application/json" {
            serde_json::to_vec(&future).unwrap()
        } else {
            future.encode_to_vec()
        };
        let (st, body) = post(&url, encoding, &auth, body).await;
        assert_eq!(st, 400, "{encoding}: {body}");
        assert!(body.contains("the sender's clock is wrong"), "{body}");
    }

    // A span with 6,000 attributes (protobuf) or 1,000 (JSON) and a 10 KB name (this collector
    // takes 100 KB bodies) is kept with 128 attributes and a 512-byte name, marked
    // `tracer.truncated`.
    for (encoding, attributes, trace) in [
        ("application/x-protobuf", 6_000usize, 0x61u8),
        ("application/json", 1_000, 0x62),
    ] {
        let mut req = request(
            "svc",
            vec![span([trace; 16], 1, None, "x", now_nanos(), 0, 10)],
        );
        let sp = &mut req.resource_spans[0].scope_spans[0].spans[0];
        sp.name = "é".repeat(5_000);
        sp.attributes = (0..attributes)
            .map(|i| kv(&format!("k{i}"), s("")))
            .collect();
        let body = if encoding == "application/json" {
            serde_json::to_vec(&req).unwrap()
        } else {
            req.encode_to_vec()
        };
        let (st, body) = post(&url, encoding, &auth, body).await;
        assert_eq!(st, 200, "{encoding}: {body}");
        let (st, got) = c
            .get(&format!("/api/traces/{}", hex::encode([trace; 16])))
            .await;
        assert_eq!(st, 200);
        let span = &got["data"][0]["spans"][0];
        let tags = span["tags"].as_array().unwrap();
        let kept = tags
            .iter()
            .filter(|t| t["key"].as_str().unwrap().starts_with('k'))
            .count();
        assert_eq!(kept, 128, "{encoding}");
        assert!(
            tags.iter()
                .any(|t| t["key"] == "tracer.truncated" && t["value"] == true),
            "{encoding}: the cut is marked"
        );
        let name = span["operationName"].as_str().unwrap();
        assert!(
            name.len() <= 512 && name.len() >= 510,
            "{encoding}: {}",
            name.len()
        );
    }

    // A 40 KB string value and a 1,000-element array are kept as their first 4 KiB (the array
    // as its JSON text), the span marked `tracer.truncated`; short values are untouched.
    for (encoding, trace) in [
        ("application/x-protobuf", 0x63u8),
        ("application/json", 0x64),
    ] {
        let mut req = request(
            "svc",
            vec![span([trace; 16], 1, None, "x", now_nanos(), 0, 10)],
        );
        let sp = &mut req.resource_spans[0].scope_spans[0].spans[0];
        use opentelemetry_proto::tonic::common::v1::{any_value::Value as V, AnyValue, ArrayValue};
        let list = V::ArrayValue(ArrayValue {
            values: (0..1_000)
                .map(|i| AnyValue {
                    value: Some(s(&format!("item-{i}"))),
                })
                .collect(),
        });
        sp.attributes = vec![
            kv("long", s(&"ü".repeat(20_000))),
            kv("list", list),
            kv("short", s("fine")),
        ];
        let body = if encoding == "application/json" {
            serde_json::to_vec(&req).unwrap()
        } else {
            req.encode_to_vec()
        };
        let (st, body) = post(&url, encoding, &auth, body).await;
        assert_eq!(st, 200, "{encoding}: {body}");
        let (st, got) = c
            .get(&format!("/api/traces/{}", hex::encode([trace; 16])))
            .await;
        assert_eq!(st, 200);
        let tags = got["data"][0]["spans"][0]["tags"]
            .as_array()
            .unwrap()
            .clone();
        let value = |key: &str| {
            tags.iter()
                .find(|t| t["key"] == key)
                .and_then(|t| t["value"].as_str())
                .unwrap_or_else(|| panic!("{encoding}: no {key}"))
                .to_owned()
        };
        let long = value("long");
        assert!(
            long.len() <= 4096 && long.len() >= 4095 && long.chars().all(|c| c == 'ü'),
            "{encoding}: {}",
            long.len()
        );
        let list = value("list");
        assert!(
            list.len() <= 4096 && list.starts_with("[\"item-0\""),
            "{encoding}"
        );
        assert_eq!(value("short"), "fine");
        assert!(
            tags.iter()
                .any(|t| t["key"] == "tracer.truncated" && t["value"] == true),
            "{encoding}: the cut is marked"
        );
    }

    // Still serving: a good request is accepted and found.
    let (st, body) = post(&url, "application/x-protobuf", &auth, good).await;
    assert_eq!(st, 200, "{body}");
    let (st, trace_json) = c.get(&format!("/api/traces/{}", hex::encode(trace))).await;
    assert_eq!(st, 200);
    assert_eq!(trace_json["data"][0]["spans"].as_array().unwrap().len(), 1);

    // The query API refuses nonsense with Jaeger's error shape.
    let (st, err) = c.get("/api/traces?service=svc&minDuration=fast").await;
    assert_eq!(st, 400);
    assert!(err["errors"][0]["msg"]
        .as_str()
        .unwrap()
        .contains("minDuration"));
}
