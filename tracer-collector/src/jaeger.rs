//! The Jaeger HTTP query API (`/api/...`) with Jaeger's JSON shapes, so the Jaeger UI, Grafana's
//! Jaeger data source and our own UI and CLI all work against the collector.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::SystemTime,
};

use axum::{
    extract::{Path, Query, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use tracer_store::{kind, status, AttrValue, KeyValue, SpanStore, TraceId, TraceQuery};

use crate::stitch::{self, Stitched};

pub struct Api {
    pub store: Arc<dyn SpanStore>,
    /// What one answer holds at most (`--max-trace-spans`, `--max-trace-mib`).
    pub limits: stitch::Limits,
    /// Traces answered without all their spans (`/metrics`).
    pub traces_truncated: Arc<AtomicU64>,
}

impl Api {
    fn count_truncated<'a>(&self, traces: impl IntoIterator<Item = &'a Stitched>) {
        let n = traces.into_iter().filter(|t| t.truncated).count() as u64;
        self.traces_truncated.fetch_add(n, Relaxed);
    }
}

type ApiResult = Result<Response, ApiError>;

#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"data": null, "total": 0, "limit": 0, "offset": 0,
                          "errors": [{"code": self.0.as_u16(), "msg": self.1}]});
        (self.0, Json(body)).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn envelope(data: Value, total: usize) -> Response {
    Json(json!({"data": data, "total": total, "limit": 0, "offset": 0, "errors": null}))
        .into_response()
}

/// Runs a store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, tracer_store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn tag(kv: &KeyValue) -> Value {
    let (t, v) = match &kv.value {
        AttrValue::Str(s) | AttrValue::Json(s) => ("string", json!(s)),
        AttrValue::Int(i) => ("int64", json!(i)),
        AttrValue::Float(f) => ("float64", json!(f)),
        AttrValue::Bool(b) => ("bool", json!(b)),
    };
    json!({"key": kv.key, "type": t, "value": v})
}

fn str_tag(key: &str, value: &str) -> Value {
    json!({"key": key, "type": "string", "value": value})
}

/// Sets `key` to `list` unless it is empty: Jaeger's optional lists (`omitempty`) are left out
/// when empty, never null.
fn set_list(obj: &mut Value, key: &str, list: Vec<Value>) {
    if !list.is_empty() {
        obj[key] = Value::Array(list);
    }
}

fn warnings(w: &[String]) -> Vec<Value> {
    w.iter().map(|s| json!(s)).collect()
}

/// One stitched trace in Jaeger's shape: spans plus a process table (one per service +
/// resource), and the trace's warnings and completeness.
/// A hash of a process's identity: its service and resource attributes.
fn process_hash(service: &str, resource: &[KeyValue]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    service.hash(&mut h);
    for kv in resource {
        kv.key.hash(&mut h);
        match &kv.value {
            AttrValue::Str(v) | AttrValue::Json(v) => v.hash(&mut h),
            AttrValue::Int(v) => v.hash(&mut h),
            AttrValue::Float(v) => v.to_bits().hash(&mut h),
            AttrValue::Bool(v) => v.hash(&mut h),
        }
    }
    h.finish()
}

pub fn trace_json(trace: &Stitched) -> Value {
    let mut processes: Vec<(&str, &Vec<KeyValue>)> = Vec::new();
    // Processes by a hash of their service and resource, each bucket compared in full: a
    // linear search over all processes made a trace of 16,000 spans with distinct resources
    // take 4.1 s (quadratic).
    let mut by_hash: std::collections::HashMap<u64, Vec<usize>> = std::collections::HashMap::new();
    let mut out_spans = Vec::with_capacity(trace.spans.len());
    for stitched in &trace.spans {
        let s = &stitched.span;
        let bucket = by_hash
            .entry(process_hash(&s.service, &s.resource))
            .or_default();
        let found = bucket.iter().copied().find(|&i| {
            let (svc, res) = processes[i];
            svc == s.service && *res == *s.resource
        });
        let idx = found.unwrap_or_else(|| {
            processes.push((&s.service, &s.resource));
            bucket.push(processes.len() - 1);
            processes.len() - 1
        });
        let mut tags: Vec<Value> = s.attributes.iter().map(tag).collect();
        if let Some(k) = kind::name(s.kind) {
            tags.push(str_tag("span.kind", k));
        }
        match s.status_code {
            status::ERROR => {
                tags.push(json!({"key": "error", "type": "bool", "value": true}));
                tags.push(str_tag("otel.status_code", "ERROR"));
                if !s.status_message.is_empty() {
                    tags.push(str_tag("otel.status_description", &s.status_message));
                }
            }
            status::OK => tags.push(str_tag("otel.status_code", "OK")),
            _ => {}
        }
        if !s.scope_name.is_empty() {
            tags.push(str_tag("otel.scope.name", &s.scope_name));
        }
        let mut references: Vec<Value> = Vec::new();
        if let Some(p) = s.parent_span_id {
            references.push(json!({"refType": "CHILD_OF", "traceID": hex::encode(s.trace_id), "spanID": hex::encode(p)}));
        }
        for l in &s.links {
            references.push(json!({"refType": "FOLLOWS_FROM", "traceID": hex::encode(l.trace_id), "spanID": hex::encode(l.span_id)}));
        }
        let logs: Vec<Value> = s
            .events
            .iter()
            .map(|e| {
                let mut fields = vec![str_tag("event", &e.name)];
                fields.extend(e.attributes.iter().map(tag));
                json!({"timestamp": e.time_unix_nano / 1000, "fields": fields})
            })
            .collect();
        // Start and end each rounded down to the microsecond, the duration their difference:
        // rounding the duration on its own could end a span up to 1 µs after a parent that
        // ends after it in nanoseconds (seen in tests/topology.rs's containment check).
        let start_us = s.start_unix_nano / 1000;
        let end_us = s.start_unix_nano.saturating_add(s.duration_nano) / 1000;
        let mut span = json!({
            "traceID": hex::encode(s.trace_id),
            "spanID": hex::encode(s.span_id),
            "operationName": s.operation,
            "startTime": start_us,
            "duration": end_us - start_us,
            "processID": format!("p{}", idx + 1),
            "flags": 1,
        });
        set_list(&mut span, "references", references);
        set_list(&mut span, "tags", tags);
        set_list(&mut span, "logs", logs);
        set_list(&mut span, "warnings", warnings(&stitched.warnings));
        out_spans.push(span);
    }
    let processes: serde_json::Map<String, Value> = processes
        .iter()
        .enumerate()
        .map(|(i, (svc, res))| {
            let tags: Vec<Value> = res
                .iter()
                .filter(|kv| kv.key != "service.name")
                .map(tag)
                .collect();
            let mut process = json!({ "serviceName": svc });
            set_list(&mut process, "tags", tags);
            (format!("p{}", i + 1), process)
        })
        .collect();
    let mut out = json!({
        "traceID": hex::encode(trace.trace_id),
        "spans": out_spans,
        "processes": processes,
        "incomplete": trace.incomplete(),
        "incompleteReasons": trace.incomplete_reasons,
    });
    set_list(&mut out, "warnings", warnings(&trace.warnings));
    out
}

async fn services(State(api): State<Arc<Api>>) -> ApiResult {
    let store = api.store.clone();
    let list = blocking(move || store.services()).await?;
    let n = list.len();
    Ok(envelope(json!(list), n))
}

async fn service_operations(State(api): State<Arc<Api>>, Path(service): Path<String>) -> ApiResult {
    let store = api.store.clone();
    let ops = blocking(move || store.operations(&service, None)).await?;
    let mut names: Vec<String> = ops.into_iter().map(|o| o.name).collect();
    names.dedup();
    let n = names.len();
    Ok(envelope(json!(names), n))
}

/// `/api/operations?service=&spanKind=`: the newer endpoint with kinds.
async fn operations(
    State(api): State<Arc<Api>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let service = q
        .get("service")
        .cloned()
        .ok_or_else(|| bad("the service parameter is required"))?;
    let want = match q.get("spanKind").map(String::as_str) {
        None | Some("") => None,
        Some("server") => Some(kind::SERVER),
        Some("client") => Some(kind::CLIENT),
        Some("producer") => Some(kind::PRODUCER),
        Some("consumer") => Some(kind::CONSUMER),
        Some("internal") => Some(kind::INTERNAL),
        Some(other) => return Err(bad(format!("unknown spanKind {other:?}"))),
    };
    let store = api.store.clone();
    let ops = blocking(move || store.operations(&service, want)).await?;
    let data: Vec<Value> = ops
        .iter()
        .map(|o| json!({"name": o.name, "spanKind": kind::name(o.kind).unwrap_or("")}))
        .collect();
    let n = data.len();
    Ok(envelope(json!(data), n))
}

/// Parses Jaeger/Go durations: `1.5ms`, `200us`, `2s`, `1m`, `1h`, `500ns`, `1h30m`.
pub fn parse_duration_nanos(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_end == 0 {
            return None;
        }
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Some(total as u64)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Builds a store query from Jaeger's parameters (which may repeat: `tag=k:v&tag=k2:v2`).
pub fn trace_query(raw: &str) -> Result<TraceQuery, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| bad(format!("the query string is not valid: {e}")))?;
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let mut q = TraceQuery {
        service: get("service").map(str::to_owned),
        operation: get("operation").filter(|o| *o != "all").map(str::to_owned),
        limit: 20,
        ..Default::default()
    };
    if let Some(l) = get("limit") {
        q.limit = l
            .parse()
            .map_err(|_| bad(format!("limit {l:?} is not a number")))?;
    }
    q.limit = q.limit.clamp(1, 1500);
    let dur = |k: &str| -> Result<Option<u64>, ApiError> {
        get(k)
            .map(|v| {
                parse_duration_nanos(v).ok_or_else(|| {
                    bad(format!(
                        "{k} {v:?} is not a duration like 1.5ms, 200us or 2s"
                    ))
                })
            })
            .transpose()
    };
    q.min_duration_nano = dur("minDuration")?;
    q.max_duration_nano = dur("maxDuration")?;
    if let (Some(min), Some(max)) = (q.min_duration_nano, q.max_duration_nano) {
        if max < min {
            return Err(bad("maxDuration must not be less than minDuration"));
        }
    }
    let micros = |k: &str| -> Result<Option<u64>, ApiError> {
        get(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{k} {v:?} is not Unix microseconds")))
            })
            .transpose()
    };
    let end = micros("end")?.unwrap_or_else(now_micros);
    let start = match micros("start")? {
        Some(s) => s,
        None => {
            let lookback = get("lookback").filter(|l| *l != "custom").unwrap_or("1h");
            // The Jaeger UI's choices include days (`2d`, `7d`), which Go durations lack.
            let days = lookback
                .strip_suffix('d')
                .and_then(|d| d.parse::<u64>().ok())
                .map(|d| d.saturating_mul(86_400_000_000_000));
            let nanos = days
                .or_else(|| parse_duration_nanos(lookback))
                .ok_or_else(|| bad(format!("lookback {lookback:?} is not a duration")))?;
            end.saturating_sub(nanos / 1000)
        }
    };
    // Microseconds past ~584,000 years would wrap as nanoseconds: refused, not wrapped.
    let nanos = |us: u64, what: &str| {
        us.checked_mul(1000)
            .ok_or_else(|| bad(format!("{what} {us} is too far in the future")))
    };
    q.start_unix_nano = Some(nanos(start, "start")?);
    q.end_unix_nano = Some(nanos(end, "end")?);
    for (k, v) in &pairs {
        match k.as_str() {
            "tags" if !v.is_empty() => {
                let map: serde_json::Map<String, Value> = serde_json::from_str(v)
                    .map_err(|e| bad(format!("tags must be a JSON object of strings: {e}")))?;
                for (tk, tv) in map {
                    let tv = match tv {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    q.tags.push((tk, tv));
                }
            }
            "tag" => {
                let (tk, tv) = v
                    .split_once(':')
                    .ok_or_else(|| bad(format!("tag {v:?} is not key:value")))?;
                q.tags.push((tk.to_owned(), tv.to_owned()));
            }
            _ => {}
        }
    }
    Ok(q)
}

/// The `traceID` parameters of a search (the Jaeger UI's lookup of several traces by id).
fn trace_ids(raw: &str) -> Result<Vec<TraceId>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| bad(format!("the query string is not valid: {e}")))?;
    pairs
        .iter()
        .filter(|(k, _)| k == "traceID")
        .map(|(_, v)| parse_trace_id(v))
        .collect()
}

async fn find_traces(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> ApiResult {
    let raw = raw.as_deref().unwrap_or("");
    let ids = trace_ids(raw)?;
    if !ids.is_empty() {
        return traces_by_id(&api, ids).await;
    }
    let q = trace_query(raw)?;
    let store = api.store.clone();
    let limits = api.limits;
    let traces = blocking(move || stitch::search(&*store, &q, limits)).await?;
    api.count_truncated(&traces);
    let data: Vec<Value> = traces.iter().map(trace_json).collect();
    let n = data.len();
    Ok(envelope(json!(data), n))
}

/// `/api/traces?traceID=..&traceID=..`: the traces found, and as Jaeger does, one error
/// `{msg, traceID}` for each that is not (with 200: the others are answered).
async fn traces_by_id(api: &Arc<Api>, ids: Vec<TraceId>) -> ApiResult {
    if ids.len() > MAX_TRACE_IDS {
        return Err(bad(format!(
            "at most {MAX_TRACE_IDS} traceID parameters at once"
        )));
    }
    let store = api.store.clone();
    let limits = api.limits;
    let found = blocking(move || {
        ids.into_iter()
            .map(|id| Ok((id, stitch::trace(&*store, &id, limits)?)))
            .collect::<Result<Vec<_>, tracer_store::StoreError>>()
    })
    .await?;
    let mut data = Vec::new();
    let mut errors = Vec::new();
    for (id, trace) in &found {
        match trace {
            Some(t) => data.push(trace_json(t)),
            None => errors.push(json!({"msg": "trace not found", "traceID": hex::encode(id)})),
        }
    }
    api.count_truncated(found.iter().filter_map(|(_, t)| t.as_ref()));
    let total = data.len();
    let errors = if errors.is_empty() {
        Value::Null
    } else {
        json!(errors)
    };
    Ok(
        Json(json!({"data": data, "total": total, "limit": 0, "offset": 0, "errors": errors}))
            .into_response(),
    )
}

/// Traces one lookup by id may ask for: each is a full trace read.
const MAX_TRACE_IDS: usize = 20;

pub fn parse_trace_id(s: &str) -> Result<TraceId, ApiError> {
    let s = s.trim();
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("trace id {s:?} is not up to 32 hex digits")));
    }
    // Jaeger accepts ids without leading zeros.
    let padded = format!("{s:0>32}");
    let mut id = [0u8; 16];
    hex::decode_to_slice(&padded, &mut id).map_err(|e| bad(e.to_string()))?;
    Ok(id)
}

async fn get_trace(State(api): State<Arc<Api>>, Path(id): Path<String>) -> ApiResult {
    let trace_id = parse_trace_id(&id)?;
    let store = api.store.clone();
    let limits = api.limits;
    let trace = blocking(move || stitch::trace(&*store, &trace_id, limits))
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("trace {id} not found")))?;
    api.count_truncated([&trace]);
    Ok(envelope(json!([trace_json(&trace)]), 1))
}

async fn dependencies(
    State(api): State<Arc<Api>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let num = |k: &str, default: u64| -> Result<u64, ApiError> {
        q.get(k).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| bad(format!("{k} {v:?} is not milliseconds")))
        })
    };
    let end_ms = num("endTs", now_micros() / 1000)?;
    let lookback_ms = num("lookback", 24 * 3600 * 1000)?;
    let nanos = |ms: u64, what: &str| {
        ms.checked_mul(1_000_000)
            .ok_or_else(|| bad(format!("{what} {ms} ms is too large")))
    };
    let (end_ns, lookback_ns) = (nanos(end_ms, "endTs")?, nanos(lookback_ms, "lookback")?);
    let store = api.store.clone();
    let links = blocking(move || store.dependencies(end_ns, lookback_ns)).await?;
    // Jaeger's `service` parameter: the links it takes part in.
    let service = q.get("service").filter(|s| !s.is_empty());
    let data: Vec<Value> = links
        .iter()
        .filter(|l| service.is_none_or(|s| l.parent == *s || l.child == *s))
        .map(|l| {
            json!({
                "parent": l.parent,
                "child": l.child,
                "callCount": l.call_count,
                "errorCount": l.error_count,
                "avgDurationMicros": l.avg_duration_nano as f64 / 1000.0,
                "p95DurationMicros": l.p95_duration_nano as f64 / 1000.0,
            })
        })
        .collect();
    let n = data.len();
    Ok(envelope(json!(data), n))
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such API endpoint".into())
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route(
            "/api/services/{service}/operations",
            get(service_operations),
        )
        .route("/api/operations", get(operations))
        .route("/api/traces", get(find_traces))
        .route("/api/traces/{id}", get(get_trace))
        .route("/api/dependencies", get(dependencies))
        .route("/api/{*rest}", get(not_found))
        .with_state(api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stitch::StitchedSpan;
    use tracer_store::SpanRecord;

    #[test]
    fn durations_parse_like_jaeger() {
        assert_eq!(parse_duration_nanos("1.5ms"), Some(1_500_000));
        assert_eq!(parse_duration_nanos("200us"), Some(200_000));
        assert_eq!(parse_duration_nanos("2s"), Some(2_000_000_000));
        assert_eq!(parse_duration_nanos("1h30m"), Some(5_400_000_000_000));
        assert_eq!(parse_duration_nanos("abc"), None);
        assert_eq!(parse_duration_nanos("5"), None);
    }

    #[test]
    fn queries_parse_tags_in_both_forms() {
        let q = trace_query("service=nginx&operation=GET%20%2Fok&tags=%7B%22http.response.status_code%22%3A%22404%22%7D&tag=a:b&limit=5&start=1000&end=2000&minDuration=1ms").unwrap();
        assert_eq!(q.service.as_deref(), Some("nginx"));
        assert_eq!(q.operation.as_deref(), Some("GET /ok"));
        assert_eq!(
            q.tags,
            vec![
                ("http.response.status_code".into(), "404".into()),
                ("a".into(), "b".into())
            ]
        );
        assert_eq!(
            (q.limit, q.start_unix_nano, q.end_unix_nano),
            (5, Some(1_000_000), Some(2_000_000))
        );
        assert_eq!(q.min_duration_nano, Some(1_000_000));
        assert!(trace_query("minDuration=fast").is_err());
        assert!(trace_query("minDuration=2ms&maxDuration=1ms").is_err());
        let q = trace_query("lookback=2d&end=200000000000").unwrap();
        assert_eq!(
            q.start_unix_nano,
            Some(200_000_000_000_000 - 2 * 86_400_000_000_000)
        );
    }

    #[test]
    fn a_child_inside_its_parent_in_nanoseconds_is_inside_in_microseconds() {
        let span = |id: u8, start_unix_nano: u64, duration_nano: u64| StitchedSpan {
            span: SpanRecord {
                trace_id: [1; 16],
                span_id: [id; 8],
                parent_span_id: (id == 2).then_some([1; 8]),
                service: "svc".into(),
                operation: "op".into(),
                kind: 2,
                start_unix_nano,
                duration_nano,
                status_code: 0,
                status_message: String::new(),
                attributes: Vec::new(),
                resource: Arc::new(Vec::new()),
                events: Vec::new(),
                links: Vec::new(),
                scope_name: String::new(),
                scope_version: String::new(),
            },
            warnings: Vec::new(),
        };
        // The parent ends at 1,001,998 ns, the child at 1,001,000: each duration rounded down
        // on its own ended the parent at 1,000 µs and the child at 1,001.
        let trace = Stitched {
            trace_id: [1; 16],
            spans: vec![span(1, 999_999, 1_999), span(2, 1_000_000, 1_000)],
            warnings: Vec::new(),
            incomplete_reasons: Vec::new(),
            members: Vec::new(),
            truncated: false,
        };
        let json = trace_json(&trace);
        let ends: Vec<u64> = json["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["startTime"].as_u64().unwrap() + s["duration"].as_u64().unwrap())
            .collect();
        assert_eq!(ends, [1_001, 1_001], "{json}");
    }

    #[test]
    fn trace_ids_accept_short_forms() {
        assert_eq!(parse_trace_id("1").unwrap()[15], 1);
        assert!(parse_trace_id("xyz").is_err());
        assert!(parse_trace_id(&"a".repeat(33)).is_err());
    }
}
