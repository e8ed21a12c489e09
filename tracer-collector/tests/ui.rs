//! The web UI in a real browser (Debian's headless chromium driven by playwright-core): search,
//! open a trace, check the waterfall nests the spans correctly, open a span, open the service map;
//! then a trace across four hosts: link provenance badges and words, hosts, clock-correction
//! markers, the low-confidence filter and the incomplete banner.
//! Screenshots are kept in target/ui-artifacts/.
mod support;

use std::process::Command;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value::Value as V,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message as _;
use support::*;

/// One request with a resource per (service, host), as four agents would send.
fn multi_host(groups: Vec<(&str, &str, Vec<Span>)>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(service, host, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", s(service)),
                        kv("host.name", s(host)),
                        kv("host.id", s(&format!("id-{host}"))),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// A span whose parent link carries the provenance attributes of the linking contract.
fn linked(mut sp: Span, kind: i32, source: &str, confidence: &str, by: Option<&str>) -> Span {
    sp.kind = kind;
    sp.attributes.push(kv("tracer.link.source", s(source)));
    sp.attributes.push(kv("tracer.link.confidence", s(confidence)));
    if let Some(by) = by {
        sp.attributes.push(kv("tracer.link.by", s(by)));
    }
    sp
}

/// Marks a span as moved by a clock correction of `shift_us` (its raw start is `shift_us` earlier).
fn shifted(mut sp: Span, shift_us: i64) -> Span {
    let raw = (sp.start_time_unix_nano / 1000) as i64 - shift_us;
    sp.attributes
        .push(kv("tracer.clock.shift_us", V::IntValue(shift_us)));
    sp.attributes
        .push(kv("tracer.clock.raw_start_us", V::IntValue(raw)));
    sp
}

#[tokio::test]
async fn ui_search_waterfall_and_map_in_chromium() {
    let tests_dir = repo_root().join("tracer-collector/ui/tests");
    assert!(
        tests_dir.join("node_modules/playwright-core").exists(),
        "playwright-core missing in {}: run scripts/setup.sh",
        tests_dir.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "chromium missing: run scripts/setup.sh"
    );

    let c = Collector::start("ui", &[]);
    // shop-web -> orders-api -> (orders-api's database call): three spans, depth 2, two services.
    let trace = [0x5au8; 16];
    let base = now_nanos() - 5_000_000_000;
    let root = span(trace, 1, None, "GET /checkout", base, 0, 9_000);
    let mut child = span(trace, 2, Some(1), "POST /orders", base, 500, 7_000);
    child.status = Some(opentelemetry_proto::tonic::trace::v1::Status {
        code: 2,
        message: "out of stock".into(),
    });
    let mut db = span(trace, 3, Some(2), "SELECT orders", base, 1_000, 3_000);
    db.kind = 3;
    let client = reqwest::Client::new();
    for (service, spans) in [("shop-web", vec![root]), ("orders-api", vec![db, child])] {
        let resp = client
            .post(c.http_url())
            .header("content-type", "application/x-protobuf")
            .body(request(service, spans).encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    // web-client (host-a) -> gateway (host-b) -> orders (host-c) -> prices (host-d), and an
    // orders call whose server side is never traced. Links: tcp-seq by the collector (one that
    // replaced a traceparent parent), same thread, forwarded request line, traceparent, and
    // a low-confidence sole-request guess. host-b and host-c were clock-corrected.
    let ptrace = [0x7bu8; 16];
    let pid = hex(&ptrace);
    let sp = |id, parent, name, off, dur| span(ptrace, id, parent, name, base, off, dur);
    let mut call = sp(1, None, "GET /checkout", 0, 20_000);
    call.kind = 3;
    let mut gw_in = linked(
        sp(2, Some(1), "GET /checkout", 300, 19_000),
        2,
        "tcp-seq",
        "high",
        Some("collector"),
    );
    gw_in.attributes.push(kv(
        "tracer.link.replaced",
        s("traceparent:0909090909090909"),
    ));
    let gw_in = shifted(gw_in, 1_500);
    let gw_out = linked(
        sp(3, Some(2), "POST /orders", 1_000, 16_000),
        3,
        "thread",
        "medium",
        None,
    );
    let orders_in = shifted(
        linked(
            sp(4, Some(3), "POST /orders", 1_500, 15_000),
            2,
            "tcp-seq",
            "high",
            Some("collector"),
        ),
        -800,
    );
    let mut db = linked(
        sp(5, Some(4), "GET /stock", 2_000, 3_000),
        3,
        "sole-request",
        "low",
        None,
    );
    db.attributes.push(kv(
        "tracer.tcp.edge",
        s("10.200.0.3:41000>10.200.0.9:5432#123456789"),
    ));
    db.attributes.push(kv("tracer.tcp.seq", V::IntValue(123_456_789)));
    let prices_out = linked(
        sp(6, Some(4), "GET /prices", 6_000, 8_000),
        3,
        "forwarded-request",
        "medium",
        None,
    );
    let prices_in = linked(
        sp(7, Some(6), "GET /prices", 6_500, 7_000),
        2,
        "traceparent",
        "high",
        Some("agent"),
    );
    let body = multi_host(vec![
        ("web-client", "host-a", vec![call]),
        ("gateway", "host-b", vec![gw_in, gw_out]),
        ("orders", "host-c", vec![orders_in, db, prices_out]),
        ("prices", "host-d", vec![prices_in]),
    ]);
    let resp = client
        .post(c.http_url())
        .header("content-type", "application/x-protobuf")
        .body(body.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let shots = repo_root().join("target/ui-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new("node")
        .current_dir(&tests_dir)
        .arg("ui.test.mjs")
        .args(["--url", &c.api("")])
        .args(["--service", "shop-web", "--operation", "GET /checkout"])
        .args(["--expect-spans", "3", "--expect-depth", "2"])
        .args(["--provenance-trace", &pid])
        .args(["--expect-links", "6", "--expect-low", "1", "--expect-medium", "2"])
        .args(["--expect-shifted", "2", "--expect-hosts", "4"])
        .args(["--expect-incomplete", "auto"])
        .arg("--screenshot-dir")
        .arg(&shots)
        .output()
        .expect("node (Node.js 20) is needed for the UI test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed:\n{stdout}");
    for png in [
        "search.png",
        "trace.png",
        "map.png",
        "provenance.png",
        "provenance-medium.png",
    ] {
        let meta =
            std::fs::metadata(shots.join(png)).unwrap_or_else(|_| panic!("{png} not written"));
        assert!(meta.len() > 10_000, "{png} looks empty");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
