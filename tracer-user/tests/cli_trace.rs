//! `tracer trace` and `tracer traces` against a real collector holding a trace across four hosts
//! whose spans carry link provenance and clock corrections: the human output shows each link's
//! source, confidence and maker, the clock shifts, the hosts and (when the collector says so) that
//! the trace is incomplete; `--json` prints the API's own JSON.
mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, AnyValue, KeyValue},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message as _;
use support::{free_port, temp_dir, Proc};

/// The collector binary of the same build as the `tracer` under test. `cargo test --workspace`
/// builds it; a run of this test alone builds it here (cargo holds no lock while tests run).
fn collector_bin() -> PathBuf {
    let tracer = Path::new(env!("CARGO_BIN_EXE_tracer"));
    let profile_dir = tracer.parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "-p", "tracer-collector", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo to build tracer-collector");
    assert!(status.success(), "building tracer-collector failed");
    let bin = profile_dir.join("tracer-collector");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

struct Collector {
    _proc: Proc,
    http_port: u16,
    query_port: u16,
}

fn start_collector() -> Collector {
    let (http_port, query_port, grpc_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(collector_bin())
        .arg("--data-dir")
        .arg(temp_dir("cli-trace"))
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
        .args(["--query-addr", &format!("127.0.0.1:{query_port}")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tracer-collector");
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[collector] {line}");
            if line.contains("tracer-collector: ready") {
                let _ = tx.send(());
            }
        }
    });
    let proc = Proc(child);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the collector did not become ready in 30 s");
    Collector {
        _proc: proc,
        http_port,
        query_port,
    }
}

/// One HTTP/1.1 exchange on a fresh connection; returns the status and the body.
fn http(port: u16, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(body).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: &str) -> Value {
    Value::StringValue(v.into())
}

const TRACE: [u8; 16] = [0x3c; 16];

#[expect(clippy::too_many_arguments, reason = "one span of the fixture a line")]
fn span(
    id: u8,
    parent: Option<u8>,
    name: &str,
    kind: i32,
    base: u64,
    offset_us: u64,
    dur_us: u64,
    attrs: Vec<KeyValue>,
) -> Span {
    Span {
        trace_id: TRACE.to_vec(),
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: name.into(),
        kind,
        start_time_unix_nano: base + offset_us * 1000,
        end_time_unix_nano: base + (offset_us + dur_us) * 1000,
        attributes: attrs,
        ..Default::default()
    }
}

fn link(source: &str, confidence: &str, by: Option<&str>) -> Vec<KeyValue> {
    let mut v = vec![
        kv("tracer.link.source", s(source)),
        kv("tracer.link.confidence", s(confidence)),
    ];
    if let Some(by) = by {
        v.push(kv("tracer.link.by", s(by)));
    }
    v
}

fn clock(shift_us: i64, raw_start_us: i64) -> Vec<KeyValue> {
    vec![
        kv("tracer.clock.shift_us", Value::IntValue(shift_us)),
        kv("tracer.clock.raw_start_us", Value::IntValue(raw_start_us)),
    ]
}

/// web-client (host-a) -> gateway (host-b) -> orders (host-c) -> prices (host-d), plus a call of
/// orders whose server side is never traced.
fn fixture(base: u64) -> ExportTraceServiceRequest {
    let us = |off: u64| (base / 1000 + off) as i64;
    let gw_in = [
        link("tcp-seq", "high", Some("collector")),
        vec![kv(
            "tracer.link.replaced",
            s("traceparent:0909090909090909"),
        )],
        clock(1_500, us(300) - 1_500),
    ]
    .concat();
    let orders_in = [
        link("tcp-seq", "high", Some("collector")),
        clock(-800, us(1_500) + 800),
    ]
    .concat();
    let stock = [
        link("sole-request", "low", None),
        vec![kv(
            "tracer.tcp.edge",
            s("10.200.0.3:41000>10.200.0.9:5432#123456789"),
        )],
    ]
    .concat();
    let groups = vec![
        (
            "web-client",
            "host-a",
            vec![span(1, None, "GET /checkout", 3, base, 0, 20_000, vec![])],
        ),
        (
            "gateway",
            "host-b",
            vec![
                span(2, Some(1), "GET /checkout", 2, base, 300, 19_000, gw_in),
                span(
                    3,
                    Some(2),
                    "POST /orders",
                    3,
                    base,
                    1_000,
                    16_000,
                    link("thread", "medium", None),
                ),
            ],
        ),
        (
            "orders",
            "host-c",
            vec![
                span(
                    4,
                    Some(3),
                    "POST /orders",
                    2,
                    base,
                    1_500,
                    15_000,
                    orders_in,
                ),
                span(5, Some(4), "GET /stock", 3, base, 2_000, 3_000, stock),
            ],
        ),
        (
            "prices",
            "host-d",
            vec![span(
                7,
                Some(4),
                "GET /prices",
                2,
                base,
                6_500,
                7_000,
                link("traceparent", "high", Some("agent")),
            )],
        ),
    ];
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(service, host, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s(service)), kv("host.name", s(host))],
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

fn tracer(c: &Collector, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(args)
        .args(["--url", &format!("http://127.0.0.1:{}", c.query_port)])
        .env_remove("TRACER_URL")
        .output()
        .expect("run tracer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The line of the span named `op` of `service`.
fn line_of<'a>(out: &'a str, service: &str, op: &str) -> &'a str {
    let needle = format!("{service}: {op} [");
    out.lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no line for {service} {op} in:\n{out}"))
}

/// Depth of a span line: the indentation of its name after the two time columns (23
/// characters; `µ` is two bytes, so counted in characters).
fn indent(line: &str) -> usize {
    line.chars().skip(23).take_while(|c| *c == ' ').count()
}

#[test]
fn trace_shows_provenance_clock_shifts_hosts_and_incompleteness() {
    let c = start_collector();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let body = fixture(now - 5_000_000_000).encode_to_vec();
    let (status, answer) = http(
        c.http_port,
        "POST",
        "/v1/traces",
        "application/x-protobuf",
        &body,
    );
    assert_eq!(status, 200, "posting the spans: {answer}");
    let id = hex(&TRACE);

    // What the API says, to compare the CLI with.
    let (status, api) = http(
        c.query_port,
        "GET",
        &format!("/api/traces/{id}"),
        "text/plain",
        b"",
    );
    assert_eq!(status, 200, "{api}");
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    let api = &api["data"];
    assert_eq!(api[0]["spans"].as_array().unwrap().len(), 6);

    let (ok, out, err) = tracer(&c, &["trace", &id]);
    assert!(ok, "tracer trace failed: {err}");
    eprintln!("{out}");
    assert!(out.starts_with(&format!("trace {id} ")), "{out}");
    assert!(out.contains("6 spans, 0 errors"), "{out}");

    let gw = line_of(&out, "gateway", "GET /checkout");
    assert!(
        gw.contains(" @host-b [tcp-seq/high by collector, replaced traceparent:0909090909090909]"),
        "{gw}"
    );
    assert!(gw.contains("[clock +1.50ms, raw start "), "{gw}");
    let orders = line_of(&out, "orders", "POST /orders");
    assert!(
        orders.contains("@host-c [tcp-seq/high by collector]"),
        "{orders}"
    );
    assert!(orders.contains("[clock -800µs, raw start "), "{orders}");
    assert!(line_of(&out, "gateway", "POST /orders").ends_with("@host-b [thread/medium by agent]"));
    assert!(line_of(&out, "orders", "GET /stock").ends_with("@host-c [sole-request/low by agent]"));
    assert!(line_of(&out, "prices", "GET /prices").ends_with("@host-d [traceparent/high by agent]"));
    let root = line_of(&out, "web-client", "GET /checkout");
    assert!(
        root.ends_with("[client] @host-a"),
        "the root has no link: {root}"
    );
    assert!(
        out.contains("clock correction applied to 2 spans (hosts host-b, host-c)"),
        "{out}"
    );
    // The raw start is the stored one, to the microsecond.
    let raw_us = (now - 5_000_000_000) / 1000 + 300 - 1_500;
    let raw = format!("{:06}]", raw_us % 1_000_000);
    assert!(gw.ends_with(&raw), "raw start of {raw_us} µs not in {gw}");
    // The tree: each span one level under its parent.
    let depth = |svc, op| indent(line_of(&out, svc, op));
    assert_eq!(depth("web-client", "GET /checkout"), 0);
    assert_eq!(depth("gateway", "GET /checkout"), 2);
    assert_eq!(depth("gateway", "POST /orders"), 4);
    assert_eq!(depth("orders", "POST /orders"), 6);
    assert_eq!(depth("orders", "GET /stock"), 8);
    assert_eq!(depth("prices", "GET /prices"), 8);

    // Incomplete: the header line and every reason, exactly when the collector says so.
    let reasons: Vec<&str> = api[0]["incompleteReasons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
        .collect();
    if api[0]["incomplete"] == true {
        assert!(
            out.contains("\nINCOMPLETE: spans may be missing\n"),
            "{out}"
        );
        for r in &reasons {
            assert!(
                out.contains(&format!("  - {r}\n")),
                "reason {r:?} missing:\n{out}"
            );
        }
    } else {
        assert!(!out.contains("INCOMPLETE"), "{out}");
    }

    // --json: the API's data, unchanged.
    let (ok, json, err) = tracer(&c, &["trace", &id, "--json"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&json).expect("--json prints JSON");
    assert_eq!(&json, api);

    // The search list marks incomplete traces.
    let (ok, list, err) = tracer(&c, &["traces", "--service", "web-client"]);
    assert!(ok, "{err}");
    let row = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("trace {id} not listed:\n{list}"));
    assert!(row.contains("web-client: GET /checkout"), "{row}");
    assert_eq!(
        row.ends_with("[incomplete]"),
        api[0]["incomplete"] == true,
        "{row}"
    );

    // A malformed id is refused with the collector's message.
    let (ok, _, err) = tracer(&c, &["trace", "not-hex"]);
    assert!(!ok);
    assert!(err.contains("the collector answered 400"), "{err}");
}
