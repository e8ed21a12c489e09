//! The RED metrics on the agent's /metrics: every request nginx answers, counted by service,
//! route and status in `http_server_request_duration_seconds` (and curl's side in the client
//! histogram), with the counts equal to the requests made, whether their spans are exported or
//! left out by `--sample`.
mod support;

use std::{process::Command, time::Duration};

use support::*;

fn value(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn every_request_is_counted_by_route_and_status() {
    require_root();
    let port = free_port();
    let _nginx = start_nginx(port, free_port());
    let receiver = OtlpReceiver::start(free_port());
    let metrics = free_port();
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ]);
    for (path, times) in [("/ok", 5), ("/notfound", 2)] {
        for _ in 0..times {
            Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    &format!("http://127.0.0.1:{port}{path}"),
                ])
                .status()
                .unwrap();
        }
    }
    let ok = r#"http_server_request_duration_seconds_count{service_name="nginx",http_request_method="GET",http_route="/ok",http_response_status_code="200"}"#;
    let missing = r#"http_server_request_duration_seconds_count{service_name="nginx",http_request_method="GET",http_route="/notfound",http_response_status_code="404"}"#;
    let client = r#"http_client_request_duration_seconds_count{service_name="curl",http_request_method="GET",http_route="/ok",http_response_status_code="200"}"#;
    let mut text = String::new();
    wait_for(
        "the requests in the histograms",
        Duration::from_secs(10),
        || {
            text = scrape(metrics);
            value(&text, ok) == Some(5) && value(&text, missing) == Some(2)
        },
    );
    assert_eq!(value(&text, client), Some(5), "{text}");
    // Cumulative buckets end at the count; the sum is the durations'.
    let inf = r#"http_server_request_duration_seconds_bucket{service_name="nginx",http_request_method="GET",http_route="/ok",http_response_status_code="200",le="+Inf"}"#;
    assert_eq!(value(&text, inf), Some(5), "{text}");
    assert!(text.contains("# TYPE http_server_request_duration_seconds histogram"));
    assert_eq!(value(&text, "tracer_red_series_overflow_total"), Some(0));
    // The Grafana dashboard asks only for metrics that exist (the agent's here; the
    // collector's are checked by the collector's tests, the `--also-export` endpoints' by
    // tests/also_export.rs).
    for name in dashboard_metrics()
        .iter()
        .filter(|m| !m.starts_with("tracer_collector_") && !m.starts_with("tracer_also_export_"))
    {
        assert!(
            text.lines().any(|l| l.starts_with(name.as_str())),
            "docs/grafana-dashboard.json uses {name}, which the agent does not serve"
        );
    }
    drop(agent);
}

/// With `--sample 0` no span leaves the agent, and the histograms still count every request.
#[test]
fn unsampled_requests_are_still_counted() {
    require_root();
    let port = free_port();
    let _nginx = start_nginx(port, free_port());
    let receiver = OtlpReceiver::start(free_port());
    let metrics = free_port();
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
        "--batch-timeout-ms",
        "100",
        "--sample",
        "0",
    ]);
    for _ in 0..4 {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                &format!("http://127.0.0.1:{port}/ok"),
            ])
            .status()
            .unwrap();
    }
    let ok = r#"http_server_request_duration_seconds_count{service_name="nginx",http_request_method="GET",http_route="/ok",http_response_status_code="200"}"#;
    let mut text = String::new();
    wait_for(
        "the requests in the histograms",
        Duration::from_secs(10),
        || {
            text = scrape(metrics);
            value(&text, ok) == Some(4)
        },
    );
    assert_eq!(
        value(&text, "tracer_spans_unsampled_total"),
        Some(8),
        "{text}"
    );
    // Past the batch timeout: anything sent would have arrived.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        receiver.spans().is_empty(),
        "an unsampled span was exported"
    );
    drop(agent);
}
