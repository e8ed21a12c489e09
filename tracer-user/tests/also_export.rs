//! The agent exporting to more than one backend: the collector (here a test receiver) and, with
//! `--also-export`, a real OTLP relay not written here (rotel, from PyPI) that passes the spans
//! on to a second receiver, plus an endpoint that is down. Every span reaches both live ends;
//! the dead one holds nothing back and its losses are counted. Then the other way round: our
//! own collector behind `--also-export` gets every span while the primary endpoint is down,
//! and every span the primary could not take is counted.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::*;
use tracer_test_support::topology::{http_get, rotel, Daemon};

/// Queues with room for a live endpoint's spans (it delivers every 100 ms), not for all of a
/// dead one's: its 4 retried requests hold 10 spans each, its queue 20 more, and a test's 80
/// spans overflow it.
const QUEUES: [&str; 6] = [
    "--batch-timeout-ms",
    "100",
    "--queue-capacity",
    "20",
    "--batch-size",
    "10",
];

/// `n` requests to nginx, paced so that a live endpoint never holds 20 spans.
fn paced_requests(port: u16, n: usize) {
    for _ in 0..n {
        let ok = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                &format!("http://127.0.0.1:{port}/ok"),
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent with `args` and `QUEUES`.
fn start_agent(args: &[&str]) -> Agent {
    let mut all = args.to_vec();
    all.extend(QUEUES);
    Agent::start(&all)
}

#[test]
fn every_span_reaches_every_endpoint_and_a_dead_one_costs_the_others_nothing() {
    require_root();
    let port = free_port();
    let _nginx = start_nginx(port, free_port());
    let collector = OtlpReceiver::start(free_port());
    let far = OtlpReceiver::start(free_port());
    let relay_port = free_port();
    let _relay = Proc(
        Command::new(rotel())
            .args(["start", "--otlp-http-endpoint"])
            .arg(format!("127.0.0.1:{relay_port}"))
            .arg("--otlp-grpc-endpoint")
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--exporter", "otlp", "--otlp-exporter-protocol", "http"])
            .arg("--otlp-exporter-endpoint")
            .arg(far.endpoint())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rotel"),
    );
    wait_for("rotel listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", relay_port)).is_ok()
    });
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let metrics = free_port();
    let agent = start_agent(&[
        "--endpoint",
        &collector.endpoint(),
        "--also-export",
        &format!("http://127.0.0.1:{relay_port}"),
        "--also-export",
        &dead,
        "--port",
        &port.to_string(),
        // The relay's side of the agent's exports must not be traced (each would become a span,
        // exported in turn): the exact counts below would catch any.
        "--port",
        &relay_port.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ]);
    let requests = 40;
    paced_requests(port, requests);
    let want = 2 * requests;
    wait_for("every span at both ends", Duration::from_secs(20), || {
        collector.spans().len() >= want && far.spans().len() >= want
    });
    let ids = |r: &OtlpReceiver| {
        let mut v: Vec<Vec<u8>> = r.spans().iter().map(|s| s.span.span_id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&collector).len(), want, "the collector's spans");
    assert_eq!(ids(&collector), ids(&far), "the same spans at the far end");
    let text = scrape(metrics);
    let relay_series = format!(
        "tracer_also_export_spans_total{{endpoint=\"http://127.0.0.1:{relay_port}/v1/traces\"}} {want}"
    );
    assert!(text.contains(&relay_series), "{relay_series} in\n{text}");
    assert!(
        text.contains(&format!("tracer_spans_exported_total {want}")),
        "{text}"
    );
    assert!(
        text.contains("tracer_export_dropped_queue_full_total 0"),
        "{text}"
    );
    // The dead endpoint delivered nothing, and what its queue could not hold is counted.
    let series = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let endpoint = format!("endpoint=\"{dead}/v1/traces\"");
    assert_eq!(
        series(&format!("tracer_also_export_spans_total{{{endpoint}}}")),
        0
    );
    assert!(
        series(&format!(
            "tracer_also_export_dropped_total{{{endpoint},cause=\"queue_full\"}}"
        )) > 0,
        "{text}"
    );
    assert!(
        series(&format!(
            "tracer_also_export_failed_attempts_total{{{endpoint}}}"
        )) > 0,
        "its failed requests, retried, are counted: {text}"
    );
    // The Grafana dashboard's `--also-export` panels ask for series that exist.
    let dashboard = dashboard_metrics();
    let also: Vec<_> = dashboard
        .iter()
        .filter(|m| m.starts_with("tracer_also_export_"))
        .collect();
    assert_eq!(also.len(), 3, "{dashboard:?}");
    for name in also {
        assert!(
            text.lines().any(|l| l.starts_with(name.as_str())),
            "docs/grafana-dashboard.json uses {name}, which the agent does not serve"
        );
    }
    drop(agent);
}

/// Spans of `service` the collector's query API holds (every trace of the last hour).
fn stored_spans(query_port: u16, service: &str) -> usize {
    let path = format!("/api/traces?service={service}&lookback=1h&limit=1500");
    let Ok((200, body)) = http_get(query_port, &path) else {
        return 0;
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["spans"].as_array().unwrap())
        .filter(|s| {
            let pid = s["processID"].as_str().unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["processes"][pid]["serviceName"] == service)
        })
        .count()
}

/// `name=N` in the agent's exit summary.
fn summary_count(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("counters:"))
        .unwrap_or_else(|| panic!("no exit summary in\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.trim_start_matches('(').strip_prefix(&format!("{name}=")))
        .and_then(|v| v.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

#[test]
fn the_collector_behind_also_export_gets_every_span_while_the_primary_is_down() {
    require_root();
    let port = free_port();
    let _nginx = start_nginx(port, free_port());
    let (http, query) = (free_port(), free_port());
    let mut cmd = Command::new(collector_bin());
    cmd.arg("--data-dir")
        .arg(temp_dir("also-export-collector"))
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--query-addr", &format!("127.0.0.1:{query}")]);
    let collector = Daemon::start(cmd, "collector", "tracer-collector: ready", true);
    let metrics = free_port();
    let started = std::time::Instant::now();
    let agent = start_agent(&[
        // Nothing listens there.
        "--endpoint",
        &format!("http://127.0.0.1:{}", free_port()),
        "--also-export",
        &format!("http://127.0.0.1:{http}"),
        "--port",
        &port.to_string(),
        // The collector's side of the exports is left out too (see the first test).
        "--port",
        &http.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ]);
    let requests = 40;
    paced_requests(port, requests);
    wait_for(
        "every span in the collector",
        Duration::from_secs(20),
        || stored_spans(query, "nginx") >= requests && stored_spans(query, "curl") >= requests,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stored_spans(query, "nginx"), requests, "nginx's spans");
    assert_eq!(stored_spans(query, "curl"), requests, "curl's spans");
    let text = scrape(metrics);
    let value = |series: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value("tracer_spans_exported_total"), 0, "{text}");
    assert!(
        value("tracer_export_dropped_queue_full_total") > 0,
        "the down endpoint's queue overflowed: {text}"
    );
    assert!(text.contains(&format!(
        "tracer_also_export_dropped_total{{endpoint=\"http://127.0.0.1:{http}/v1/traces\",cause=\"queue_full\"}} 0"
    )), "{text}");
    // Stopped by hand: with an endpoint down, the agent takes up to its shutdown timeout (5 s)
    // to give up on it, longer than `Proc`'s drop waits.
    let mut agent = agent;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.proc.0.id() as i32, libc::SIGTERM) };
    wait_for("the agent to stop", Duration::from_secs(15), || {
        agent.proc.0.try_wait().unwrap().is_some()
    });
    std::thread::sleep(Duration::from_millis(200));
    let log = agent.stderr.lock().unwrap().clone();
    // The agent's own tracer.loss spans report each endpoint's losses to that endpoint (and
    // the kernel's to all): the collector lost nothing, so it was sent none.
    assert_eq!(
        stored_spans(query, "tracer-agent"),
        0,
        "loss spans at the collector"
    );
    // Every span the down endpoint was given (the traffic's, and its own loss reports, at most
    // one a second) is counted as dropped, for a full queue or at shutdown.
    assert_eq!(summary_count(&log, "spans_sent"), 0);
    let dropped = summary_count(&log, "queue_full") + summary_count(&log, "shutdown");
    let reports = started.elapsed().as_secs() + 1;
    let traffic = 2 * requests as u64;
    assert!(
        (traffic..=traffic + reports).contains(&dropped),
        "{dropped} dropped, {traffic} spans of traffic and at most {reports} loss reports: {log}"
    );
    drop(collector);
}
