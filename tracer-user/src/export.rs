//! OTLP/HTTP export: batching, gzip, retry with backoff, and a bounded queue so that a collector
//! that is down or slow never blocks the ring-buffer drain. Every span that cannot be delivered is
//! counted (and logged at most once every few seconds).
use std::{
    collections::HashMap,
    io::Write as _,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use flate2::{write::GzEncoder, Compression};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::InstrumentationScope,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans},
};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::spans::HttpSpan;

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

/// A process's resource, encoded once: every batch with spans of the process repeats it.
pub struct ExportResource {
    pub proto: Resource,
    /// `proto` as a protobuf `Resource` message body.
    pub encoded: Vec<u8>,
}

impl ExportResource {
    pub fn new(proto: Resource) -> Self {
        let encoded = proto.encode_to_vec();
        ExportResource { proto, encoded }
    }
}

/// One span with the resource (process) it belongs to. Resources are shared: the exporter
/// groups spans by the `Arc`'s address.
pub struct SpanItem {
    pub resource: Arc<ExportResource>,
    pub span: HttpSpan,
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

/// The drain side's handle: never blocks. Spans go over in batches (one per ring-buffer
/// drain), so the channel costs nothing per span; the queue's bound is kept in spans.
#[derive(Clone)]
pub struct SpanSender {
    tx: mpsc::UnboundedSender<Vec<SpanItem>>,
    queue: Arc<QueueBound>,
    stats: Arc<ExportStats>,
    limiter: Arc<LogLimiter>,
}

/// Spans handed to the exporter and not yet taken into a batch being delivered.
struct QueueBound {
    queued: AtomicUsize,
    capacity: usize,
}

impl SpanSender {
    /// Queues `items`; what does not fit is dropped and counted.
    pub fn send(&self, mut items: Vec<SpanItem>) {
        if items.is_empty() {
            return;
        }
        let queued = self.queue.queued.load(Relaxed);
        let room = self.queue.capacity.saturating_sub(queued);
        if items.len() > room {
            let dropped = (items.len() - room) as u64;
            items.truncate(room);
            let n = self.stats.dropped_queue_full.fetch_add(dropped, Relaxed) + dropped;
            self.limiter.warn(|| {
                format!("export queue full (collector down or slow): {n} spans dropped so far")
            });
        }
        if items.is_empty() {
            return;
        }
        let count = items.len();
        self.queue.queued.fetch_add(count, Relaxed);
        if self.tx.send(items).is_err() {
            // The exporter is gone (shutdown): nothing will deliver these.
            self.queue.queued.fetch_sub(count, Relaxed);
            self.stats.dropped_shutdown.fetch_add(count as u64, Relaxed);
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

/// The instrumentation scope every span of the agent is reported under.
fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "tracer".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// Groups spans by resource, in order of first appearance.
fn groups(items: &[SpanItem]) -> Vec<(&ExportResource, Vec<&HttpSpan>)> {
    let mut groups: Vec<(&ExportResource, Vec<&HttpSpan>)> = Vec::new();
    let mut index: HashMap<*const ExportResource, usize> = HashMap::new();
    for item in items {
        let i = *index.entry(Arc::as_ptr(&item.resource)).or_insert_with(|| {
            groups.push((&item.resource, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(&item.span);
    }
    groups
}

/// The spans as one OTLP request of `prost` structs (for OTLP/JSON).
pub fn build_request(items: &[SpanItem]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: groups(items)
            .into_iter()
            .map(|(resource, spans)| ResourceSpans {
                resource: Some(resource.proto.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans: spans.into_iter().map(HttpSpan::to_proto).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// Reusable buffers for encoding requests.
#[derive(Default)]
pub struct Encoder {
    scope: Vec<u8>,
    /// The encoded spans of one resource, back to back, and each one's length: a protobuf
    /// length prefix comes before its message, so spans are encoded once here and copied once
    /// into the request when the lengths are known.
    spans: Vec<u8>,
    span_lens: Vec<usize>,
    name: String,
    /// The size of the last request, to allocate the next one at once.
    last_len: usize,
}

impl Encoder {
    /// The spans as one protobuf `ExportTraceServiceRequest`, written directly (see `wire.rs`);
    /// the same message `build_request` describes.
    pub fn protobuf(&mut self, items: &[SpanItem]) -> Vec<u8> {
        use crate::wire::*;
        if self.scope.is_empty() {
            self.scope = scope().encode_to_vec();
        }
        let mut out = Vec::with_capacity(self.last_len.max(items.len() * 450) + 1024);
        for (resource, spans) in groups(items) {
            self.spans.clear();
            self.span_lens.clear();
            for span in spans {
                let start = self.spans.len();
                span.encode(&mut self.spans, &mut self.name);
                self.span_lens.push(self.spans.len() - start);
            }
            // ScopeSpans: the scope, then each span as a length-delimited field.
            let scope_spans = field_len(self.scope.len())
                + self.span_lens.iter().map(|&n| field_len(n)).sum::<usize>();
            let resource_spans = field_len(resource.encoded.len()) + field_len(scope_spans);
            tag(&mut out, request::RESOURCE_SPANS, LEN);
            varint(&mut out, resource_spans as u64);
            bytes_field(&mut out, resource_spans::RESOURCE, &resource.encoded);
            tag(&mut out, resource_spans::SCOPE_SPANS, LEN);
            varint(&mut out, scope_spans as u64);
            bytes_field(&mut out, scope_spans::SCOPE, &self.scope);
            let mut at = 0;
            for &n in &self.span_lens {
                bytes_field(&mut out, scope_spans::SPANS, &self.spans[at..at + n]);
                at += n;
            }
        }
        self.last_len = out.len();
        out
    }

    pub fn encode(&mut self, items: &[SpanItem], protocol: Protocol) -> anyhow::Result<Vec<u8>> {
        Ok(match protocol {
            Protocol::HttpProtobuf => self.protobuf(items),
            Protocol::HttpJson => serde_json::to_vec(&build_request(items))?,
        })
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
    encoder: Encoder,
}

impl Exporter {
    async fn post(&self, body: Bytes) -> Outcome {
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
    /// `deadline` passes. Shutdown sets a deadline: given one, or from the moment
    /// `shutting_down` says so (a collector that is down must not keep the agent from exiting).
    async fn deliver(
        &mut self,
        items: &[SpanItem],
        mut deadline: Option<Instant>,
        shutting_down: &(dyn Fn() -> bool + Sync),
    ) {
        let count = items.len() as u64;
        let body = match self.body(items) {
            Ok(b) => Bytes::from(b),
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
            let retry_at = Instant::now() + backoff;
            // Wait out the backoff in short steps, so that a shutdown is noticed.
            loop {
                if deadline.is_none() && shutting_down() {
                    deadline = Some(Instant::now() + self.config.shutdown_timeout);
                }
                if deadline.is_some_and(|d| retry_at > d) {
                    self.stats.dropped_shutdown.fetch_add(count, Relaxed);
                    log::error!("collector unreachable at shutdown: {count} spans dropped");
                    return;
                }
                let now = Instant::now();
                if now >= retry_at {
                    break;
                }
                tokio::time::sleep((retry_at - now).min(Duration::from_millis(200))).await;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn body(&mut self, items: &[SpanItem]) -> anyhow::Result<Vec<u8>> {
        let raw = self.encoder.encode(items, self.config.protocol)?;
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
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<SpanItem>>();
    let queue = Arc::new(QueueBound {
        queued: AtomicUsize::new(0),
        capacity: config.queue_capacity.max(1),
    });
    let limiter = Arc::new(LogLimiter::new(Duration::from_secs(10)));
    let mut exporter = Exporter {
        config,
        client,
        stats: stats.clone(),
        limiter: limiter.clone(),
        encoder: Encoder::default(),
    };
    let bound = queue.clone();
    let handle = tokio::spawn(async move {
        let batch_size = exporter.config.batch_size.max(1);
        // Spans received and not yet delivered: a drain's worth may exceed a batch. Batches
        // are delivered as slices of it, so a span is moved once on its way (into `waiting`,
        // and not even that when nothing was waiting).
        let mut waiting: Vec<SpanItem> = Vec::new();
        let take = |waiting: &mut Vec<SpanItem>, items: Vec<SpanItem>| {
            if waiting.is_empty() {
                *waiting = items;
            } else {
                waiting.extend(items);
            }
        };
        let mut closed = false;
        while !closed {
            if waiting.is_empty() {
                match rx.recv().await {
                    Some(items) => take(&mut waiting, items),
                    None => break,
                }
            }
            let flush_at = tokio::time::Instant::now() + exporter.config.batch_timeout;
            while waiting.len() < batch_size {
                match tokio::time::timeout_at(flush_at, rx.recv()).await {
                    Ok(Some(items)) => take(&mut waiting, items),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let deadline = closed.then(|| Instant::now() + exporter.config.shutdown_timeout);
            // Full batches, or what the timeout found; a partial rest waits for more.
            let mut done = 0;
            loop {
                let n = (waiting.len() - done).min(batch_size);
                if n == 0 {
                    break;
                }
                bound.queued.fetch_sub(n, Relaxed);
                let batch = &waiting[done..done + n];
                exporter.deliver(batch, deadline, &|| rx.is_closed()).await;
                done += n;
                if waiting.len() - done < batch_size {
                    break;
                }
            }
            waiting.drain(..done);
        }
        // Shutdown: whatever is still queued gets one bounded chance.
        let deadline = Instant::now() + exporter.config.shutdown_timeout;
        while let Ok(items) = rx.try_recv() {
            take(&mut waiting, items);
        }
        for batch in waiting.chunks(batch_size) {
            bound.queued.fetch_sub(batch.len(), Relaxed);
            exporter.deliver(batch, Some(deadline), &|| true).await;
        }
    });
    Ok((
        SpanSender {
            tx,
            queue,
            stats,
            limiter,
        },
        handle,
    ))
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

    fn item(resource: &Arc<ExportResource>, path: &str) -> SpanItem {
        use crate::pairing::{Exchange, Role};
        let exchange = Exchange {
            conn: 1,
            role: Role::Server,
            request: crate::http::RequestText::new("GET", path, None, None),
            status: Some(200),
            start_ns: 1,
            end_ns: 2,
            request_bytes: 3,
            response_bytes: 4,
        };
        let ends = Arc::new(crate::spans::Endpoints::new(
            "127.0.0.1:80".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
        ));
        SpanItem {
            resource: resource.clone(),
            span: HttpSpan::new(exchange, ends, |t| t),
        }
    }

    fn resource(service: &str) -> Arc<ExportResource> {
        Arc::new(ExportResource::new(Resource {
            attributes: vec![crate::resource::kv_str("service.name", service)],
            ..Default::default()
        }))
    }

    #[test]
    fn spans_are_grouped_by_resource() {
        let (a, b) = (resource("a"), resource("b"));
        let items = vec![item(&a, "/one"), item(&b, "/two"), item(&a, "/three")];
        let req = build_request(&items);
        assert_eq!(req.resource_spans.len(), 2);
        let names: Vec<_> = req.resource_spans[0].scope_spans[0]
            .spans
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["GET /one", "GET /three"]);
    }

    #[test]
    fn direct_protobuf_is_the_request_prost_would_send() {
        let (a, b) = (resource("a"), resource("b"));
        let items = vec![item(&a, "/1"), item(&b, "/2"), item(&a, "/3/4")];
        let mut encoder = Encoder::default();
        for _ in 0..2 {
            let body = encoder.protobuf(&items);
            let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
            assert_eq!(decoded, build_request(&items));
        }
    }
}
