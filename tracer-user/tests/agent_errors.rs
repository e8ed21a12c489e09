//! The agent in bad situations: no privileges, and a collector that is down for a while.
mod support;

use std::{net::TcpStream, process::Command, time::Duration};

use support::*;

#[test]
fn agent_refuses_clearly_without_privileges() {
    require_root();
    // setpriv (util-linux) drops to nobody; changing uid clears the effective capabilities.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_tracer"))
        .args(["agent", "--metrics-addr", "off"])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent must exit non-zero without privileges:\n{stderr}"
    );
    assert!(
        stderr.contains("needs privileges to load eBPF programs"),
        "unclear message:\n{stderr}"
    );
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("root"),
        "the message says what to do:\n{stderr}"
    );
}

/// A namespace or trust setting that cannot work stops the agent with what to use instead.
#[test]
fn bad_namespace_and_trust_settings_are_explained() {
    require_root();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(["agent", "--metrics-addr", "off", "--stdout"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must be refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = run(&["--netns", "/run/netns/no-such-namespace-here"]);
    assert!(
        missing.contains("no such namespace file") && missing.contains("ip netns add"),
        "{missing}"
    );
    let not_a_namespace = run(&["--netns", "/etc/hostname"]);
    assert!(
        not_a_namespace.contains("not a network namespace file"),
        "{not_a_namespace}"
    );
    let mount_ns = run(&["--netns", "/proc/self/ns/mnt"]);
    assert!(
        mount_ns.contains("not a network namespace file"),
        "{mount_ns}"
    );
    let trust = run(&["--trust-context", "10.0.0.0/99"]);
    assert!(trust.contains("--trust-context"), "{trust}");
}

#[test]
fn bad_settings_are_reported_before_loading_anything() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["agent", "--endpoint", "collector:4318"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("must start with http:// or https://"),
        "{stderr}"
    );
}

fn metric(port: u16, name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-sS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// nginx, and an agent tracing it (server side only) that exports to a port where nothing
/// listens yet.
struct NginxAgent {
    nginx_port: u16,
    otlp_port: u16,
    metrics_port: u16,
    _nginx: Proc,
    agent: Agent,
}

fn nginx_and_agent(extra: &[&str]) -> NginxAgent {
    let (nginx_port, otlp_port, metrics_port) = (free_port(), free_port(), free_port());
    let nginx = start_nginx(nginx_port, free_port());
    let (endpoint, port) = (
        format!("http://127.0.0.1:{otlp_port}"),
        nginx_port.to_string(),
    );
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut args = vec!["--endpoint", &endpoint, "--port", &port, "--exe", "nginx"];
    args.extend_from_slice(&["--metrics-addr", &metrics]);
    args.extend_from_slice(extra);
    NginxAgent {
        nginx_port,
        otlp_port,
        metrics_port,
        _nginx: nginx,
        agent: Agent::start(&args),
    }
}

/// Spans made while the collector is down are kept and delivered once it is up.
#[test]
fn export_survives_a_collector_that_is_down_for_a_while() {
    require_root();
    let NginxAgent {
        nginx_port,
        otlp_port,
        metrics_port,
        _nginx,
        agent,
    } = nginx_and_agent(&["--batch-timeout-ms", "50"]);
    let mut conn = TcpStream::connect(addr(nginx_port)).unwrap();
    let req = "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..10 {
        assert_eq!(request(&mut conn, req).status, 200);
    }
    wait_for("export attempts to fail", Duration::from_secs(10), || {
        agent
            .stderr
            .lock()
            .unwrap()
            .contains("cannot reach the collector")
    });
    assert_eq!(metric(metrics_port, "tracer_spans_exported_total"), 0);
    // The collector comes up: the buffered spans arrive, none lost.
    let receiver = OtlpReceiver::start(otlp_port);
    wait_for("buffered spans delivered", Duration::from_secs(20), || {
        receiver.spans().len() >= 10
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.spans().len(), 10);
    assert!(receiver
        .spans()
        .iter()
        .all(|s| s.service() == "nginx" && s.span.name == "GET /ok"));
    assert_eq!(metric(metrics_port, "tracer_spans_exported_total"), 10);
    assert_eq!(
        metric(metrics_port, "tracer_export_dropped_queue_full_total"),
        0
    );
    agent.stop();
}

/// A collector that never comes up does not keep the agent from stopping: what it holds is
/// given up after the shutdown timeout, and counted.
#[test]
fn shutdown_with_the_collector_down_is_bounded_and_counted() {
    require_root();
    let NginxAgent {
        nginx_port,
        _nginx,
        mut agent,
        ..
    } = nginx_and_agent(&["--batch-timeout-ms", "50"]);
    let mut conn = TcpStream::connect(addr(nginx_port)).unwrap();
    for _ in 0..10 {
        assert_eq!(
            request(&mut conn, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").status,
            200
        );
    }
    wait_for("export attempts to fail", Duration::from_secs(10), || {
        agent
            .stderr
            .lock()
            .unwrap()
            .contains("cannot reach the collector")
    });
    // Let the retries back off to their longest wait before asking the agent to stop.
    std::thread::sleep(Duration::from_secs(4));
    let stopped = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.proc.0.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = agent.proc.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "the agent is still running 15 s after SIGTERM with the collector down"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    std::thread::sleep(Duration::from_millis(200));
    let log = agent.stderr.lock().unwrap().clone();
    assert!(
        log.contains("collector unreachable at shutdown: 10 spans dropped"),
        "the loss is reported:\n{log}"
    );
    assert!(log.contains("shutdown=10"), "and counted:\n{log}");
}

/// Past the queue bound, spans are dropped, and every one is counted.
#[test]
fn spans_beyond_the_export_queue_are_counted_as_dropped() {
    require_root();
    let NginxAgent {
        nginx_port,
        otlp_port,
        metrics_port,
        _nginx,
        agent,
    } = nginx_and_agent(&[
        "--batch-size",
        "5",
        "--batch-timeout-ms",
        "50",
        "--queue-capacity",
        "5",
        // Compressed bodies take their own path in the exporter (one buffer, not chunks).
        "--compression",
        "gzip",
    ]);
    let mut conn = TcpStream::connect(addr(nginx_port)).unwrap();
    let req = "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..40 {
        assert_eq!(request(&mut conn, req).status, 200);
    }
    wait_for("all 40 spans built", Duration::from_secs(10), || {
        metric(metrics_port, "tracer_spans_total") == 40
    });
    // Server spans whose client is filtered out wait briefly for it before they are exported.
    wait_for(
        "with a queue of 5 and the collector down, spans must be dropped",
        Duration::from_secs(10),
        || metric(metrics_port, "tracer_export_dropped_queue_full_total") > 0,
    );
    // Let the last held spans reach the queue, then read the final count.
    std::thread::sleep(Duration::from_millis(600));
    let dropped = metric(metrics_port, "tracer_export_dropped_queue_full_total");
    let receiver = OtlpReceiver::start(otlp_port);
    let nginx_spans = || {
        receiver
            .spans()
            .iter()
            .filter(|s| s.service() == "nginx")
            .count()
    };
    wait_for(
        "what was kept is delivered",
        Duration::from_secs(20),
        || nginx_spans() as u64 + dropped == 40,
    );
    // The agent reports the loss itself, as tracer.loss spans of its own: they waited for room
    // in the queue instead of being dropped in turn.
    let lost_in_loss_spans = || -> i64 {
        receiver
            .spans()
            .iter()
            .filter(|s| s.service() == "tracer-agent" && s.span.name == "tracer.loss")
            .filter_map(|s| s.int_attr("tracer.loss.spans"))
            .sum()
    };
    wait_for(
        "the loss reported as spans",
        Duration::from_secs(10),
        || lost_in_loss_spans() as u64 == dropped,
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        nginx_spans() as u64,
        40 - dropped,
        "delivered + dropped = produced"
    );
    assert_eq!(
        lost_in_loss_spans() as u64,
        dropped,
        "each loss reported once"
    );
    assert_eq!(
        metric(metrics_port, "tracer_export_dropped_queue_full_total"),
        dropped,
        "the loss spans themselves were never dropped"
    );
    let log = agent.stop();
    assert!(
        log.contains("export queue full"),
        "drops are logged:\n{log}"
    );
}

/// `--protocol http/json` sends OTLP/JSON: camelCase fields, hex ids, integer enums.
#[test]
fn json_protocol_follows_the_otlp_json_encoding() {
    require_root();
    let (nginx_port, otlp_port) = (free_port(), free_port());
    let _nginx = start_nginx(nginx_port, free_port());
    let receiver = OtlpReceiver::start(otlp_port);
    let nginx_s = nginx_port.to_string();
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--protocol",
        "http/json",
        "--compression",
        "none",
        "--port",
        &nginx_s,
        "--exe",
        "nginx",
        "--batch-timeout-ms",
        "50",
        "--metrics-addr",
        "off",
    ]);
    let mut conn = TcpStream::connect(addr(nginx_port)).unwrap();
    assert_eq!(
        request(&mut conn, "GET /notfound HTTP/1.1\r\nHost: x\r\n\r\n").status,
        404
    );
    wait_for("the span", Duration::from_secs(10), || {
        !receiver.raw_json().is_empty()
    });
    agent.stop();
    let body: serde_json::Value = serde_json::from_slice(&receiver.raw_json()[0]).unwrap();
    let span = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    let trace_id = span["traceId"].as_str().expect("traceId is a string");
    assert_eq!(trace_id.len(), 32, "hex trace id: {trace_id}");
    assert!(trace_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(span["kind"], 2, "SpanKind as an integer");
    assert_eq!(span["name"], "GET /notfound");
    let attrs = span["attributes"].as_array().unwrap();
    let status = attrs
        .iter()
        .find(|a| a["key"] == "http.response.status_code")
        .unwrap();
    let v = &status["value"]["intValue"];
    assert!(v == 404 || v == "404", "intValue {v}");
}
