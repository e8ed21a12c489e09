//! OTLP/HTTP export: batching, gzip, retry with backoff, and a bounded queue so that a collector
//! that is down or slow never blocks the ring-buffer drain. Every span that cannot be delivered is
//! counted (and logged at most once every few seconds).
use std::{
    collections::HashMap,
    io::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use flate2::{write::GzEncoder, Compression};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::InstrumentationScope,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message as _;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (the OTLP default).
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/HTTP with JSON bodies.
    #[value(name = "http/json")]
    #[serde(rename = "http/json")]
    HttpJson,
}

#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Full URL of the traces endpoint, e.g. `http://collector:4318/v1/traces`.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub protocol: Protocol,
    pub gzip: bool,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    /// Spans waiting for export at most; past that new spans are dropped and counted.
    pub queue_capacity: usize,
    /// Extra CA certificate (PEM) to trust for an https endpoint.
    pub ca_cert: Option<std::path::PathBuf>,
    /// How long shutdown waits to deliver what is buffered.
    pub shutdown_timeout: Duration,
}

/// One span with the resource (process) it belongs to. Resources are shared: the exporter
/// groups spans by the `Arc`'s address.
pub struct SpanItem {
    pub resource: Arc<Resource>,
    pub span: Span,
}

#[derive(Default, Debug)]
pub struct ExportStats {
    pub spans_sent: AtomicU64,
    pub batches_sent: AtomicU64,
    /// Dropped because the queue was full (the collector is down or slower than the traffic).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the collector rejected them with a non-retryable status.
    pub dropped_rejected: AtomicU64,
    /// Dropped at shutdown because the collector could not take them in time.
    pub dropped_shutdown: AtomicU64,
    pub failed_attempts: AtomicU64,
}

impl ExportStats {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full.load(Relaxed)
            + self.dropped_rejected.load(Relaxed)
            + self.dropped_shutdown.load(Relaxed)
    }
}

/// The drain side's handle: never blocks.
#[derive(Clone)]
pub struct SpanSender {
    tx: mpsc::Sender<SpanItem>,
    stats: Arc<ExportStats>,
    limiter: Arc<LogLimiter>,
}

impl SpanSender {
    pub fn send(&self, item: SpanItem) {
        if self.tx.try_send(item).is_err() {
            let n = self.stats.dropped_queue_full.fetch_add(1, Relaxed) + 1;
            self.limiter.warn(|| {
                format!("export queue full (collector down or slow): {n} spans dropped so far")
            });
        }
    }
}

/// Logs at most once per interval, so a long outage does not flood the log.
pub struct LogLimiter {
    last: std::sync::Mutex<Option<Instant>>,
    every: Duration,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        Self {
            last: std::sync::Mutex::new(None),
            every,
        }
    }
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= self.every) {
            *last = Some(Instant::now());
            log::warn!("{}", msg());
        }
    }
}

pub fn encode(request: &ExportTraceServiceRequest, protocol: Protocol) -> anyhow::Result<Vec<u8>> {
    Ok(match protocol {
        Protocol::HttpProtobuf => request.encode_to_vec(),
        Protocol::HttpJson => serde_json::to_vec(request)?,
    })
}

/// Groups spans by resource into one OTLP request.
pub fn build_request(items: Vec<SpanItem>) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<Span>)> = Vec::new();
    let mut index: HashMap<*const Resource, usize> = HashMap::new();
    for item in items {
        let key = Arc::as_ptr(&item.resource);
        let i = *index.entry(key).or_insert_with(|| {
            groups.push((item.resource.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(item.span);
    }
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(resource, spans)| ResourceSpans {
                resource: Some((*resource).clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "tracer".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

enum Outcome {
    Delivered,
    /// The collector said no for good (4xx other than 408/429): retrying will not help.
    Rejected(String),
    /// Worth retrying: connection refused, timeout, 408/429/5xx.
    Retry(String),
}

struct Exporter {
    config: ExportConfig,
    client: reqwest::Client,
    stats: Arc<ExportStats>,
    limiter: Arc<LogLimiter>,
}

impl Exporter {
    async fn post(&self, body: Vec<u8>) -> Outcome {
        let content_type = match self.config.protocol {
            Protocol::HttpProtobuf => "application/x-protobuf",
            Protocol::HttpJson => "application/json",
        };
        let mut req = self
            .client
            .post(&self.config.url)
            .header("content-type", content_type)
            .header(
                "user-agent",
                concat!("tracer-agent/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.config.headers {
            req = req.header(k, v);
        }
        if self.config.gzip {
            req = req.header("content-encoding", "gzip");
        }
        match req.body(body).send().await {
            Ok(resp) if resp.status().is_success() => Outcome::Delivered,
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                let msg = format!("collector answered {status}: {}", text.trim());
                if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
                    Outcome::Retry(msg)
                } else {
                    Outcome::Rejected(msg)
                }
            }
            Err(e) => Outcome::Retry(format!(
                "cannot reach the collector at {}: {e}",
                self.config.url
            )),
        }
    }

    /// Delivers one batch, retrying with exponential backoff until it succeeds, is rejected, or
    /// `deadline` passes (shutdown).
    async fn deliver(&self, items: Vec<SpanItem>, deadline: Option<Instant>) {
        let count = items.len() as u64;
        let request = build_request(items);
        let body = match self.body(&request) {
            Ok(b) => b,
            Err(e) => {
                log::error!("encoding a batch failed: {e:#}");
                self.stats.dropped_rejected.fetch_add(count, Relaxed);
                return;
            }
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.post(body.clone()).await {
                Outcome::Delivered => {
                    self.stats.spans_sent.fetch_add(count, Relaxed);
                    self.stats.batches_sent.fetch_add(1, Relaxed);
                    return;
                }
                Outcome::Rejected(msg) => {
                    self.stats.dropped_rejected.fetch_add(count, Relaxed);
                    log::error!("{msg}; dropped a batch of {count} spans");
                    return;
                }
                Outcome::Retry(msg) => {
                    self.stats.failed_attempts.fetch_add(1, Relaxed);
                    self.limiter.warn(|| {
                        format!("{msg}; retrying (spans are kept while the queue has room)")
                    });
                }
            }
            if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                self.stats.dropped_shutdown.fetch_add(count, Relaxed);
                log::error!("collector unreachable at shutdown: {count} spans dropped");
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn body(&self, request: &ExportTraceServiceRequest) -> anyhow::Result<Vec<u8>> {
        let raw = encode(request, self.config.protocol)?;
        if !self.config.gzip {
            return Ok(raw);
        }
        let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::fast());
        gz.write_all(&raw)?;
        Ok(gz.finish()?)
    }
}

/// Starts the exporter task. It runs until every `SpanSender` is dropped, then flushes what is
/// queued within `shutdown_timeout`.
pub fn spawn(
    config: ExportConfig,
    stats: Arc<ExportStats>,
) -> anyhow::Result<(SpanSender, tokio::task::JoinHandle<()>)> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(3));
    if let Some(path) = &config.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading CA certificate {}", path.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().context("building the HTTP client")?;
    let (tx, mut rx) = mpsc::channel::<SpanItem>(config.queue_capacity.max(1));
    let limiter = Arc::new(LogLimiter::new(Duration::from_secs(10)));
    let exporter = Exporter {
        config,
        client,
        stats: stats.clone(),
        limiter: limiter.clone(),
    };
    let handle = tokio::spawn(async move {
        let batch_size = exporter.config.batch_size.max(1);
        loop {
            let mut batch = Vec::with_capacity(batch_size);
            let first = rx.recv().await;
            let Some(first) = first else { break };
            batch.push(first);
            let flush_at = tokio::time::Instant::now() + exporter.config.batch_timeout;
            let mut closed = false;
            while batch.len() < batch_size {
                match tokio::time::timeout_at(flush_at, rx.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let deadline = closed.then(|| Instant::now() + exporter.config.shutdown_timeout);
            exporter.deliver(batch, deadline).await;
            if closed {
                break;
            }
        }
        // Shutdown: whatever is still queued gets one bounded chance.
        let deadline = Instant::now() + exporter.config.shutdown_timeout;
        let mut rest = Vec::new();
        while let Ok(item) = rx.try_recv() {
            rest.push(item);
        }
        for chunk in chunked(rest, batch_size) {
            exporter.deliver(chunk, Some(deadline)).await;
        }
    });
    Ok((SpanSender { tx, stats, limiter }, handle))
}

fn chunked(mut items: Vec<SpanItem>, size: usize) -> Vec<Vec<SpanItem>> {
    let mut out = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(items.len().min(size));
        out.push(items);
        items = rest;
    }
    out
}

/// Parses `OTEL_EXPORTER_OTLP_HEADERS`-style `k1=v1,k2=v2` (values may be percent-encoded).
pub fn parse_headers(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("header {pair:?} is not key=value"))?;
            Ok((k.trim().to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The traces URL for an `OTEL_EXPORTER_OTLP_ENDPOINT`-style base URL (spec: append `/v1/traces`).
pub fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_like_the_otel_spec() {
        let h = parse_headers("authorization=Bearer%20abc, x-tenant = t1").unwrap();
        assert_eq!(
            h,
            vec![
                ("authorization".into(), "Bearer abc".into()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        assert!(parse_headers("novalue").is_err());
    }

    #[test]
    fn traces_url_appends_the_signal_path() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
    }

    #[test]
    fn spans_are_grouped_by_resource() {
        let a = Arc::new(Resource::default());
        let b = Arc::new(Resource::default());
        let items = vec![
            SpanItem {
                resource: a.clone(),
                span: Span {
                    name: "1".into(),
                    ..Default::default()
                },
            },
            SpanItem {
                resource: b.clone(),
                span: Span {
                    name: "2".into(),
                    ..Default::default()
                },
            },
            SpanItem {
                resource: a.clone(),
                span: Span {
                    name: "3".into(),
                    ..Default::default()
                },
            },
        ];
        let req = build_request(items);
        assert_eq!(req.resource_spans.len(), 2);
        let names: Vec<_> = req.resource_spans[0].scope_spans[0]
            .spans
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["1", "3"]);
    }
}
