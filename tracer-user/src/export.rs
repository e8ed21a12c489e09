//! OTLP/HTTP export: batching, gzip, retry with backoff, and a bounded queue so that a collector
//! that is down or slow never blocks the ring-buffer drain. Every span that cannot be delivered is
//! counted (and logged at most once every few seconds).
use std::{
    collections::HashMap,
    hash::BuildHasherDefault,
    io::Write as _,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
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

use crate::{hashing::FxHasher, spans::Span};

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
    /// Memory the spans waiting for export may take (their buffers, as allocated); past that
    /// new spans are dropped and counted. Keeps the agent's size bounded whatever the spans'
    /// size, while `queue_capacity` bounds their number.
    pub queue_bytes: usize,
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
    /// Its `service.name`, for the RED metrics' labels.
    service: String,
}

impl ExportResource {
    pub fn new(proto: Resource) -> Self {
        let encoded = proto.encode_to_vec();
        let service = proto
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .unwrap_or_default();
        ExportResource {
            proto,
            encoded,
            service,
        }
    }

    pub fn service_name(&self) -> &str {
        &self.service
    }
}

/// Spans of one resource (process), each encoded as the `spans` field of an OTLP `ScopeSpans`
/// message (a tag, a length, and the `Span` message from [`Span::encode`]), back to back.
///
/// The drain encodes a span as soon as it is final, into the batch of its resource, so the
/// exporter moves bytes rather than span structs (moving them, and freeing what they own later,
/// were measurable shares of the agent's time), and a batch's bytes go into the request body as
/// they are: the body is sent as a list of chunks, the batches' bytes between the few bytes of
/// each resource's head (copying every span into one body was 7% of the agent's time at 10k
/// requests/s). One resource a batch also means one `Arc` clone a batch instead of two atomic
/// reference-count updates a span, which stalled on the stores of the span just written.
pub struct SpanBatch {
    resource: Option<Arc<ExportResource>>,
    bytes: Vec<u8>,
    /// Each span's length in `bytes`, its field tag and length included.
    lens: Vec<u32>,
}

/// An empty batch with room for a drain's worth (`BATCH_BYTES`) of encoded spans.
impl Default for SpanBatch {
    fn default() -> Self {
        SpanBatch {
            resource: None,
            bytes: Vec::with_capacity(BATCH_BYTES),
            // Spans take ~500 bytes.
            lens: Vec::with_capacity(BATCH_BYTES / 256),
        }
    }
}

/// The `ScopeSpans.spans` field's tag (field 2, length-delimited).
const SPAN_FIELD_TAG: u8 = (crate::wire::scope_spans::SPANS << 3) as u8 | crate::wire::LEN;

impl SpanBatch {
    /// An empty batch for `resource`'s spans.
    #[cfg(test)]
    pub fn new(resource: Arc<ExportResource>) -> Self {
        SpanBatch {
            resource: Some(resource),
            ..Default::default()
        }
    }

    /// Whether this batch holds `resource`'s spans.
    pub fn is_for(&self, resource: &Arc<ExportResource>) -> bool {
        self.resource
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, resource))
    }

    pub fn bytes_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn clear(&mut self) {
        self.resource = None;
        self.bytes.clear();
        self.lens.clear();
    }

    /// Encodes `span`; `name` is scratch space reused across calls.
    pub fn push(&mut self, span: &Span, name: &mut String) {
        let start = self.bytes.len();
        // The length goes in front of the span, which is encoded in one pass: leave two bytes
        // for it, a varint of 128 to 16383, which nearly every span is.
        self.bytes.extend_from_slice(&[SPAN_FIELD_TAG, 0, 0]);
        span.encode(&mut self.bytes, name);
        let len = self.bytes.len() - start - 3;
        if (0x80..0x4000).contains(&len) {
            self.bytes[start + 1] = len as u8 | 0x80;
            self.bytes[start + 2] = (len >> 7) as u8;
        } else {
            let mut varint = Vec::with_capacity(4);
            crate::wire::varint(&mut varint, len as u64);
            self.bytes.splice(start + 1..start + 3, varint);
        }
        self.lens.push((self.bytes.len() - start) as u32);
    }

    /// Adds a span already encoded as an OTLP `Span` message body (the agent's own spans).
    pub fn push_encoded(&mut self, span: &[u8]) {
        let start = self.bytes.len();
        self.bytes.push(SPAN_FIELD_TAG);
        crate::wire::varint(&mut self.bytes, span.len() as u64);
        self.bytes.extend_from_slice(span);
        self.lens.push((self.bytes.len() - start) as u32);
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// What the batch holds on to: its buffers as allocated, not as filled.
    fn memory(&self) -> usize {
        self.bytes.capacity() + self.lens.capacity() * std::mem::size_of::<u32>()
    }

    /// The same spans in buffers of their size, when this batch's buffers are mostly empty: a
    /// drain of a few spans fills a few hundred bytes of the `BATCH_BYTES` it was given, and
    /// with the collector down, thousands of them would wait, each holding its full size.
    fn compacted(&mut self) -> Option<SpanBatch> {
        if self.bytes.len() * 4 >= self.bytes.capacity() {
            return None;
        }
        // `to_vec` and `collect` from `drain` allocate exactly the length; the drained batch
        // keeps its buffers for the pool.
        Some(SpanBatch {
            resource: self.resource.clone(),
            bytes: self.bytes.to_vec(),
            lens: self.lens.drain(..).collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Keeps the first `n` spans.
    fn truncate(&mut self, n: usize) {
        if n < self.lens.len() {
            let bytes = self.lens[..n].iter().map(|&l| l as usize).sum();
            self.bytes.truncate(bytes);
            self.lens.truncate(n);
        }
    }
}

/// Buffers that go round between the drain, the exporter and the HTTP client instead of back to
/// the allocator. Freed, a drain batch (~60 KiB) or a request body (~1 MiB) went back to the
/// system, and the next one was faulted in page by page again: 0.6 page faults a traced request
/// at 10k requests/s, a sixth of the agent's CPU time in the kernel's fault path (perf).
#[derive(Clone, Default)]
pub struct Recycler {
    batches: Arc<Mutex<Vec<SpanBatch>>>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Encoded spans the drain hands to the exporter at a time at most. Kept below mimalloc's
/// large-object size: larger batches, allocated on the drain and freed by the exporter, held
/// ~10 MiB more resident memory at 30k requests/s.
pub const OUTBOX_BYTES: usize = 48 * 1024;
/// Drain batches kept for reuse: a request of 2048 spans takes ~20 of them.
const KEEP_BATCHES: usize = 48;
/// Request bodies kept: one per request in flight, and the one being built.
const KEEP_BODIES: usize = MAX_IN_FLIGHT + 1;
/// A drain batch's room: it is handed over once it holds `OUTBOX_BYTES`, so this leaves room
/// for the span that crosses the line.
pub const BATCH_BYTES: usize = OUTBOX_BYTES + OUTBOX_BYTES / 4;

impl Recycler {
    /// An empty drain batch for `resource`'s spans.
    pub fn batch(&self, resource: &Arc<ExportResource>) -> SpanBatch {
        let mut batch = lock(&self.batches).pop().unwrap_or_default();
        batch.resource = Some(resource.clone());
        batch
    }

    /// Takes back batches whose spans have been encoded into a request.
    pub fn return_batches(&self, batches: impl Iterator<Item = SpanBatch>) {
        let mut pool = lock(&self.batches);
        for mut batch in batches {
            if pool.len() >= KEEP_BATCHES {
                break;
            }
            if batch.bytes.capacity() < BATCH_BYTES {
                // A compacted batch: a drain would have to grow it.
                continue;
            }
            batch.clear();
            pool.push(batch);
        }
    }

    /// `batch`'s encoded spans as `Bytes` for a request body; the batch comes back here once
    /// the HTTP client (and any retry) is done with them.
    fn share_batch(&self, batch: SpanBatch) -> Bytes {
        Bytes::from_owner(PooledBatch {
            batch,
            recycler: self.clone(),
        })
    }

    /// An empty buffer for a request body.
    fn body(&self) -> Vec<u8> {
        lock(&self.bodies).pop().unwrap_or_default()
    }

    fn return_body(&self, mut body: Vec<u8>) {
        let mut pool = lock(&self.bodies);
        if pool.len() < KEEP_BODIES {
            body.clear();
            pool.push(body);
        }
    }

    /// `body` as the `Bytes` a request sends; its buffer comes back here once the HTTP client
    /// (and any retry) is done with it.
    fn share(&self, body: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledBody {
            body,
            recycler: self.clone(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct PooledBody {
    body: Vec<u8>,
    recycler: Recycler,
}

impl AsRef<[u8]> for PooledBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        self.recycler.return_body(std::mem::take(&mut self.body));
    }
}

struct PooledBatch {
    batch: SpanBatch,
    recycler: Recycler,
}

impl AsRef<[u8]> for PooledBatch {
    fn as_ref(&self) -> &[u8] {
        &self.batch.bytes
    }
}

impl Drop for PooledBatch {
    fn drop(&mut self) {
        // The buffers go back; `take` leaves empty ones that allocate nothing.
        let batch = SpanBatch {
            resource: self.batch.resource.take(),
            bytes: std::mem::take(&mut self.batch.bytes),
            lens: std::mem::take(&mut self.batch.lens),
        };
        self.recycler.return_batches(std::iter::once(batch));
    }
}

/// The batches of `parts` grouped by resource, in order of first appearance: each resource with
/// the indices of its batches that hold spans.
fn groups(parts: &[SpanBatch]) -> Vec<(&ExportResource, Vec<usize>)> {
    let mut groups: Vec<(&ExportResource, Vec<usize>)> = Vec::new();
    let mut index: HashMap<*const ExportResource, usize, BuildHasherDefault<FxHasher>> =
        HashMap::default();
    for (i, part) in parts.iter().enumerate() {
        let Some(resource) = part.resource.as_ref().filter(|_| !part.is_empty()) else {
            continue;
        };
        let group = *index.entry(Arc::as_ptr(resource)).or_insert_with(|| {
            groups.push((resource, Vec::new()));
            groups.len() - 1
        });
        groups[group].1.push(i);
    }
    groups
}

fn span_count(parts: &[SpanBatch]) -> usize {
    parts.iter().map(SpanBatch::len).sum()
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
    tx: mpsc::UnboundedSender<SpanBatch>,
    pub recycler: Recycler,
    queue: Arc<QueueBound>,
    stats: Arc<ExportStats>,
    limiter: Arc<LogLimiter>,
}

/// Spans handed to the exporter and not yet taken into a batch being delivered.
struct QueueBound {
    queued: AtomicUsize,
    capacity: usize,
    /// `SpanBatch::memory` of those spans' batches, and its bound.
    queued_bytes: AtomicUsize,
    capacity_bytes: usize,
}

impl QueueBound {
    /// `parts` left the queue for a request.
    fn taken(&self, parts: &[SpanBatch]) {
        self.queued.fetch_sub(span_count(parts), Relaxed);
        let memory = parts.iter().map(SpanBatch::memory).sum();
        self.queued_bytes.fetch_sub(memory, Relaxed);
    }
}

impl SpanSender {
    /// A copy of `batch` for this exporter's queue (from its own pool): the same encoded spans
    /// go to every endpoint.
    pub fn copy_of(&self, batch: &SpanBatch) -> SpanBatch {
        let mut copy = match &batch.resource {
            Some(r) => self.recycler.batch(r),
            None => SpanBatch::default(),
        };
        copy.bytes.extend_from_slice(&batch.bytes);
        copy.lens.extend_from_slice(&batch.lens);
        copy
    }

    /// Whether a batch of a few spans would be queued now (the agent's own `tracer.loss` spans
    /// wait for room rather than be dropped and reported as a loss in turn).
    pub fn has_room(&self) -> bool {
        self.queue.queued.load(Relaxed) < self.queue.capacity
            && self.queue.queued_bytes.load(Relaxed) + BATCH_BYTES <= self.queue.capacity_bytes
    }

    /// Queues `items`; what does not fit is dropped and counted.
    pub fn send(&self, mut items: SpanBatch) {
        if items.is_empty() {
            return;
        }
        if let Some(small) = items.compacted() {
            self.recycler
                .return_batches(std::iter::once(std::mem::replace(&mut items, small)));
        }
        let queued = self.queue.queued.load(Relaxed);
        let mut room = self.queue.capacity.saturating_sub(queued);
        let queued_bytes = self.queue.queued_bytes.load(Relaxed);
        if queued_bytes + items.memory() > self.queue.capacity_bytes {
            // Keep the spans whose bytes fit: the batch's buffers are as large as before, so
            // this slightly overshoots the bound, by at most one batch.
            let bytes_room = self.queue.capacity_bytes.saturating_sub(queued_bytes);
            let mut fit = 0;
            let mut used = 0;
            for &len in &items.lens {
                used += len as usize + std::mem::size_of::<u32>();
                if used > bytes_room {
                    break;
                }
                fit += 1;
            }
            room = room.min(fit);
        }
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
        let memory = items.memory();
        self.queue.queued.fetch_add(count, Relaxed);
        self.queue.queued_bytes.fetch_add(memory, Relaxed);
        if self.tx.send(items).is_err() {
            // The exporter is gone (shutdown): nothing will deliver these.
            self.queue.queued.fetch_sub(count, Relaxed);
            self.queue.queued_bytes.fetch_sub(memory, Relaxed);
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

/// The spans as one OTLP request of `prost` structs (for OTLP/JSON), decoded from their
/// protobuf encoding.
pub fn build_request(parts: &[SpanBatch]) -> anyhow::Result<ExportTraceServiceRequest> {
    let mut resource_spans = Vec::new();
    for (resource, batches) in groups(parts) {
        let mut spans = Vec::new();
        for i in batches {
            // A batch's bytes are a `ScopeSpans` message's `spans` fields.
            let decoded =
                ScopeSpans::decode(parts[i].bytes.as_slice()).context("decoding encoded spans")?;
            spans.extend(decoded.spans);
        }
        resource_spans.push(ResourceSpans {
            resource: Some(resource.proto.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }
    Ok(ExportTraceServiceRequest { resource_spans })
}

/// Reusable state for encoding requests.
#[derive(Default)]
pub struct Encoder {
    scope: Vec<u8>,
    /// Scratch space for `protobuf_into`'s message heads.
    heads: Vec<u8>,
}

/// A piece of a protobuf request body: bytes of the message heads, or a batch's spans.
pub enum Piece {
    Head(std::ops::Range<usize>),
    /// The index of a batch in the request's parts.
    Batch(usize),
}

impl Encoder {
    /// `protobuf_into` a new buffer.
    #[cfg(test)]
    pub fn protobuf(&mut self, parts: &[SpanBatch]) -> Vec<u8> {
        let mut out = Vec::new();
        self.protobuf_into(parts, &mut out);
        out
    }

    /// The spans as one protobuf `ExportTraceServiceRequest` (the message `build_request`
    /// describes), as pieces to send back to back: one `ResourceSpans` head a resource (its
    /// resource, and the head of its one `ScopeSpans` with the scope), written into `heads`,
    /// followed by the batches of that resource, whose bytes are already the `spans` fields
    /// (see `wire.rs`).
    pub fn layout(&mut self, parts: &[SpanBatch], heads: &mut Vec<u8>) -> Vec<Piece> {
        use crate::wire::*;
        if self.scope.is_empty() {
            self.scope = scope().encode_to_vec();
        }
        let mut pieces = Vec::new();
        for (resource, batches) in groups(parts) {
            let spans: usize = batches.iter().map(|&i| parts[i].bytes.len()).sum();
            let scope_spans = field_len(self.scope.len()) + spans;
            let resource_spans = field_len(resource.encoded.len()) + field_len(scope_spans);
            let start = heads.len();
            tag(heads, request::RESOURCE_SPANS, LEN);
            varint(heads, resource_spans as u64);
            bytes_field(heads, resource_spans::RESOURCE, &resource.encoded);
            tag(heads, resource_spans::SCOPE_SPANS, LEN);
            varint(heads, scope_spans as u64);
            bytes_field(heads, scope_spans::SCOPE, &self.scope);
            pieces.push(Piece::Head(start..heads.len()));
            pieces.extend(batches.into_iter().map(Piece::Batch));
        }
        pieces
    }

    /// The `layout` of `parts` as a body of chunks: the heads, and the batches' own bytes, which
    /// go back to `recycler` once every holder of the body (a delivery, its retries) is done.
    fn protobuf_chunks(&mut self, parts: Vec<SpanBatch>, recycler: &Recycler) -> Payload {
        let mut heads = Vec::with_capacity(parts.len() * 512);
        let pieces = self.layout(&parts, &mut heads);
        let heads = Bytes::from(heads);
        let mut spans: Vec<Option<Bytes>> = parts
            .into_iter()
            .map(|batch| Some(recycler.share_batch(batch)))
            .collect();
        let chunks = pieces
            .into_iter()
            .filter_map(|piece| match piece {
                Piece::Head(range) => Some(heads.slice(range)),
                Piece::Batch(i) => spans[i].take(),
            })
            .collect();
        Payload::new(chunks)
    }

    /// The `layout` of `parts` copied into one buffer, appended to `out` (for gzip, and for
    /// the tests).
    pub fn protobuf_into(&mut self, parts: &[SpanBatch], out: &mut Vec<u8>) {
        let mut heads = std::mem::take(&mut self.heads);
        heads.clear();
        let pieces = self.layout(parts, &mut heads);
        out.reserve(heads.len() + parts.iter().map(SpanBatch::bytes_len).sum::<usize>());
        for piece in pieces {
            match piece {
                Piece::Head(range) => out.extend_from_slice(&heads[range]),
                Piece::Batch(i) => out.extend_from_slice(&parts[i].bytes),
            }
        }
        self.heads = heads;
    }

    /// The request body for `parts`, appended to `out`.
    pub fn encode_into(
        &mut self,
        parts: &[SpanBatch],
        protocol: Protocol,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        match protocol {
            Protocol::HttpProtobuf => self.protobuf_into(parts, out),
            Protocol::HttpJson => serde_json::to_writer(out, &build_request(parts)?)?,
        }
        Ok(())
    }
}

enum Outcome {
    Delivered,
    /// The collector said no for good (4xx other than 408/429): retrying will not help.
    Rejected(String),
    /// Worth retrying: connection refused, timeout, 408/429/5xx.
    Retry(String),
}

/// Requests to the collector in flight at once. One at a time, each waiting for the collector
/// to store its batch, did not keep up with 30k requests/s (the backlog grew by ~3k spans a
/// second); the OpenTelemetry Collector's exporters default to 10.
const MAX_IN_FLIGHT: usize = 4;

/// What a delivery needs, shared by the deliveries in flight.
struct Poster {
    config: ExportConfig,
    client: reqwest::Client,
    stats: Arc<ExportStats>,
    limiter: Arc<LogLimiter>,
}

/// A request body: chunks sent back to back, shared (not copied) by the retries of a delivery.
#[derive(Clone)]
struct Payload {
    chunks: Arc<[Bytes]>,
    len: u64,
}

impl Payload {
    fn new(chunks: Vec<Bytes>) -> Self {
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        Payload {
            chunks: chunks.into(),
            len,
        }
    }

    fn body(&self) -> reqwest::Body {
        reqwest::Body::wrap(PayloadBody {
            payload: self.clone(),
            next: 0,
            remaining: self.len,
        })
    }
}

/// A `Payload` being sent. Its exact size is known, so the request has a `Content-Length`, and
/// the HTTP client writes the chunks with vectored writes.
struct PayloadBody {
    payload: Payload,
    next: usize,
    remaining: u64,
}

impl hyper::body::Body for PayloadBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let chunk = this.payload.chunks.get(this.next).cloned();
        this.next += 1;
        if let Some(chunk) = &chunk {
            this.remaining -= chunk.len() as u64;
        }
        std::task::Poll::Ready(chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.payload.chunks.len()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

impl Poster {
    async fn post(&self, body: &Payload) -> Outcome {
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
        match req.body(body.body()).send().await {
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
        self: Arc<Self>,
        body: Payload,
        count: u64,
        mut deadline: Option<Instant>,
        shutting_down: impl Fn() -> bool,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.post(&body).await {
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
}

/// The exporter task's state: the encoder, and the requests in flight.
struct Exporter {
    poster: Arc<Poster>,
    encoder: Encoder,
    in_flight: tokio::task::JoinSet<()>,
    recycler: Recycler,
    /// Tells whether the agent has stopped (every `SpanSender` is gone) without keeping it from
    /// stopping: deliveries then give up retrying at the shutdown deadline.
    senders: mpsc::WeakUnboundedSender<SpanBatch>,
}

impl Exporter {
    /// Encodes `parts` and starts delivering them once fewer than `MAX_IN_FLIGHT` requests are
    /// out.
    async fn launch(&mut self, parts: Vec<SpanBatch>, deadline: Option<Instant>) {
        let count = span_count(&parts) as u64;
        let body = match self.body(parts) {
            Ok(body) => body,
            Err(e) => {
                log::error!("encoding a batch failed: {e:#}");
                self.poster.stats.dropped_rejected.fetch_add(count, Relaxed);
                return;
            }
        };
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.in_flight.join_next().await;
        }
        let senders = self.senders.clone();
        let shutting_down = move || senders.upgrade().is_none();
        let delivery = self
            .poster
            .clone()
            .deliver(body, count, deadline, shutting_down);
        self.in_flight.spawn(delivery);
    }

    /// Waits for every delivery in flight to end (each has its own deadline at shutdown).
    async fn finish(&mut self) {
        while self.in_flight.join_next().await.is_some() {}
    }

    /// The request body for `parts`. Plain protobuf (the default) is sent as the message heads
    /// and the batches' own bytes, which go back to the pool once the delivery is done; JSON and
    /// gzip are encoded into one buffer.
    fn body(&mut self, parts: Vec<SpanBatch>) -> anyhow::Result<Payload> {
        let config = &self.poster.config;
        if config.protocol == Protocol::HttpProtobuf && !config.gzip {
            return Ok(self.encoder.protobuf_chunks(parts, &self.recycler));
        }
        let mut raw = self.recycler.body();
        let encoded = self.encoder.encode_into(&parts, config.protocol, &mut raw);
        self.recycler.return_batches(parts.into_iter());
        encoded?;
        if !config.gzip {
            return Ok(Payload::new(vec![self.recycler.share(raw)]));
        }
        let mut gz = GzEncoder::new(self.recycler.body(), Compression::fast());
        gz.write_all(&raw)?;
        self.recycler.return_body(raw);
        Ok(Payload::new(vec![self.recycler.share(gz.finish()?)]))
    }
}

/// The HTTP client exports go through: timeouts, and the CA certificate if one is set.
pub fn http_client(config: &ExportConfig) -> anyhow::Result<reqwest::Client> {
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
    builder.build().context("building the HTTP client")
}

/// Starts the exporter task. It runs until every `SpanSender` is dropped, then flushes what is
/// queued within `shutdown_timeout`.
pub fn spawn(
    config: ExportConfig,
    stats: Arc<ExportStats>,
) -> anyhow::Result<(SpanSender, tokio::task::JoinHandle<()>)> {
    let client = http_client(&config)?;
    let recycler = Recycler::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<SpanBatch>();
    let queue = Arc::new(QueueBound {
        queued: AtomicUsize::new(0),
        capacity: config.queue_capacity.max(1),
        queued_bytes: AtomicUsize::new(0),
        capacity_bytes: config.queue_bytes.max(BATCH_BYTES),
    });
    // One limiter a message: with one for both, a retry warning silenced the first drops'.
    let log_every = Duration::from_secs(10);
    let shutdown_timeout = config.shutdown_timeout;
    let batch_size = config.batch_size.max(1);
    let batch_timeout = config.batch_timeout;
    let mut exporter = Exporter {
        poster: Arc::new(Poster {
            config,
            client,
            stats: stats.clone(),
            limiter: Arc::new(LogLimiter::new(log_every)),
        }),
        encoder: Encoder::default(),
        in_flight: tokio::task::JoinSet::new(),
        recycler: recycler.clone(),
        senders: tx.downgrade(),
    };
    let bound = queue.clone();
    let handle = tokio::spawn(async move {
        // Drain batches received and not yet delivered. A request takes whole drain batches
        // (so it holds `batch_size` spans or up to one drain's worth more): no span is copied
        // on its way to the request body.
        let mut waiting: Vec<SpanBatch> = Vec::new();
        let mut closed = false;
        while !closed {
            if waiting.is_empty() {
                match rx.recv().await {
                    Some(batch) => waiting.push(batch),
                    None => break,
                }
            }
            let mut spans = span_count(&waiting);
            let flush_at = tokio::time::Instant::now() + batch_timeout;
            while spans < batch_size {
                match tokio::time::timeout_at(flush_at, rx.recv()).await {
                    Ok(Some(batch)) => {
                        spans += batch.len();
                        waiting.push(batch);
                    }
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let deadline = closed.then(|| Instant::now() + shutdown_timeout);
            bound.taken(&waiting);
            exporter
                .launch(std::mem::take(&mut waiting), deadline)
                .await;
        }
        // Shutdown: whatever is still queued gets one bounded chance.
        let deadline = Instant::now() + shutdown_timeout;
        while let Ok(batch) = rx.try_recv() {
            waiting.push(batch);
        }
        let mut rest = waiting.into_iter().peekable();
        while rest.peek().is_some() {
            let mut part = Vec::new();
            let mut spans = 0;
            while spans < batch_size {
                let Some(batch) = rest.next() else { break };
                spans += batch.len();
                part.push(batch);
            }
            bound.taken(&part);
            exporter.launch(part, Some(deadline)).await;
        }
        exporter.finish().await;
    });
    Ok((
        SpanSender {
            tx,
            recycler,
            queue,
            stats,
            limiter: Arc::new(LogLimiter::new(log_every)),
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

/// An endpoint's URL as the metrics name it: without credentials (`user:password@`) or a query.
pub fn endpoint_label(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit('@').next().unwrap_or(authority);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
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
    fn request_bodies_come_back_once_every_holder_is_done() {
        let recycler = Recycler::default();
        let mut body = recycler.body();
        body.extend_from_slice(&[7; 4096]);
        let (at, capacity) = (body.as_ptr(), body.capacity());
        let sent = recycler.share(body);
        let retry = sent.clone();
        drop(sent);
        assert!(lock(&recycler.bodies).is_empty(), "a retry still holds it");
        assert_eq!(&retry[..], &[7; 4096][..]);
        drop(retry);
        let again = recycler.body();
        assert_eq!(
            (again.as_ptr(), again.capacity(), again.len()),
            (at, capacity, 0)
        );
    }

    #[test]
    fn drain_batches_come_back_empty_and_the_pool_is_bounded() {
        let recycler = Recycler::default();
        let resource = Arc::new(ExportResource::new(Resource::default()));
        let mut name = String::new();
        let batches: Vec<SpanBatch> = (0..KEEP_BATCHES + 5)
            .map(|_| {
                let mut b = recycler.batch(&resource);
                b.push(&span("/a"), &mut name);
                b
            })
            .collect();
        recycler.return_batches(batches.into_iter());
        assert_eq!(lock(&recycler.batches).len(), KEEP_BATCHES);
        // Every span's hold on its resource went with it.
        assert_eq!(Arc::strong_count(&resource), 1);
        let b = recycler.batch(&resource);
        assert!(b.is_empty() && b.bytes_len() == 0);
        assert!(b.bytes.capacity() >= BATCH_BYTES);
    }

    fn sender(queue_bytes: usize) -> (SpanSender, mpsc::UnboundedReceiver<SpanBatch>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(QueueBound {
            queued: AtomicUsize::new(0),
            capacity: usize::MAX,
            queued_bytes: AtomicUsize::new(0),
            capacity_bytes: queue_bytes,
        });
        let sender = SpanSender {
            tx,
            recycler: Recycler::default(),
            queue,
            stats: Arc::default(),
            limiter: Arc::new(LogLimiter::new(Duration::from_secs(10))),
        };
        (sender, rx)
    }

    /// With the collector down, drains of a span or two each must not hold a drain batch's
    /// full buffers each: 1,000 of them would take 60 MiB.
    #[test]
    fn small_drains_wait_in_buffers_of_their_size() {
        let (sender, mut rx) = sender(1024 * 1024);
        let resource = resource("a");
        for i in 0..1000 {
            let mut b = sender.recycler.batch(&resource);
            b.push(&span(&format!("/{i}")), &mut String::new());
            sender.send(b);
        }
        assert_eq!(sender.stats.dropped_queue_full.load(Relaxed), 0);
        let queued = sender.queue.queued_bytes.load(Relaxed);
        assert!(queued < 1024 * 1024, "{queued} bytes queued");
        // The drain's buffers came back each time, to be reused by the next drain.
        let pool = lock(&sender.recycler.batches);
        assert_eq!(pool.len(), 1);
        assert!(pool[0].bytes.capacity() >= BATCH_BYTES && pool[0].is_empty());
        drop(pool);
        let mut got = 0;
        while let Ok(b) = rx.try_recv() {
            assert_eq!(
                b.memory(),
                b.bytes_len() + b.len() * 4,
                "buffers of their size"
            );
            got += b.len();
        }
        assert_eq!(got, 1000);
    }

    /// Past the memory bound, spans are dropped and counted; what is queued stays within it
    /// (give or take the last batch's unused room).
    #[test]
    fn the_queue_is_bounded_in_memory() {
        let bound = 4 * BATCH_BYTES;
        let (sender, mut rx) = sender(bound);
        let resource = resource("a");
        let mut sent = 0;
        for _ in 0..10 {
            let mut b = sender.recycler.batch(&resource);
            while b.bytes_len() < OUTBOX_BYTES {
                b.push(&span("/full"), &mut String::new());
            }
            sent += b.len();
            sender.send(b);
        }
        let queued = sender.queue.queued_bytes.load(Relaxed);
        assert!(queued <= bound + BATCH_BYTES, "{queued} bytes queued");
        let mut got = 0;
        while let Ok(b) = rx.try_recv() {
            got += b.len();
        }
        let dropped = sender.stats.dropped_queue_full.load(Relaxed) as usize;
        assert!(dropped > 0 && got > 0);
        assert_eq!(got + dropped, sent);
    }

    #[test]
    fn traces_url_appends_the_signal_path() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
    }

    fn span(path: &str) -> Span {
        use crate::pairing::{Exchange, Role};
        let exchange = Exchange {
            conn: 1,
            role: Role::Server,
            detail: crate::protocol::Detail::Http(crate::protocol::http::Detail {
                request: crate::protocol::http::head::RequestText::new("GET", path, None, None),
                status: Some(200),
            }),
            start_ns: 1,
            end_ns: 2,
            request_bytes: 3,
            response_bytes: 4,
            span: 0,
            tcp_seq: None,
        };
        let ends = Arc::new(crate::spans::Endpoints::new(
            "127.0.0.1:80".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
        ));
        Span::new(exchange, ends, None, |t| t)
    }

    fn resource(service: &str) -> Arc<ExportResource> {
        Arc::new(ExportResource::new(Resource {
            attributes: vec![crate::resource::kv_str("service.name", service)],
            ..Default::default()
        }))
    }

    /// `items` in batches of one resource each, as the drain makes them.
    fn batches(items: &[(&Arc<ExportResource>, &Span)]) -> Vec<SpanBatch> {
        let mut batches: Vec<SpanBatch> = Vec::new();
        for (resource, span) in items {
            let i = match batches.iter().position(|b| b.is_for(resource)) {
                Some(i) => i,
                None => {
                    batches.push(SpanBatch::new((*resource).clone()));
                    batches.len() - 1
                }
            };
            batches[i].push(span, &mut String::new());
        }
        batches
    }

    /// The request the agent must send for `items`, built from `prost` structs alone.
    fn expected(groups: &[(&Arc<ExportResource>, Vec<&Span>)]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: groups
                .iter()
                .map(|(resource, spans)| ResourceSpans {
                    resource: Some(resource.proto.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(scope()),
                        spans: spans.iter().map(|s| s.to_proto()).collect(),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn spans_are_grouped_by_resource() {
        let (a, b) = (resource("a"), resource("b"));
        let (one, two, three) = (span("/one"), span("/two"), span("/three"));
        let parts = batches(&[(&a, &one), (&b, &two), (&a, &three)]);
        let req = build_request(&parts).unwrap();
        assert_eq!(req, expected(&[(&a, vec![&one, &three]), (&b, vec![&two])]));
    }

    #[test]
    fn direct_protobuf_is_the_request_prost_would_send() {
        let (a, b) = (resource("a"), resource("b"));
        let spans = [span("/1"), span("/2"), span("/3/4")];
        let parts = batches(&[(&a, &spans[0]), (&b, &spans[1]), (&a, &spans[2])]);
        let want = expected(&[(&a, vec![&spans[0], &spans[2]]), (&b, vec![&spans[1]])]);
        let mut encoder = Encoder::default();
        for _ in 0..2 {
            let body = encoder.protobuf(&parts);
            let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
            assert_eq!(decoded, want);
        }
    }

    /// A request made of several drains' batches groups their spans by resource across them,
    /// and a batch cut short by a full queue keeps whole spans.
    #[test]
    fn requests_span_batches_and_truncation_keeps_whole_spans() {
        let (a, b) = (resource("a"), resource("b"));
        let spans: Vec<Span> = (0..5).map(|i| span(&format!("/{i}"))).collect();
        let mut parts = batches(&[(&a, &spans[0]), (&b, &spans[1])]);
        let mut second = batches(&[(&a, &spans[2]), (&b, &spans[3]), (&a, &spans[4])]);
        second[0].truncate(1);
        parts.append(&mut second);
        let want = expected(&[
            (&a, vec![&spans[0], &spans[2]]),
            (&b, vec![&spans[1], &spans[3]]),
        ]);
        assert_eq!(build_request(&parts).unwrap(), want);
        let body = Encoder::default().protobuf(&parts);
        assert_eq!(
            ExportTraceServiceRequest::decode(body.as_slice()).unwrap(),
            want
        );
    }

    /// Spans of every size keep a correct length in front: two bytes are left for it, and a
    /// span longer than 16 KiB (a varint of three bytes) moves to fit.
    #[test]
    fn span_lengths_of_two_and_three_bytes() {
        let a = resource("a");
        let (one, two) = (span("/1"), span("/2"));
        let long = span(&format!("/{}", "x".repeat(20_000)));
        let mut batch = SpanBatch::new(a.clone());
        batch.push(&one, &mut String::new());
        batch.push(&long, &mut String::new());
        batch.push(&two, &mut String::new());
        let want = expected(&[(&a, vec![&one, &long, &two])]);
        // Compared without printing the 20 KB span on a failure.
        assert!(build_request(std::slice::from_ref(&batch)).unwrap() == want);
    }

    /// The body the exporter sends (heads, then the batches' own bytes) is the request; the
    /// batches return to the pool once every holder of the body is done.
    #[test]
    fn the_body_is_sent_from_the_batches_themselves() {
        let (a, b) = (resource("a"), resource("b"));
        let spans: Vec<Span> = (0..4).map(|i| span(&format!("/{i}"))).collect();
        let mut parts = batches(&[(&a, &spans[0]), (&b, &spans[1])]);
        parts.append(&mut batches(&[(&a, &spans[2]), (&b, &spans[3])]));
        let want = Encoder::default().protobuf(&parts);
        let recycler = Recycler::default();
        let payload = Encoder::default().protobuf_chunks(parts, &recycler);
        let chunks = &payload.chunks;
        assert_eq!(chunks.len(), 2 + 4, "a head a resource, and each batch");
        let retry = payload.clone();
        drop(payload);
        assert!(
            lock(&recycler.batches).is_empty(),
            "a retry still holds them"
        );
        let sent: Vec<u8> = retry
            .chunks
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        assert_eq!(retry.len, sent.len() as u64);
        assert_eq!(sent, want);
        let request = ExportTraceServiceRequest::decode(sent.as_slice()).unwrap();
        assert_eq!(request.resource_spans.len(), 2);
        drop(retry);
        assert_eq!(lock(&recycler.batches).len(), 4);
    }
}
