//! Span storage for the collector.
//!
//! Ingest and query talk only to [`SpanStore`]; the embedded SQLite store is the default
//! implementation, and a scale-out backend can be added beside it without touching either side.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

mod sqlite;
pub use sqlite::{Durability, SqliteStore, StoreOptions};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// OTLP `SpanKind` values.
pub mod kind {
    pub const UNSPECIFIED: i32 = 0;
    pub const INTERNAL: i32 = 1;
    pub const SERVER: i32 = 2;
    pub const CLIENT: i32 = 3;
    pub const PRODUCER: i32 = 4;
    pub const CONSUMER: i32 = 5;

    /// The lower-case name Jaeger uses (`span.kind` tag, `spanKind`), for a known kind.
    pub fn name(k: i32) -> Option<&'static str> {
        Some(match k {
            SERVER => "server",
            CLIENT => "client",
            PRODUCER => "producer",
            CONSUMER => "consumer",
            INTERNAL => "internal",
            _ => return None,
        })
    }
}

/// OTLP `Status.code` values.
pub mod status {
    pub const UNSET: i32 = 0;
    pub const OK: i32 = 1;
    pub const ERROR: i32 = 2;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Arrays, maps and bytes, rendered as JSON text (what the Jaeger API shows anyway).
    Json(String),
}

impl AttrValue {
    /// The value as text, the way tag filters compare it (`status=404`, `error=true`).
    pub fn as_text(&self) -> String {
        match self {
            AttrValue::Str(s) | AttrValue::Json(s) => s.clone(),
            AttrValue::Int(i) => i.to_string(),
            AttrValue::Float(f) => f.to_string(),
            AttrValue::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: AttrValue,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpanEvent {
    pub time_unix_nano: u64,
    pub name: String,
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpanLink {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub attributes: Vec<KeyValue>,
}

/// One span as stored: OTLP's span plus the service and resource it came with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// `service.name` of the resource (`unknown_service` when absent, as OTel SDKs do).
    pub service: String,
    /// The span name (Jaeger's "operation").
    pub operation: String,
    /// `kind::*`.
    pub kind: i32,
    pub start_unix_nano: u64,
    pub duration_nano: u64,
    /// `status::*`.
    pub status_code: i32,
    pub status_message: String,
    pub attributes: Vec<KeyValue>,
    /// Resource attributes (host and process facts); many spans share one resource, so they
    /// share it by reference too (ingest converts each resource once per request).
    pub resource: Arc<Vec<KeyValue>>,
    pub events: Vec<SpanEvent>,
    pub links: Vec<SpanLink>,
    pub scope_name: String,
    pub scope_version: String,
}

/// A trace search, with Jaeger's semantics: a trace matches when at least one of its spans
/// matches every condition given. Results are whole traces, most recent first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceQuery {
    pub service: Option<String>,
    pub operation: Option<String>,
    /// `key = value` on the span's attributes or its resource's, compared as text; all must hold.
    pub tags: Vec<(String, String)>,
    pub min_duration_nano: Option<u64>,
    pub max_duration_nano: Option<u64>,
    /// Span start window (Unix ns), inclusive.
    pub start_unix_nano: Option<u64>,
    pub end_unix_nano: Option<u64>,
    /// Traces returned at most.
    pub limit: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub name: String,
    pub kind: i32,
}

/// A service-map edge: spans of `child` whose parent span belongs to `parent` (a different
/// service), within the window asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DependencyLink {
    pub parent: String,
    pub child: String,
    pub call_count: u64,
    /// Child spans with error status.
    pub error_count: u64,
    pub avg_duration_nano: u64,
    pub p95_duration_nano: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Retention {
    /// Spans that started longer ago than this are deleted.
    pub max_age: Option<std::time::Duration>,
    /// Oldest spans are deleted until the store is at most this large.
    pub max_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetentionReport {
    pub deleted_spans: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    pub spans: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store's database failed: {0}")]
    Database(String),
    #[error("the store at {path} cannot be used: {reason}")]
    Open { path: String, reason: String },
    #[error(
        "the store was written by a newer version (schema {found}, this build knows up to {known})"
    )]
    NewerSchema { found: u32, known: u32 },
}

/// What the collector needs from a store. Implementations are shared between threads.
pub trait SpanStore: Send + Sync + 'static {
    /// Stores `spans` durably: once this returns `Ok`, a crash (even `kill -9`) loses none of them.
    /// Spans of one trace may come in any order, in any number of calls.
    fn write(&self, spans: &[SpanRecord]) -> Result<(), StoreError>;
    /// Every service name, sorted.
    fn services(&self) -> Result<Vec<String>, StoreError>;
    /// Span names of a service (optionally only one kind), sorted by name.
    fn operations(&self, service: &str, kind: Option<i32>) -> Result<Vec<Operation>, StoreError>;
    /// Every span of one trace, by start time; empty if unknown.
    fn trace(&self, trace_id: &TraceId) -> Result<Vec<SpanRecord>, StoreError>;
    fn find_traces(&self, query: &TraceQuery) -> Result<Vec<Vec<SpanRecord>>, StoreError>;
    /// Service-map edges for spans that started in `[end - lookback, end]` (Unix ns).
    fn dependencies(
        &self,
        end_unix_nano: u64,
        lookback_nano: u64,
    ) -> Result<Vec<DependencyLink>, StoreError>;
    fn enforce_retention(&self, policy: &Retention) -> Result<RetentionReport, StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
}
