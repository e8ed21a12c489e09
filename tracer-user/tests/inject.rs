//! `--inject-context`, for real: the probes (sock_ops + sk_msg) insert a `traceparent` line
//! into the first HTTP/1 request of each new outgoing connection. What they must never do is
//! change anything else, so a server that keeps every byte it receives (`wire_sink.py`) is sent
//! chosen bytes, send() call by send() call (`wire_client.py`): keep-alive requests with
//! bodies, a 3 MB body, a head and a body in separate sends whose body looks like requests, a
//! chunked upload, pipelined requests, a request already carrying a `traceparent`, and a
//! connection opened before the agent started. With the inserted lines taken out, what arrived
//! must be byte for byte what was sent, with one line after the first request line where that
//! request had none. curl through nginx (whose upstream connections pass through the sockmap)
//! must get a 20 MB response intact and in time: with its upstream socket kept in the map,
//! nginx stalled (`FIONREAD`). And a service instrumented with the OpenTelemetry SDK, called by
//! a service with no tracing code, must land in the caller's trace, its span the child of the
//! agent's client span.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use support::*;
use tracer_test_support::topology::{peers_dir, python};

/// One test at a time: each agent injects into every namespace's new connections, so one
/// test's agent would change the connections another opens before its own agent starts.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `traceparent: 00-<32 hex>-<16 hex>-01\r\n`, as the probes write it.
const LINE_LEN: usize = 70;

fn is_injected_line(b: &[u8]) -> bool {
    b.len() >= LINE_LEN
        && b.starts_with(b"traceparent: 00-")
        && b[16..48].iter().all(|c| c.is_ascii_hexdigit())
        && b[48] == b'-'
        && b[49..65].iter().all(|c| c.is_ascii_hexdigit())
        && &b[65..70] == b"-01\r\n"
}

/// `received` without the lines the probes inserted, and those lines' (trace id, span id).
/// A line counts as inserted only right after a request line's end (where the probes put it);
/// one anywhere else is left in, so the comparison with what was sent fails on it. (The test's
/// bodies never contain "traceparent".)
fn strip_injected(received: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
    const AFTER: &[u8] = b" HTTP/1.1\r\n";
    let mut out = Vec::with_capacity(received.len());
    let mut ids = Vec::new();
    let mut i = 0;
    while i < received.len() {
        let next = received[i..]
            .windows(AFTER.len())
            .position(|w| w == AFTER)
            .map(|p| i + p + AFTER.len());
        let Some(at) = next else {
            out.extend_from_slice(&received[i..]);
            break;
        };
        out.extend_from_slice(&received[i..at]);
        if is_injected_line(&received[at..]) {
            let l = &received[at..at + LINE_LEN];
            ids.push((
                String::from_utf8_lossy(&l[16..48]).into_owned(),
                String::from_utf8_lossy(&l[49..65]).into_owned(),
            ));
            i = at + LINE_LEN;
        } else {
            i = at;
        }
    }
    (out, ids)
}

fn start_sink(port: u16, dir: &Path) -> Proc {
    let child = Command::new("python3")
        .arg(peers_dir().join("wire_sink.py"))
        .arg(port.to_string())
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let p = Proc(child);
    wait_for("the sink to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

/// The sink's file for the connection whose first request line is `first_line`.
fn received_for(dir: &Path, first_line: &str) -> Vec<u8> {
    let mut found = None;
    wait_for(
        &format!("the sink to store {first_line}"),
        Duration::from_secs(10),
        || {
            found = std::fs::read_dir(dir).unwrap().find_map(|e| {
                let bytes = std::fs::read(e.unwrap().path()).ok()?;
                bytes.starts_with(first_line.as_bytes()).then_some(bytes)
            });
            found.is_some()
        },
    );
    found.unwrap()
}

fn run_client(port: u16, scenario: &str, out: &Path) {
    let status = Command::new("python3")
        .arg(peers_dir().join("wire_client.py"))
        .args([&port.to_string(), scenario])
        .arg(out)
        .status()
        .expect("python3");
    assert!(status.success(), "wire_client.py {scenario} failed");
}

#[test]
fn only_request_heads_change_and_only_by_one_line() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = temp_dir("inject-wire");
    let sink_dir = dir.join("sink");
    std::fs::create_dir_all(&sink_dir).unwrap();
    let port = free_port();
    let _sink = start_sink(port, &sink_dir);

    // A connection made before the agent starts: never in the sockmap, never changed.
    let mut early = Command::new("python3")
        .arg(peers_dir().join("wire_client.py"))
        .args([&port.to_string(), "preexisting"])
        .arg(dir.join("preexisting.sent"))
        .arg("--wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(early.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");

    let receiver = OtlpReceiver::start(free_port());
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--inject-context",
        "--metrics-addr",
        "off",
        "--batch-timeout-ms",
        "100",
    ]);
    early.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(early.wait().unwrap().success(), "the early client failed");

    // (scenario, its first request line, requests injected): only a connection's first
    // request, never a body (some look like requests), never a second request.
    let scenarios = [
        ("keepalive", "GET /k1 ", 1),
        ("bigpost", "POST /big ", 1),
        ("split", "PUT /split ", 1),
        ("chunked", "POST /chunked ", 1),
        ("pipelined", "GET /p1 ", 1),
        ("has-context", "GET /ctx ", 0),
    ];
    for (scenario, _, _) in &scenarios {
        run_client(port, scenario, &dir.join(format!("{scenario}.sent")));
    }

    let mut all_ids = Vec::new();
    for (scenario, first_line, want) in
        scenarios
            .iter()
            .copied()
            .chain([("preexisting", "GET /old1 ", 0)])
    {
        let sent = std::fs::read(dir.join(format!("{scenario}.sent"))).unwrap();
        let received = received_for(&sink_dir, first_line);
        let (stripped, ids) = strip_injected(&received);
        assert!(
            stripped == sent,
            "{scenario}: what arrived, without the inserted lines, differs from what was sent \
             ({} bytes sent, {} arrived, {} after stripping {} lines); first difference at {:?}",
            sent.len(),
            received.len(),
            stripped.len(),
            ids.len(),
            sent.iter().zip(&stripped).position(|(a, b)| a != b)
        );
        assert_eq!(ids.len(), want, "{scenario}: lines inserted");
        all_ids.extend(ids);
    }

    // Each inserted header names the agent's client span of that request.
    let mut spans = Vec::new();
    wait_for(
        "the client spans of the injected requests",
        Duration::from_secs(20),
        || {
            spans = receiver.spans();
            all_ids
                .iter()
                .all(|(_, span)| spans.iter().any(|s| hex(&s.span.span_id) == *span))
        },
    );
    for (trace, span) in &all_ids {
        let s = spans
            .iter()
            .find(|s| hex(&s.span.span_id) == *span)
            .unwrap();
        assert_eq!(s.span.kind, 3, "{span}: a CLIENT span");
        assert_eq!(
            s.str_attr("tracer.context.injected").as_deref(),
            Some("traceparent")
        );
        assert_eq!(hex(&s.span.trace_id), *trace, "{span}: its trace");
    }
    let log = agent.stop();
    assert!(!log.contains("ERROR"), "agent log:\n{log}");
}

fn start_python(label: &str, python: &Path, script: &str, args: &[&str]) -> Proc {
    let child = Command::new(python)
        .arg(peers_dir().join(script))
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let port: u16 = args[0].parse().unwrap();
    let p = Proc(child);
    wait_for(label, Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

#[test]
fn an_sdk_instrumented_service_joins_the_callers_trace() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let receiver = OtlpReceiver::start(free_port());
    let (sdk_port, caller_port) = (free_port(), free_port());
    let venv: PathBuf = python();
    let _sdk = start_python(
        "the SDK service",
        &venv,
        "sdk_server.py",
        &[&sdk_port.to_string(), &receiver.endpoint()],
    );
    let _caller = start_python(
        "the plain caller",
        Path::new("python3"),
        "plain_caller.py",
        &[
            &caller_port.to_string(),
            &format!("http://127.0.0.1:{sdk_port}"),
        ],
    );
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--inject-context",
        "--metrics-addr",
        "off",
        "--port",
        &caller_port.to_string(),
        "--port",
        &sdk_port.to_string(),
        "--batch-timeout-ms",
        "100",
    ]);
    for i in 0..3 {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{caller_port}/item/{i}")])
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "from sdk\n");
    }

    // Per request: the caller's SERVER span (agent), its CLIENT span to the SDK service
    // (agent), and the SDK's own SERVER span. Waited for as a chain: curl's own calls are
    // injected too, so a count of injected spans can be reached before the caller's arrive.
    let mut spans = Vec::new();
    let has = |spans: &[Received], id: &[u8]| spans.iter().any(|s| s.span.span_id == id);
    let chained = |spans: &[Received]| {
        let sdk: Vec<&Received> = spans
            .iter()
            .filter(|s| s.span.name == "sdk-handler")
            .collect();
        sdk.len() >= 3
            && sdk.iter().all(|s| {
                spans.iter().any(|c| {
                    c.span.span_id == s.span.parent_span_id && has(spans, &c.span.parent_span_id)
                })
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        spans = receiver.spans();
        if chained(&spans) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = agent.stop();
    for sdk in spans.iter().filter(|s| s.span.name == "sdk-handler") {
        let call = spans
            .iter()
            .find(|s| s.span.span_id == sdk.span.parent_span_id)
            .unwrap_or_else(|| {
                panic!(
                    "the SDK span's parent {} is no span of the agent's",
                    hex(&sdk.span.parent_span_id)
                )
            });
        assert_eq!(call.span.kind, 3, "the parent is the agent's CLIENT span");
        assert_eq!(call.span.trace_id, sdk.span.trace_id, "one trace");
        let served = spans
            .iter()
            .find(|s| s.span.span_id == call.span.parent_span_id)
            .expect("the call's parent: the caller's SERVER span");
        assert_eq!(served.span.kind, 2);
        assert_eq!(served.span.trace_id, sdk.span.trace_id, "one trace");
    }
    assert!(!log.contains("ERROR"), "agent log:\n{log}");
}

#[test]
fn large_responses_pass_a_proxy_in_the_sockmap_intact() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let dir = temp_dir("inject-nginx");
    // nginx passes the path on: /slow/big.bin upstream.
    std::fs::create_dir_all(dir.join("slow")).unwrap();
    let file = dir.join("slow/big.bin");
    let data: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let upstream_port = free_port();
    let _upstream = Proc(
        Command::new("python3")
            .args(["-m", "http.server", &upstream_port.to_string(), "--bind"])
            .arg("127.0.0.1")
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    wait_for("the upstream", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", upstream_port)).is_ok()
    });
    let agent = Agent::start(&["--stdout", "--inject-context", "--metrics-addr", "off"]);
    // nginx starts after the agent: its upstream connections are new, so in the sockmap.
    let port = free_port();
    let _nginx = start_nginx(port, upstream_port);
    for _ in 0..3 {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "20"])
            .arg(format!("http://127.0.0.1:{port}/slow/big.bin"))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl through nginx failed ({}, {} bytes arrived)",
            out.status,
            out.stdout.len()
        );
        assert!(
            out.stdout == data,
            "the 20 MB response arrived changed ({} bytes)",
            out.stdout.len()
        );
    }
    let log = agent.stop();
    assert!(!log.contains("ERROR"), "agent log:\n{log}");
}
