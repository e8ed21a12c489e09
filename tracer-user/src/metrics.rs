//! A Prometheus text endpoint with the agent's counters (`GET /metrics`).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;

use crate::stats::Stats;

pub fn render(stats: &Stats) -> String {
    use tracer_common::counter as c;
    let k = *stats.kernel.lock().unwrap_or_else(|e| e.into_inner());
    let a = &stats.agent;
    let e = &stats.export;
    let rows: [(&str, &str, u64); 36] = [
        (
            "tracer_kernel_data_syscalls_total",
            "Data syscalls on tracked TCP connections",
            k.get(c::DATA_SYSCALLS),
        ),
        (
            "tracer_kernel_records_total",
            "Records the probes wrote to the ring buffer",
            k.get(c::RECORDS_SENT),
        ),
        (
            "tracer_ringbuf_dropped_total",
            "Records lost because the ring buffer was full",
            k.get(c::RINGBUF_FULL),
        ),
        (
            "tracer_entry_time_missed_total",
            "Writes whose entry time was not seen (thread changed CPU mid-call); their exit time was used",
            k.get(c::ENTRY_TIME_MISSED),
        ),
        (
            "tracer_conn_table_dropped_total",
            "Connections not traced because the connection table was full",
            k.get(c::CONN_TABLE_FULL),
        ),
        (
            "tracer_payload_read_failed_total",
            "Records sent without payload (user memory not readable)",
            k.get(c::PAYLOAD_READ_FAILED),
        ),
        (
            "tracer_red_kernel_exchanges_total",
            "HTTP/1 exchanges counted in the kernel: with --metrics-only no record sent, with --sample-in-kernel records for the kept ones only",
            k.get(c::RED_COUNTED),
        ),
        (
            "tracer_red_kernel_gave_up_total",
            "Connections counted in the kernel whose next message was not the expected HTTP/1: recorded for the agent from there (--metrics-only, --sample-in-kernel)",
            k.get(c::RED_GAVE_UP),
        ),
        (
            "tracer_kernel_sample_calls_by_thread_total",
            "Calls made while their process served kept and dropped requests, decided by the one request their thread serves (--sample-in-kernel)",
            k.get(c::CALLS_BY_THREAD),
        ),
        (
            "tracer_kernel_sample_calls_by_line_total",
            "Calls made while their process served kept and dropped requests, decided by the one request in flight with their method and path (--sample-in-kernel)",
            k.get(c::CALLS_BY_LINE),
        ),
        (
            "tracer_kernel_sample_calls_marked_total",
            "Calls made while their process served kept and dropped requests that neither rule decided: recorded, linked only by a forwarded header (--sample-in-kernel)",
            k.get(c::CALLS_MARKED),
        ),
        (
            "tracer_kernel_sample_decisions_sent_total",
            "Calls' decisions written into a TCP option for their server end on another host (--sample-in-kernel)",
            k.get(c::DECISIONS_SENT),
        ),
        (
            "tracer_kernel_sample_decisions_received_total",
            "Decisions read from the TCP option of a request from another host, taken by its server end here (--sample-in-kernel)",
            k.get(c::DECISIONS_RECEIVED),
        ),
        (
            "tracer_tls_records_total",
            "TLS plaintext records from the uprobes on libssl",
            k.get(c::TLS_RECORDS),
        ),
        (
            "tracer_tls_socket_unknown_total",
            "TLS plaintext dropped: the library's socket was never seen (its first call ran on another CPU than its syscall, or began before the agent)",
            k.get(c::TLS_SOCKET_UNKNOWN),
        ),
        (
            "tracer_context_injected_total",
            "traceparent headers inserted into outgoing HTTP/1 requests (--inject-context)",
            k.get(c::CONTEXT_INJECTED),
        ),
        (
            "tracer_context_header_present_total",
            "Outgoing requests that already carried a traceparent: left unchanged (--inject-context)",
            k.get(c::INJECT_HEADER_PRESENT),
        ),
        (
            "tracer_context_not_http_total",
            "New outgoing connections whose first message is not a whole HTTP/1 request head (another protocol, a head over 1 KiB): left unchanged (--inject-context)",
            k.get(c::INJECT_NOT_HTTP),
        ),
        (
            "tracer_context_inject_failed_total",
            "Requests the kernel would not grow to insert the header: sent unchanged (--inject-context)",
            k.get(c::INJECT_FAILED),
        ),
        (
            "tracer_context_trace_mismatch_total",
            "Injected calls whose span the agent put in another trace than the header's (tracer.context.sent_trace_id says which)",
            a.injected_mismatch.load(Relaxed),
        ),
        (
            "tracer_records_received_total",
            "Records the agent drained",
            a.records.load(Relaxed),
        ),
        (
            "tracer_records_undecodable_total",
            "Records dropped: unknown kind or short (probes and agent from different builds)",
            a.undecodable_records.load(Relaxed),
        ),
        (
            "tracer_records_unknown_connection_total",
            "Records dropped: their connection's first record was lost and it was closed since",
            a.unknown_connection_records.load(Relaxed),
        ),
        (
            "tracer_exchanges_total",
            "Request/response pairs found",
            a.exchanges.load(Relaxed),
        ),
        ("tracer_spans_total", "Spans built", a.spans.load(Relaxed)),
        (
            "tracer_spans_unsampled_total",
            "Spans built and counted in the RED metrics but not exported: their trace was not sampled (--sample)",
            a.spans_unsampled.load(Relaxed),
        ),
        (
            "tracer_spans_exported_total",
            "Spans the collector acknowledged",
            e.spans_sent.load(Relaxed),
        ),
        (
            "tracer_export_dropped_queue_full_total",
            "Spans dropped: export queue full",
            e.dropped_queue_full.load(Relaxed),
        ),
        (
            "tracer_export_dropped_rejected_total",
            "Spans dropped: rejected by the collector",
            e.dropped_rejected.load(Relaxed),
        ),
        (
            "tracer_export_dropped_shutdown_total",
            "Spans dropped: undeliverable at shutdown",
            e.dropped_shutdown.load(Relaxed),
        ),
        (
            "tracer_export_failed_attempts_total",
            "Export requests that failed and were retried (collector unreachable, 408, 429, 5xx)",
            e.failed_attempts.load(Relaxed),
        ),
        (
            "tracer_parse_failures_total",
            "Messages that could not be parsed",
            a.parse_failures.load(Relaxed),
        ),
        (
            "tracer_http_heads_reused_total",
            "HTTP heads taken from the parse of the connection's other end on this host instead of parsed again",
            a.heads_reused.load(Relaxed),
        ),
        (
            "tracer_connections_muted_total",
            "Connections no enabled protocol recognised, or that switched to one the agent does not read (TLS, WebSocket): no longer traced",
            a.connections_muted.load(Relaxed),
        ),
        (
            "tracer_agent_priority_boosts_total",
            "Switches from idle-only to normal priority to keep up (--priority adaptive)",
            a.priority_boosts.load(Relaxed),
        ),
        (
            "tracer_calls_unattributed_total",
            "Calls a process made while serving several requests, none singled out as their parent (left without one)",
            a.calls_unattributed.load(Relaxed),
        ),
    ];
    let gauges: [(&str, &str, u64); 2] = [
        (
            "tracer_connections",
            "Connections the agent is following",
            a.connections.load(Relaxed),
        ),
        (
            "tracer_processes",
            "Processes whose facts are cached",
            a.processes.load(Relaxed),
        ),
    ];
    let mut out = String::new();
    for (kind, list) in [("counter", &rows[..]), ("gauge", &gauges[..])] {
        for (name, help, value) in list {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
    }
    out.push_str(
        "# HELP tracer_links_total Parent links the agent made, by how (tracer.link.source)\n\
         # TYPE tracer_links_total counter\n",
    );
    for source in crate::link::Source::ALL {
        out.push_str(&format!(
            "tracer_links_total{{source=\"{}\"}} {}\n",
            source.name(),
            a.links[source.index()].load(Relaxed)
        ));
    }
    render_also_exports(stats, &mut out);
    stats.red.render(&mut out);
    out
}

/// The `--also-export` endpoints' counters, labelled by endpoint (the unlabelled export
/// counters are the collector's).
fn render_also_exports(stats: &Stats, out: &mut String) {
    if stats.also_exports.is_empty() {
        return;
    }
    out.push_str(
        "# HELP tracer_also_export_spans_total Spans an --also-export endpoint acknowledged\n\
         # TYPE tracer_also_export_spans_total counter\n",
    );
    for (endpoint, e) in &stats.also_exports {
        out.push_str(&format!(
            "tracer_also_export_spans_total{{endpoint=\"{endpoint}\"}} {}\n",
            e.spans_sent.load(Relaxed)
        ));
    }
    out.push_str(
        "# HELP tracer_also_export_failed_attempts_total Requests to an --also-export endpoint that failed and were retried\n\
         # TYPE tracer_also_export_failed_attempts_total counter\n",
    );
    for (endpoint, e) in &stats.also_exports {
        out.push_str(&format!(
            "tracer_also_export_failed_attempts_total{{endpoint=\"{endpoint}\"}} {}\n",
            e.failed_attempts.load(Relaxed)
        ));
    }
    out.push_str(
        "# HELP tracer_also_export_dropped_total Spans dropped for an --also-export endpoint, by cause\n\
         # TYPE tracer_also_export_dropped_total counter\n",
    );
    for (endpoint, e) in &stats.also_exports {
        for (cause, n) in [
            ("queue_full", &e.dropped_queue_full),
            ("rejected", &e.dropped_rejected),
            ("shutdown", &e.dropped_shutdown),
        ] {
            out.push_str(&format!(
                "tracer_also_export_dropped_total{{endpoint=\"{endpoint}\",cause=\"{cause}\"}} {}\n",
                n.load(Relaxed)
            ));
        }
    }
}

/// Connections served at once. A scrape is one short request: more than this many at a time
/// is someone holding connections open, and the oldest is closed to make room.
const MAX_CONNECTIONS: usize = 32;
/// A connection must deliver its request and take the answer within this; one request a
/// connection (a Prometheus scrape reconnects cheaply), so no connection sits idle for longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's smallest buffer); a scrape's is a few hundred bytes.
const MAX_HEAD_BYTES: usize = 8192;

/// The endpoint's own defences, counted: every connection closed early is visible.
#[derive(Default)]
struct EndpointStats {
    /// Connections closed unanswered to make room for a newer one (`MAX_CONNECTIONS` open).
    evicted: AtomicU64,
    /// Connections closed because their request did not complete within `CONNECTION_TIMEOUT`.
    timed_out: AtomicU64,
}

/// The open connections, oldest first, each with the handle that closes it.
#[derive(Default)]
struct Open {
    next_id: u64,
    by_age: BTreeMap<u64, AbortHandle>,
}

/// Removes a connection from [`Open`] however its task ends: served, timed out or aborted.
struct Registered {
    id: u64,
    open: Arc<Mutex<Open>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).by_age.remove(&self.id);
    }
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds now (so a taken port is an error at start-up) and serves in the background.
///
/// Any local user can connect, so nothing a client does costs more than a bounded amount: at most
/// `MAX_CONNECTIONS` descriptors (a newer connection closes the oldest, so a flood of idle
/// connections cannot lock a scrape out), one request of at most `MAX_HEAD_BYTES` of head a
/// connection, `CONNECTION_TIMEOUT` a connection, and accept failures (out of descriptors) back
/// off instead of spinning the agent's one thread.
pub async fn serve(addr: SocketAddr, stats: Arc<Stats>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics endpoint {addr} (use --metrics-addr to move or `off`)")
    })?;
    log::info!("metrics on http://{addr}/metrics");
    let endpoint = Arc::new(EndpointStats::default());
    let open = Arc::new(Mutex::new(Open::default()));
    tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    stream
                }
                Err(e) => {
                    log::warn!("metrics endpoint: accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let oldest = {
                let mut o = lock(&open);
                if o.by_age.len() >= MAX_CONNECTIONS {
                    o.by_age.pop_first()
                } else {
                    None
                }
            };
            if let Some((_, handle)) = oldest {
                handle.abort();
                endpoint.evicted.fetch_add(1, Relaxed);
            }
            let (stats, endpoint_stats) = (stats.clone(), endpoint.clone());
            let mut o = lock(&open);
            let id = o.next_id;
            o.next_id += 1;
            let registered = Registered {
                id,
                open: open.clone(),
            };
            let task = tokio::spawn(async move {
                let _registered = registered;
                serve_connection(stream, addr, stats, endpoint_stats).await;
            });
            o.by_age.insert(id, task.abort_handle());
        }
    });
    Ok(())
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One request on `stream`, answered and closed, within `CONNECTION_TIMEOUT`.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    listen: SocketAddr,
    stats: Arc<Stats>,
    endpoint: Arc<EndpointStats>,
) {
    let svc = service_fn(|req: Request<hyper::body::Incoming>| {
        let (stats, endpoint) = (stats.clone(), endpoint.clone());
        async move {
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .map(|h| h.to_str().unwrap_or("?"));
            let resp = if !host_allowed(listen, host) {
                Response::builder().status(421).body(Full::new(Bytes::from(
                    "the metrics endpoint on a loopback address answers only for loopback host names\n",
                )))
            } else if req.uri().path() == "/metrics" {
                Response::builder()
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(
                        render(&stats) + &render_endpoint(&endpoint),
                    )))
            } else {
                Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::from("try /metrics\n")))
            };
            Ok::<_, Infallible>(resp.unwrap_or_default())
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), svc);
    if tokio::time::timeout(CONNECTION_TIMEOUT, conn)
        .await
        .is_err()
    {
        endpoint.timed_out.fetch_add(1, Relaxed);
    }
}

/// Whether a request naming `host` is for this endpoint. On a loopback address only loopback
/// names are: a web page could otherwise read the metrics (service names, routes) by pointing a
/// name of its own at 127.0.0.1 (DNS rebinding). On any other address the endpoint was opened
/// to the network on purpose, and every name is.
fn host_allowed(listen: SocketAddr, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return true;
    };
    if !listen.ip().is_loopback() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn render_endpoint(e: &EndpointStats) -> String {
    let mut out = String::new();
    for (name, help, value) in [
        (
            "tracer_metrics_connections_evicted_total",
            "Metrics endpoint connections closed unanswered to make room for newer ones",
            e.evicted.load(Relaxed),
        ),
        (
            "tracer_metrics_connections_timed_out_total",
            "Metrics endpoint connections closed for not completing a request in time",
            e.timed_out.load(Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On loopback, only loopback names (any port); elsewhere, any name.
    #[test]
    fn loopback_endpoints_answer_loopback_names_only() {
        let lo: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        for ok in [
            "localhost",
            "localhost:9464",
            "LOCALHOST.:80",
            "127.0.0.1:9464",
            "127.1.2.3",
            "[::1]:9464",
        ] {
            assert!(host_allowed(lo, Some(ok)), "{ok}");
        }
        for refused in [
            "evil.example:9464",
            "localhost.evil.example",
            "10.0.0.1",
            "[fe80::1]",
            "?",
        ] {
            assert!(!host_allowed(lo, Some(refused)), "{refused}");
        }
        assert!(host_allowed(lo, None));
        let open: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        assert!(host_allowed(open, Some("node-7.example:9464")));
    }

    /// Links are counted by how they were made, one labelled series a source.
    #[test]
    fn links_are_rendered_by_source() {
        let stats = Stats::default();
        stats.agent.links[crate::link::Source::Thread.index()].store(3, Relaxed);
        stats.agent.calls_unattributed.store(2, Relaxed);
        let text = render(&stats);
        assert!(
            text.contains("tracer_links_total{source=\"thread\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tracer_links_total{source=\"tcp-seq\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tracer_links_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("tracer_calls_unattributed_total 2\n"),
            "{text}"
        );
        let sources = text
            .lines()
            .filter(|l| l.starts_with("tracer_links_total{"))
            .count();
        assert_eq!(sources, crate::link::Source::ALL.len());
    }
}
