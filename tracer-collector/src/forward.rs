//! Fan-out: what the collector stored, forwarded as OTLP/HTTP protobuf to other backends (an
//! OpenTelemetry Collector, Tempo, Jaeger, a vendor), so a fleet that outgrows one collector
//! moves to a distributed backend without touching its agents.
//!
//! A batch is forwarded only once it is stored, so the local store and each upstream see the
//! same spans. Each upstream has its own queue, bounded in bytes, and its own task: a slow or
//! dead upstream delays and drops only its own copies (counted), never ingest. Failures are
//! retried with exponential backoff (5xx, 429, connection errors); a 4xx other than 429 means the
//! upstream will never take the batch, which is dropped and counted.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::Notify;

/// One upstream's counters.
#[derive(Default, Debug)]
pub struct ForwardStats {
    pub sent_requests: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Dropped because the queue was full (the upstream slower than ingest, or down).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the upstream refused them for good (4xx).
    pub dropped_rejected: AtomicU64,
    pub retries: AtomicU64,
    pub queued_bytes: AtomicU64,
}

struct Queue {
    items: Mutex<VecDeque<Bytes>>,
    ready: Notify,
}

/// One upstream: where, its queue and counters.
pub struct Upstream {
    pub url: String,
    pub stats: ForwardStats,
    queue: Queue,
    capacity_bytes: u64,
}

/// All upstreams; cheap to hand batches to.
#[derive(Clone, Default)]
pub struct Forwarder {
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Forwarder {
    /// Each upstream's counters in Prometheus text (the collector's `/metrics`), labelled by
    /// its URL.
    pub fn render_metrics(&self, out: &mut String) {
        for (name, help, kind, get) in [
            (
                "tracer_collector_forward_requests_total",
                "Batches an upstream acknowledged",
                "counter",
                (|s: &ForwardStats| &s.sent_requests) as fn(&ForwardStats) -> &AtomicU64,
            ),
            (
                "tracer_collector_forward_bytes_total",
                "Bytes an upstream acknowledged",
                "counter",
                |s| &s.sent_bytes,
            ),
            (
                "tracer_collector_forward_dropped_queue_full_total",
                "Batches not forwarded: the upstream's queue was full",
                "counter",
                |s| &s.dropped_queue_full,
            ),
            (
                "tracer_collector_forward_dropped_rejected_total",
                "Batches an upstream refused for good (4xx)",
                "counter",
                |s| &s.dropped_rejected,
            ),
            (
                "tracer_collector_forward_retries_total",
                "Forwarding attempts that failed and were retried",
                "counter",
                |s| &s.retries,
            ),
            (
                "tracer_collector_forward_queued_bytes",
                "Bytes waiting for an upstream",
                "gauge",
                |s| &s.queued_bytes,
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for u in &self.upstreams {
                out.push_str(&format!(
                    "{name}{{upstream=\"{}\"}} {}\n",
                    u.url.replace(['"', '\\', '\n'], "_"),
                    get(&u.stats).load(Relaxed)
                ));
            }
        }
    }

    /// Starts a sender task per URL (OTLP/HTTP traces endpoints), each with a queue of at most
    /// `capacity_mib`, sending `headers` (e.g. an authorization) with each request.
    pub fn start(
        urls: &[String],
        capacity_mib: u64,
        headers: Vec<(String, String)>,
    ) -> anyhow::Result<Forwarder> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()?;
        let mut upstreams = Vec::new();
        for url in urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("--forward {url:?} must be an http:// or https:// URL (the OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces)");
            }
            let upstream = Arc::new(Upstream {
                url: url.clone(),
                stats: ForwardStats::default(),
                queue: Queue {
                    items: Mutex::new(VecDeque::new()),
                    ready: Notify::new(),
                },
                capacity_bytes: capacity_mib.saturating_mul(1024 * 1024).max(1),
            });
            tokio::spawn(send_loop(upstream.clone(), client.clone(), headers.clone()));
            upstreams.push(upstream);
        }
        Ok(Forwarder { upstreams })
    }

    /// Queues a stored batch (an `ExportTraceServiceRequest` in protobuf) for every upstream.
    pub fn forward(&self, body: &Bytes) {
        for u in &self.upstreams {
            let len = body.len() as u64;
            if u.stats.queued_bytes.load(Relaxed) + len > u.capacity_bytes {
                u.stats.dropped_queue_full.fetch_add(1, Relaxed);
                continue;
            }
            u.stats.queued_bytes.fetch_add(len, Relaxed);
            u.queue
                .items
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(body.clone());
            u.queue.ready.notify_one();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }
}

async fn send_loop(
    upstream: Arc<Upstream>,
    client: reqwest::Client,
    headers: Vec<(String, String)>,
) {
    let mut logged_failure = false;
    loop {
        let next = upstream
            .queue
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let Some(body) = next else {
            upstream.queue.ready.notified().await;
            continue;
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut request = client
                .post(&upstream.url)
                .header("content-type", "application/x-protobuf");
            for (k, v) in &headers {
                request = request.header(k, v);
            }
            match request.body(body.clone()).send().await {
                Ok(r) if r.status().is_success() => {
                    upstream.stats.sent_requests.fetch_add(1, Relaxed);
                    upstream
                        .stats
                        .sent_bytes
                        .fetch_add(body.len() as u64, Relaxed);
                    if logged_failure {
                        log::info!("forwarding to {} works again", upstream.url);
                        logged_failure = false;
                    }
                    break;
                }
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    upstream.stats.dropped_rejected.fetch_add(1, Relaxed);
                    log::warn!(
                        "{} refused a forwarded batch ({}): dropped",
                        upstream.url,
                        r.status()
                    );
                    break;
                }
                outcome => {
                    if !logged_failure {
                        let why = match outcome {
                            Ok(r) => format!("answered {}", r.status()),
                            Err(e) => format!("unreachable ({e})"),
                        };
                        log::warn!("forwarding to {} failed: {why}; retrying", upstream.url);
                        logged_failure = true;
                    }
                    upstream.stats.retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        upstream
            .stats
            .queued_bytes
            .fetch_sub(body.len() as u64, Relaxed);
    }
}
