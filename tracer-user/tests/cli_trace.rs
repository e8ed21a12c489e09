//! `tracer trace` and `tracer traces` against a real collector holding a trace across four hosts
//! whose spans carry link provenance and clock corrections: the human output shows each link's
//! source, confidence and maker, the clock shifts, the hosts and (when the collector says so) that
//! the trace is incomplete; `--json` prints the API's own JSON.
mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
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
use support::{collector_bin, free_port, temp_dir, Proc};

struct Collector {
    _proc: Proc,
    http_port: u16,
    query_port: u16,
}

fn start_collector(name: &str) -> Collector {
    let (http_port, query_port, grpc_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(collector_bin())
        .arg("--data-dir")
        .arg(temp_dir(name))
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

/// The stitched trace's id: the trace of its root, the client's.
const TRACE: [u8; 16] = [0x3c; 16];

/// One span as an agent reports it: its own trace and parent (if it had any), its kind, its
/// start `offset_us` after `base` on its host's clock, and its attributes.
struct S {
    trace: u8,
    id: u8,
    parent: Option<u8>,
    name: &'static str,
    kind: i32,
    offset_us: u64,
    dur_us: u64,
    attrs: Vec<KeyValue>,
}

impl S {
    fn at(self, base: u64) -> Span {
        Span {
            trace_id: vec![self.trace; 16],
            span_id: vec![self.id; 8],
            parent_span_id: self.parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: self.name.into(),
            kind: self.kind,
            start_time_unix_nano: base + self.offset_us * 1000,
            end_time_unix_nano: base + (self.offset_us + self.dur_us) * 1000,
            attributes: self.attrs,
            ..Default::default()
        }
    }
}

/// The attributes of an agent's span: method and path, its place in its TCP stream, and the
/// provenance of the parent link the agent made, if any.
fn attrs(path: &str, edge: &str, link: Option<(&str, &str)>) -> Vec<KeyValue> {
    let seq: i64 = edge.rsplit('#').next().unwrap().parse().unwrap();
    let mut v = vec![
        kv("http.request.method", s(path.split(' ').next().unwrap())),
        kv("url.path", s(path.split(' ').nth(1).unwrap())),
        kv("tracer.tcp.edge", s(edge)),
        kv("tracer.tcp.seq", Value::IntValue(seq)),
    ];
    if let Some((source, confidence)) = link {
        v.push(kv("tracer.link.source", s(source)));
        v.push(kv("tracer.link.confidence", s(confidence)));
    }
    v
}

const CLIENT: i32 = 3;
const SERVER: i32 = 2;
/// How far host-b's clock is behind the others, in ns.
const HOST_B_SKEW: u64 = 2_500_000;

/// web-client (host-a) -> gateway (host-b) -> orders (host-c) -> prices (host-d, behind NAT), as
/// four agents report it: each SERVER span in a trace of its own, joined to its CLIENT span only
/// by `tracer.tcp.edge` (the collector stitches them); the gateway took a traceparent that the
/// collector replaces; host-b's clock is behind; a call of orders is never answered by a traced
/// server, which makes the trace incomplete.
fn fixture(base: u64) -> ExportTraceServiceRequest {
    let e1 = "10.200.0.1:40312>10.200.0.2:8080#2718281828";
    let e2 = "10.200.0.2:51000>10.200.0.3:9000#5000";
    let groups: Vec<(&str, &str, u64, Vec<S>)> = vec![
        (
            "web-client",
            "host-a",
            base,
            vec![S {
                trace: TRACE[0],
                id: 1,
                parent: None,
                name: "GET /checkout",
                kind: CLIENT,
                offset_us: 0,
                dur_us: 20_000,
                attrs: attrs("GET /checkout", e1, None),
            }],
        ),
        (
            "gateway",
            "host-b",
            base - HOST_B_SKEW,
            vec![
                S {
                    trace: 0x3d,
                    id: 2,
                    parent: Some(9),
                    name: "GET /checkout",
                    kind: SERVER,
                    offset_us: 300,
                    dur_us: 19_000,
                    attrs: attrs("GET /checkout", e1, Some(("traceparent", "medium"))),
                },
                S {
                    trace: 0x3d,
                    id: 3,
                    parent: Some(2),
                    name: "POST /orders",
                    kind: CLIENT,
                    offset_us: 1_000,
                    dur_us: 16_000,
                    attrs: attrs("POST /orders", e2, Some(("thread", "high"))),
                },
            ],
        ),
        (
            "orders",
            "host-c",
            base,
            vec![
                S {
                    trace: 0x3e,
                    id: 4,
                    parent: None,
                    name: "POST /orders",
                    kind: SERVER,
                    offset_us: 1_500,
                    dur_us: 15_000,
                    attrs: attrs("POST /orders", e2, None),
                },
                S {
                    trace: 0x3e,
                    id: 5,
                    parent: Some(4),
                    name: "GET /stock",
                    kind: CLIENT,
                    offset_us: 2_000,
                    dur_us: 3_000,
                    attrs: attrs(
                        "GET /stock",
                        "10.200.0.3:41000>10.200.0.9:5432#123456789",
                        Some(("sole-request", "medium")),
                    ),
                },
                S {
                    trace: 0x3e,
                    id: 6,
                    parent: Some(4),
                    name: "GET /prices",
                    kind: CLIENT,
                    offset_us: 6_000,
                    dur_us: 8_000,
                    attrs: attrs(
                        "GET /prices",
                        "10.200.0.3:52000>10.0.0.100:80#777777",
                        Some(("shared-id", "medium")),
                    ),
                },
            ],
        ),
        (
            "prices",
            "host-d",
            base,
            vec![S {
                trace: 0x3f,
                id: 7,
                parent: None,
                name: "GET /prices",
                kind: SERVER,
                offset_us: 6_500,
                dur_us: 7_000,
                attrs: attrs(
                    "GET /prices",
                    "192.168.5.1:40000>10.200.0.4:7000#777777",
                    None,
                ),
            }],
        ),
    ];
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(service, host, clock, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s(service)), kv("host.name", s(host))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: spans.into_iter().map(|x| x.at(clock)).collect(),
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
    let c = start_collector("cli-trace");
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
    assert_eq!(api[0]["spans"].as_array().unwrap().len(), 7);

    let (ok, out, err) = tracer(&c, &["trace", &id]);
    assert!(ok, "tracer trace failed: {err}");
    eprintln!("{out}");
    assert!(out.starts_with(&format!("trace {id} ")), "{out}");
    assert!(out.contains("7 spans, 0 errors"), "{out}");

    // Each link as the collector reports it: made by the collector where it stitched two agents'
    // spans (one replacing the traceparent parent, one by the NAT fallback), by the agent inside
    // a process.
    for (svc, op, note) in [
        (
            "gateway",
            "GET /checkout",
            " @host-b [tcp-seq/high by collector, replaced traceparent:0909090909090909]",
        ),
        ("gateway", "POST /orders", " @host-b [thread/high by agent]"),
        (
            "orders",
            "POST /orders",
            " @host-c [tcp-seq/high by collector]",
        ),
        (
            "orders",
            "GET /stock",
            " @host-c [sole-request/medium by agent]",
        ),
        (
            "orders",
            "GET /prices",
            " @host-c [shared-id/medium by agent]",
        ),
        (
            "prices",
            "GET /prices",
            " @host-d [tcp-seq-nat/low by collector]",
        ),
    ] {
        let line = line_of(&out, svc, op);
        assert!(line.contains(note), "{svc} {op}: {note:?} not in {line:?}");
    }
    let root = line_of(&out, "web-client", "GET /checkout");
    assert!(
        root.ends_with("[client] @host-a"),
        "the root has no link: {root}"
    );
    // Clock shifts: the collector decides how much; the CLI shows each, with the raw start to the
    // microsecond, and sums them up in the header.
    let mut shifted_hosts = std::collections::BTreeSet::new();
    let mut shifted = 0;
    for sp in api[0]["spans"].as_array().unwrap() {
        let tag = |k: &str| {
            sp["tags"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["key"] == k)
                .map(|t| t["value"].as_i64().unwrap())
        };
        let Some(shift) = tag("tracer.clock.shift_us") else {
            continue;
        };
        shifted += 1;
        let process = &api[0]["processes"][sp["processID"].as_str().unwrap()];
        let service = process["serviceName"].as_str().unwrap();
        let host = process["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == "host.name")
            .unwrap()["value"]
            .as_str()
            .unwrap();
        shifted_hosts.insert(host.to_owned());
        let line = line_of(&out, service, sp["operationName"].as_str().unwrap());
        let sign = if shift < 0 { "-" } else { "+" };
        let raw = tag("tracer.clock.raw_start_us").unwrap();
        assert!(
            line.contains(&format!("[clock {sign}")),
            "no clock shift in {line}"
        );
        assert!(
            line.ends_with(&format!("{:06}]", raw % 1_000_000)),
            "raw start {raw} µs not in {line}"
        );
    }
    assert!(
        shifted_hosts.contains("host-b"),
        "host-b's clock is {HOST_B_SKEW} ns behind, yet none of its spans was shifted"
    );
    let hosts: Vec<String> = shifted_hosts.into_iter().collect();
    assert!(
        out.contains(&format!(
            "clock correction applied to {shifted} spans (host{} {})",
            if hosts.len() == 1 { "" } else { "s" },
            hosts.join(", ")
        )),
        "{out}"
    );
    // The tree: each span one level under its parent.
    let depth = |svc, op| indent(line_of(&out, svc, op));
    assert_eq!(depth("web-client", "GET /checkout"), 0);
    assert_eq!(depth("gateway", "GET /checkout"), 2);
    assert_eq!(depth("gateway", "POST /orders"), 4);
    assert_eq!(depth("orders", "POST /orders"), 6);
    assert_eq!(depth("orders", "GET /stock"), 8);
    assert_eq!(depth("orders", "GET /prices"), 8);
    assert_eq!(depth("prices", "GET /prices"), 10);

    // Incomplete: the call to the database was never answered by a traced server.
    assert_eq!(api[0]["incomplete"], true, "{}", api[0]);
    let reasons: Vec<&str> = api[0]["incompleteReasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("0505050505050505")),
        "{reasons:?}"
    );
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
    assert!(row.ends_with("  [incomplete]"), "{row}");

    // A malformed id is refused with the collector's message.
    let (ok, _, err) = tracer(&c, &["trace", "not-hex"]);
    assert!(!ok);
    assert!(err.contains("the collector answered 400"), "{err}");
}

/// A hostile trace: 50,000 spans each the child of the one before (the recursive walk
/// overflowed its stack; the indentation grew to 100,000 columns), names and services
/// carrying terminal escape sequences (title, clipboard, clear screen, a C1 CSI).
#[test]
fn hostile_traces_print_safely() {
    let c = start_collector("cli-hostile");
    const DEPTH: usize = 50_000;
    const TRACE_ID: [u8; 16] = [0x7e; 16];
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        - 60_000_000_000;
    let id = |i: usize| ((i + 1) as u64).to_be_bytes().to_vec();
    let mut spans: Vec<Span> = (0..DEPTH)
        .map(|i| Span {
            trace_id: TRACE_ID.to_vec(),
            span_id: id(i),
            parent_span_id: if i == 0 { Vec::new() } else { id(i - 1) },
            // One name: the store keeps at most 1,000 per service.
            name: "op".into(),
            kind: SERVER,
            start_time_unix_nano: base + i as u64 * 1000,
            end_time_unix_nano: base + (DEPTH as u64 * 1000) + 1000,
            ..Default::default()
        })
        .collect();
    spans[1].name = "evil\x1b]0;pwned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2J\u{9b}31m".into();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s("svc\x1b[31m"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let (status, body) = http(
        c.http_port,
        "POST",
        "/v1/traces",
        "application/x-protobuf",
        &request.encode_to_vec(),
    );
    assert_eq!(status, 200, "{body}");
    let started = std::time::Instant::now();
    let (ok, out, err) = tracer(&c, &["trace", &hex(&TRACE_ID)]);
    assert!(ok, "tracer trace failed on a deep trace:\n{err}");
    eprintln!(
        "tracer trace: {DEPTH} spans deep, {} lines, {} bytes in {:?}",
        out.lines().count(),
        out.len(),
        started.elapsed()
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(": op [")).count(),
        DEPTH - 1
    );
    assert!(
        out.lines().all(|l| l.chars().count() < 200),
        "indentation must stop growing"
    );
    assert!(out.contains("deeper than 32 levels"), "the cap is said");
    assert!(out.contains("[49999] "), "deep lines say their depth");
    // No control character reaches the terminal; the escapes are shown instead.
    assert!(
        !out.chars().any(|ch| ch.is_control() && ch != '\n'),
        "a control character was printed raw"
    );
    assert!(
        out.contains("evil\\x1b]0;pwned\\x07"),
        "{}",
        &out[..out.len().min(2000)]
    );
    assert!(out.contains("\\u{9b}31m"));
    assert!(out.contains("svc\\x1b[31m"));
    // The JSON form escapes them too (serde leaves C1 raw).
    let (ok, json, _) = tracer(&c, &["trace", &hex(&TRACE_ID), "--json"]);
    assert!(ok);
    assert!(!json.chars().any(|ch| ch.is_control() && ch != '\n'));
    let (ok, services, _) = tracer(&c, &["services"]);
    assert!(ok);
    assert!(services.contains("svc\\x1b[31m"), "{services}");
}
