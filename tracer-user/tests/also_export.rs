//! The agent exporting to more than one backend: the collector (here a test receiver) and, with
//! `--also-export`, a real OTLP relay not written here (rotel, from PyPI) that passes the spans
//! on to a second receiver, plus an endpoint that is down. Every span reaches both live ends;
//! the dead one holds nothing back and its losses are counted.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::*;
use tracer_test_support::topology::rotel;

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
    let agent = Agent::start(&[
        "--endpoint",
        &collector.endpoint(),
        "--also-export",
        &format!("http://127.0.0.1:{relay_port}"),
        "--also-export",
        &dead,
        "--port",
        &port.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
        "--batch-timeout-ms",
        "100",
        // Room for the live endpoints' spans (they deliver every 100 ms), not for all the dead
        // endpoint's: its 4 retried requests hold a few spans each, its queue 20 more, and the
        // test's 80 spans overflow it.
        "--queue-capacity",
        "20",
        "--batch-size",
        "10",
    ]);
    let requests = 40;
    for _ in 0..requests {
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
        // Paced: the live endpoints deliver every 100 ms and never hold 20 spans.
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let text = String::from_utf8_lossy(
        &Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{metrics}/metrics")])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
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
    drop(agent);
}
