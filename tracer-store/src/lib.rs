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

impl AttrValue {
    pub fn as_ref(&self) -> AttrValueRef<'_> {
        match self {
            AttrValue::Str(s) => AttrValueRef::Str(s),
            AttrValue::Int(i) => AttrValueRef::Int(*i),
            AttrValue::Float(f) => AttrValueRef::Float(*f),
            AttrValue::Bool(b) => AttrValueRef::Bool(*b),
            AttrValue::Json(s) => AttrValueRef::Json(s),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: AttrValue,
}

impl KeyValue {
    pub fn as_ref(&self) -> KeyValueRef<'_> {
        KeyValueRef {
            key: &self.key,
            value: self.value.as_ref(),
        }
    }
}

/// An [`AttrValue`] borrowed from where it was decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttrValueRef<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Json(&'a str),
}

impl AttrValueRef<'_> {
    pub fn into_owned(self) -> AttrValue {
        match self {
            AttrValueRef::Str(s) => AttrValue::Str(s.to_owned()),
            AttrValueRef::Int(i) => AttrValue::Int(i),
            AttrValueRef::Float(f) => AttrValue::Float(f),
            AttrValueRef::Bool(b) => AttrValue::Bool(b),
            AttrValueRef::Json(s) => AttrValue::Json(s.to_owned()),
        }
    }

    /// As [`AttrValue::as_text`], borrowing when the value is text already.
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match *self {
            AttrValueRef::Str(s) | AttrValueRef::Json(s) => s.into(),
            AttrValueRef::Int(i) => i.to_string().into(),
            AttrValueRef::Float(f) => f.to_string().into(),
            AttrValueRef::Bool(b) => if b { "true" } else { "false" }.into(),
        }
    }
}

/// A [`KeyValue`] borrowed from where it was decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyValueRef<'a> {
    pub key: &'a str,
    pub value: AttrValueRef<'a>,
}

impl KeyValueRef<'_> {
    pub fn into_owned(self) -> KeyValue {
        KeyValue {
            key: self.key.to_owned(),
            value: self.value.into_owned(),
        }
    }
}

fn owned_attrs(attrs: &[KeyValueRef<'_>]) -> Vec<KeyValue> {
    attrs.iter().map(|kv| kv.into_owned()).collect()
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

impl SpanRecord {
    /// About what the span takes in memory and in a JSON answer, its shared resource aside:
    /// what [`TraceLimit::max_bytes`] counts.
    pub fn approx_bytes(&self) -> usize {
        fn attrs(a: &[KeyValue]) -> usize {
            a.iter()
                .map(|kv| {
                    32 + kv.key.len()
                        + match &kv.value {
                            AttrValue::Str(s) | AttrValue::Json(s) => s.len(),
                            _ => 8,
                        }
                })
                .sum()
        }
        128 + self.service.len()
            + self.operation.len()
            + self.status_message.len()
            + self.scope_name.len()
            + self.scope_version.len()
            + attrs(&self.attributes)
            + self
                .events
                .iter()
                .map(|e| 32 + e.name.len() + attrs(&e.attributes))
                .sum::<usize>()
            + self
                .links
                .iter()
                .map(|l| 48 + attrs(&l.attributes))
                .sum::<usize>()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanEventRef<'a> {
    pub time_unix_nano: u64,
    pub name: &'a str,
    pub attributes: &'a [KeyValueRef<'a>],
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanLinkRef<'a> {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub attributes: &'a [KeyValueRef<'a>],
}

/// A [`SpanRecord`] borrowed from where it was decoded (an OTLP body), for
/// [`SpanStore::write_refs`]: storing it needs no `String` per attribute. Spans of one resource
/// share its slice, as records share their `Arc`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanRef<'a> {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub service: &'a str,
    pub operation: &'a str,
    pub kind: i32,
    pub start_unix_nano: u64,
    pub duration_nano: u64,
    pub status_code: i32,
    pub status_message: &'a str,
    pub attributes: &'a [KeyValueRef<'a>],
    pub resource: &'a [KeyValueRef<'a>],
    pub events: &'a [SpanEventRef<'a>],
    pub links: &'a [SpanLinkRef<'a>],
    pub scope_name: &'a str,
    pub scope_version: &'a str,
}

impl SpanRef<'_> {
    /// The owned record; `resource` becomes the record's (pass the same `Arc` to spans that
    /// share a resource).
    pub fn to_record(&self, resource: Arc<Vec<KeyValue>>) -> SpanRecord {
        SpanRecord {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id: self.parent_span_id,
            service: self.service.to_owned(),
            operation: self.operation.to_owned(),
            kind: self.kind,
            start_unix_nano: self.start_unix_nano,
            duration_nano: self.duration_nano,
            status_code: self.status_code,
            status_message: self.status_message.to_owned(),
            attributes: owned_attrs(self.attributes),
            resource,
            events: self
                .events
                .iter()
                .map(|e| SpanEvent {
                    time_unix_nano: e.time_unix_nano,
                    name: e.name.to_owned(),
                    attributes: owned_attrs(e.attributes),
                })
                .collect(),
            links: self
                .links
                .iter()
                .map(|l| SpanLink {
                    trace_id: l.trace_id,
                    span_id: l.span_id,
                    attributes: owned_attrs(l.attributes),
                })
                .collect(),
            scope_name: self.scope_name.to_owned(),
            scope_version: self.scope_version.to_owned(),
        }
    }
}

/// Owned records as [`SpanRef`]s, for `f`: every attribute list of the batch borrowed into one
/// `Vec` (no allocation per span).
pub fn with_span_refs<T>(spans: &[SpanRecord], f: impl FnOnce(&[SpanRef<'_>]) -> T) -> T {
    let mut kvs: Vec<KeyValueRef<'_>> = Vec::new();
    // Per span: where its attributes, resource, event and link attributes start in `kvs`.
    let mut resource_at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> =
        Vec::with_capacity(spans.len());
    let mut last_resource: Option<(&Arc<Vec<KeyValue>>, std::ops::Range<usize>)> = None;
    for s in spans {
        let at = kvs.len();
        kvs.extend(s.attributes.iter().map(KeyValue::as_ref));
        for e in &s.events {
            kvs.extend(e.attributes.iter().map(KeyValue::as_ref));
        }
        for l in &s.links {
            kvs.extend(l.attributes.iter().map(KeyValue::as_ref));
        }
        let res = match &last_resource {
            Some((r, range)) if Arc::ptr_eq(r, &s.resource) => range.clone(),
            _ => {
                let r_at = kvs.len();
                kvs.extend(s.resource.iter().map(KeyValue::as_ref));
                last_resource = Some((&s.resource, r_at..kvs.len()));
                r_at..kvs.len()
            }
        };
        resource_at.push((at..kvs.len(), res));
    }
    let mut events: Vec<SpanEventRef<'_>> = Vec::new();
    let mut links: Vec<SpanLinkRef<'_>> = Vec::new();
    let mut inner_at = Vec::with_capacity(spans.len());
    for (s, (own, _)) in spans.iter().zip(&resource_at) {
        let mut k = own.start + s.attributes.len();
        let (e0, l0) = (events.len(), links.len());
        for e in &s.events {
            let n = e.attributes.len();
            events.push(SpanEventRef {
                time_unix_nano: e.time_unix_nano,
                name: &e.name,
                attributes: &kvs[k..k + n],
            });
            k += n;
        }
        for l in &s.links {
            let n = l.attributes.len();
            links.push(SpanLinkRef {
                trace_id: l.trace_id,
                span_id: l.span_id,
                attributes: &kvs[k..k + n],
            });
            k += n;
        }
        inner_at.push((e0..events.len(), l0..links.len()));
    }
    let refs: Vec<SpanRef<'_>> = spans
        .iter()
        .zip(resource_at.iter().zip(&inner_at))
        .map(|(s, ((own, res), (ev, li)))| SpanRef {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_span_id: s.parent_span_id,
            service: &s.service,
            operation: &s.operation,
            kind: s.kind,
            start_unix_nano: s.start_unix_nano,
            duration_nano: s.duration_nano,
            status_code: s.status_code,
            status_message: &s.status_message,
            attributes: &kvs[own.start..own.start + s.attributes.len()],
            resource: &kvs[res.clone()],
            events: &events[ev.clone()],
            links: &links[li.clone()],
            scope_name: &s.scope_name,
            scope_version: &s.scope_version,
        })
        .collect();
    f(&refs)
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

/// The attribute an agent puts on a CLIENT or SERVER span whose request's place in its TCP
/// stream is known: `"<client ip>:<port>><server ip>:<port>#<seq>"`. Both ends of one request
/// carry the same string, so it joins spans that different hosts' agents sent.
pub const EDGE_ATTR: &str = "tracer.tcp.edge";
/// The same sequence number alone (an int), for when NAT or a load balancer changes the
/// addresses each end sees.
pub const SEQ_ATTR: &str = "tracer.tcp.seq";

/// What one end of a TCP request is indexed under (see [`SpanStore::edge_spans`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EdgeKey<'a> {
    /// The whole [`EDGE_ATTR`] string.
    Exact(&'a str),
    /// The [`SEQ_ATTR`] value only.
    Seq(u32),
}

/// The edge keys of a span: only CLIENT and SERVER spans are ends of a request. A sequence
/// number that is not an int in `u32`'s range is ignored (it cannot be a TCP sequence number).
pub fn edge_keys<'a>(span_kind: i32, attrs: &[KeyValueRef<'a>]) -> (Option<&'a str>, Option<u32>) {
    if span_kind != kind::CLIENT && span_kind != kind::SERVER {
        return (None, None);
    }
    let (mut edge, mut seq) = (None, None);
    for kv in attrs {
        match (kv.key, kv.value) {
            (EDGE_ATTR, AttrValueRef::Str(s)) if !s.is_empty() => edge = Some(s),
            (SEQ_ATTR, AttrValueRef::Int(i)) => seq = u32::try_from(i).ok(),
            _ => {}
        }
    }
    (edge, seq)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub name: String,
    pub kind: i32,
}

/// How far apart in start time the two ends of one request are looked for (clocks of two
/// hosts may disagree by up to this much and still be stitched).
pub const EDGE_WINDOW_NANO: u64 = 8_000_000_000;

/// A service-map edge: spans of `child` whose parent span belongs to `parent` (a different
/// service), within the window asked for. A SERVER span whose CLIENT span on another host is
/// known by its [`EDGE_ATTR`] (one of each, as stitched traces link them) counts with that
/// CLIENT span as its parent.
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

/// How much of one trace a read returns at most: the spans that arrived first, until either
/// limit is reached. A client can put any number of spans under one trace id, and each span up
/// to 128 attributes of 4 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceLimit {
    pub max_spans: usize,
    /// Of [`SpanRecord::approx_bytes`], summed.
    pub max_bytes: usize,
}

impl TraceLimit {
    pub const NONE: TraceLimit = TraceLimit {
        max_spans: usize::MAX,
        max_bytes: usize::MAX,
    };
}

/// What [`SpanStore::trace_limited`] read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LimitedTrace {
    /// By start time, like [`SpanStore::trace`].
    pub spans: Vec<SpanRecord>,
    /// Set when the trace has more spans than `spans`.
    pub truncated: bool,
    /// The trace's spans as indexed when `truncated` (it may count a few that retention has
    /// deleted since), else `spans.len()`.
    pub total: usize,
    /// [`SpanRecord::approx_bytes`] of `spans`, summed.
    pub bytes: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Retention {
    /// Spans that started longer ago than this are deleted.
    pub max_age: Option<std::time::Duration>,
    /// The spans that arrived first are deleted until the store (its database and write-ahead
    /// log files) is at most this large.
    pub max_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetentionReport {
    pub deleted_spans: u64,
    /// Operation names dropped because none of their spans is left.
    pub pruned_operations: u64,
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
    /// [`SpanStore::write`] for borrowed spans (what the OTLP protobuf decoder makes); the
    /// default makes owned records of them.
    fn write_refs(&self, spans: &[SpanRef<'_>]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(spans.len());
        let mut last: Option<(&[KeyValueRef<'_>], Arc<Vec<KeyValue>>)> = None;
        for s in spans {
            let resource = match &last {
                Some((r, arc)) if std::ptr::eq(*r, s.resource) => arc.clone(),
                _ => {
                    let arc = Arc::new(owned_attrs(s.resource));
                    last = Some((s.resource, arc.clone()));
                    arc
                }
            };
            records.push(s.to_record(resource));
        }
        self.write(&records)
    }
    /// Every service name, sorted.
    fn services(&self) -> Result<Vec<String>, StoreError>;
    /// Span names of a service (optionally only one kind), sorted by name.
    fn operations(&self, service: &str, kind: Option<i32>) -> Result<Vec<Operation>, StoreError>;
    /// Every span of one trace, by start time; empty if unknown.
    fn trace(&self, trace_id: &TraceId) -> Result<Vec<SpanRecord>, StoreError>;
    /// The first spans of one trace to arrive, within `limit`, by start time. The default
    /// reads the whole trace and keeps its first spans by start.
    fn trace_limited(
        &self,
        trace_id: &TraceId,
        limit: TraceLimit,
    ) -> Result<LimitedTrace, StoreError> {
        let mut spans = self.trace(trace_id)?;
        let total = spans.len();
        let (mut bytes, mut keep) = (0, 0);
        for s in &spans {
            if keep >= limit.max_spans || bytes >= limit.max_bytes {
                break;
            }
            bytes += s.approx_bytes();
            keep += 1;
        }
        spans.truncate(keep);
        Ok(LimitedTrace {
            spans,
            truncated: keep < total,
            total,
            bytes,
        })
    }
    fn find_traces(&self, query: &TraceQuery) -> Result<Vec<Vec<SpanRecord>>, StoreError>;
    /// The ids of the traces [`SpanStore::find_traces`] would return, in the same order,
    /// without loading them.
    fn find_trace_ids(&self, query: &TraceQuery) -> Result<Vec<TraceId>, StoreError>;
    /// The spans indexed under `key` (by [`edge_keys`]) that started within
    /// [`EDGE_WINDOW_NANO`] of `near_unix_nano` (at least; a little more may come back), in
    /// whichever traces they are. The other end of a request is on another host, whose clock
    /// may differ: the window is that tolerance.
    fn edge_spans(
        &self,
        key: EdgeKey<'_>,
        near_unix_nano: u64,
    ) -> Result<Vec<SpanRecord>, StoreError>;
    /// Service-map edges for spans that started in `[end - lookback, end]` (Unix ns).
    fn dependencies(
        &self,
        end_unix_nano: u64,
        lookback_nano: u64,
    ) -> Result<Vec<DependencyLink>, StoreError>;
    fn enforce_retention(&self, policy: &Retention) -> Result<RetentionReport, StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Spans stored under the overflow operation since the store was opened: their service
    /// already had the most operation names a service may have.
    fn operations_overflowed(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: AttrValue) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: v,
        }
    }

    fn record(n: u8, resource: &Arc<Vec<KeyValue>>, events: usize, links: usize) -> SpanRecord {
        let attrs = |k: usize| -> Vec<KeyValue> {
            (0..k)
                .map(|i| kv(&format!("k{n}.{i}"), AttrValue::Int(i as i64)))
                .collect()
        };
        SpanRecord {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent_span_id: n.is_multiple_of(2).then_some([1; 8]),
            service: format!("svc{n}"),
            operation: format!("op{n}"),
            kind: kind::SERVER,
            start_unix_nano: u64::from(n),
            duration_nano: 5,
            status_code: status::ERROR,
            status_message: "m".into(),
            attributes: vec![
                kv("s", AttrValue::Str(format!("v{n}"))),
                kv("f", AttrValue::Float(0.5)),
                kv("b", AttrValue::Bool(true)),
                kv("j", AttrValue::Json("[1]".into())),
            ],
            resource: resource.clone(),
            events: (0..events)
                .map(|e| SpanEvent {
                    time_unix_nano: e as u64,
                    name: format!("e{e}"),
                    attributes: attrs(e),
                })
                .collect(),
            links: (0..links)
                .map(|l| SpanLink {
                    trace_id: [l as u8; 16],
                    span_id: [l as u8; 8],
                    attributes: attrs(l + 1),
                })
                .collect(),
            scope_name: "scope".into(),
            scope_version: String::new(),
        }
    }

    /// Records lent as refs and made owned again are the same records, whatever mix of
    /// events, links and shared or distinct resources a batch has.
    #[test]
    fn span_refs_round_trip_to_the_same_records() {
        let r1 = Arc::new(vec![kv("service.name", AttrValue::Str("a".into()))]);
        let r2 = Arc::new(vec![]);
        let r3 = Arc::new(vec![
            kv("service.name", AttrValue::Str("b".into())),
            kv("host.cpu.count", AttrValue::Int(2)),
        ]);
        let spans = vec![
            record(1, &r1, 0, 0),
            record(2, &r1, 2, 1),
            record(3, &r2, 1, 0),
            record(4, &r3, 0, 3),
            record(5, &r1, 3, 2),
        ];
        let back = with_span_refs(&spans, |refs| {
            assert_eq!(refs.len(), spans.len());
            assert!(std::ptr::eq(refs[0].resource, refs[1].resource));
            refs.iter()
                .zip(&spans)
                .map(|(r, s)| r.to_record(s.resource.clone()))
                .collect::<Vec<_>>()
        });
        assert_eq!(back, spans);
    }

    /// The default `write_refs` hands `write` the same records, sharing resources again.
    #[test]
    fn the_default_write_refs_writes_the_same_records() {
        #[derive(Default)]
        struct Keep(std::sync::Mutex<Vec<SpanRecord>>);
        impl SpanStore for Keep {
            fn write(&self, spans: &[SpanRecord]) -> Result<(), StoreError> {
                self.0.lock().unwrap().extend_from_slice(spans);
                Ok(())
            }
            fn services(&self) -> Result<Vec<String>, StoreError> {
                unimplemented!()
            }
            fn operations(&self, _: &str, _: Option<i32>) -> Result<Vec<Operation>, StoreError> {
                unimplemented!()
            }
            fn trace(&self, _: &TraceId) -> Result<Vec<SpanRecord>, StoreError> {
                unimplemented!()
            }
            fn find_traces(&self, _: &TraceQuery) -> Result<Vec<Vec<SpanRecord>>, StoreError> {
                unimplemented!()
            }
            fn find_trace_ids(&self, _: &TraceQuery) -> Result<Vec<TraceId>, StoreError> {
                unimplemented!()
            }
            fn edge_spans(&self, _: EdgeKey<'_>, _: u64) -> Result<Vec<SpanRecord>, StoreError> {
                unimplemented!()
            }
            fn dependencies(&self, _: u64, _: u64) -> Result<Vec<DependencyLink>, StoreError> {
                unimplemented!()
            }
            fn enforce_retention(&self, _: &Retention) -> Result<RetentionReport, StoreError> {
                unimplemented!()
            }
            fn stats(&self) -> Result<StoreStats, StoreError> {
                unimplemented!()
            }
        }
        let r1 = Arc::new(vec![kv("service.name", AttrValue::Str("a".into()))]);
        let spans = vec![record(1, &r1, 1, 1), record(2, &r1, 0, 2)];
        let store = Keep::default();
        with_span_refs(&spans, |refs| store.write_refs(refs)).unwrap();
        let got = store.0.into_inner().unwrap();
        assert_eq!(got, spans);
        assert!(Arc::ptr_eq(&got[0].resource, &got[1].resource));
    }
}
