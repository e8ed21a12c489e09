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

/// A span whose parent link the agent made, with the provenance attributes of the linking contract.
fn linked(mut sp: Span, source: &str, confidence: &str) -> Span {
    sp.attributes.push(kv("tracer.link.source", s(source)));
    sp.attributes
        .push(kv("tracer.link.confidence", s(confidence)));
    sp
}

/// The request's place in its TCP stream, as the agent reports it on both ends.
fn on_edge(mut sp: Span, edge: &str) -> Span {
    let seq: i64 = edge.rsplit('#').next().unwrap().parse().unwrap();
    sp.attributes.push(kv("tracer.tcp.edge", s(edge)));
    sp.attributes.push(kv("tracer.tcp.seq", V::IntValue(seq)));
    sp
}

/// A span of another trace (an agent that saw no trace context starts a new one).
fn in_trace(mut sp: Span, trace: [u8; 16], parent: Option<u8>) -> Span {
    sp.trace_id = trace.to_vec();
    sp.parent_span_id = parent.map(|p| vec![p; 8]).unwrap_or_default();
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

    // web-client (host-a) -> gateway (host-b) -> orders (host-c) -> prices (host-d), as four
    // agents report it: each SERVER span in a trace of its own, joined to its CLIENT span only
    // by tracer.tcp.edge, which the collector stitches at query time. The gateway's agent took a
    // traceparent the collector must replace; host-b's clock is 2.5 ms behind; the prices
    // server sits behind NAT (addresses differ, the sequence number does not); a call of
    // orders to a database is never answered by a traced server (incomplete).
    let ptrace = [0x7bu8; 16];
    let pid = hex(&ptrace);
    let host_b_skew = 2_500_000; // ns host-b's clock is behind
    let on_host = |clock_base: u64| {
        move |id, parent, name, kind, off, dur| {
            let mut x = span(ptrace, id, parent, name, clock_base, off, dur);
            x.kind = kind;
            x
        }
    };
    let (sp, sp_b) = (on_host(base), on_host(base - host_b_skew));
    let (client_k, server_k) = (3, 2);
    let call = on_edge(
        sp(1, None, "GET /checkout", client_k, 0, 20_000),
        "10.200.0.1:40312>10.200.0.2:8080#2718281828",
    );
    let gw_in = in_trace(
        linked(
            on_edge(
                sp_b(2, None, "GET /checkout", server_k, 300, 19_000),
                "10.200.0.1:40312>10.200.0.2:8080#2718281828",
            ),
            "traceparent",
            "medium",
        ),
        [0x7c; 16],
        Some(9),
    );
    let gw_out = in_trace(
        linked(
            on_edge(
                sp_b(3, Some(2), "POST /orders", client_k, 1_000, 16_000),
                "10.200.0.2:51000>10.200.0.3:9000#5000",
            ),
            "thread",
            "high",
        ),
        [0x7c; 16],
        Some(2),
    );
    let orders_in = in_trace(
        on_edge(
            sp(4, None, "POST /orders", server_k, 1_500, 15_000),
            "10.200.0.2:51000>10.200.0.3:9000#5000",
        ),
        [0x7d; 16],
        None,
    );
    let db = in_trace(
        linked(
            on_edge(
                sp(5, Some(4), "GET /stock", client_k, 2_000, 3_000),
                "10.200.0.3:41000>10.200.0.9:5432#123456789",
            ),
            "sole-request",
            "medium",
        ),
        [0x7d; 16],
        Some(4),
    );
    let prices_out = in_trace(
        linked(
            on_edge(
                sp(6, Some(4), "GET /prices", client_k, 6_000, 8_000),
                "10.200.0.3:52000>10.0.0.100:80#777777",
            ),
            "shared-id",
            "medium",
        ),
        [0x7d; 16],
        Some(4),
    );
    let prices_in = in_trace(
        on_edge(
            sp(7, None, "GET /prices", server_k, 6_500, 7_000),
            "192.168.5.1:40000>10.200.0.4:7000#777777",
        ),
        [0x7e; 16],
        None,
    );
    // The NAT fallback also compares method and path.
    let (mut prices_out, mut prices_in) = (prices_out, prices_in);
    for x in [&mut prices_out, &mut prices_in] {
        x.attributes.push(kv("url.path", s("/prices")));
    }
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
        .args([
            "--expect-links",
            "6",
            "--expect-low",
            "1",
            "--expect-medium",
            "2",
        ])
        .args(["--min-shifted", "1", "--expect-hosts", "4"])
        .args(["--expect-incomplete", "yes"])
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
