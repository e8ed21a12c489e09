//! OTLP spans → store records, with the checks that make a batch acceptable.
//!
//! A batch is all or nothing: if one span is invalid the whole request is rejected with a message
//! naming it, and nothing of it is stored (clients retry or fix the whole batch anyway).
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, KeyValue as OtlpKeyValue},
};
use std::sync::Arc;

use tracer_store::{AttrValue, KeyValue, SpanEvent, SpanId, SpanLink, SpanRecord, TraceId};

/// `service.name` for resources that have none (what the OTel SDKs use).
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// An OTLP value as stored; `None` (no value, or an empty `AnyValue`) is an empty string.
#[inline]
pub(crate) fn attr_value(v: Option<Value>) -> AttrValue {
    match v {
        Some(Value::StringValue(s)) => AttrValue::Str(s),
        Some(Value::IntValue(i)) => AttrValue::Int(i),
        Some(Value::DoubleValue(d)) => AttrValue::Float(d),
        Some(Value::BoolValue(b)) => AttrValue::Bool(b),
        Some(other) => AttrValue::Json(json_value(&other).to_string()),
        None => AttrValue::Str(String::new()),
    }
}

pub(crate) fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::StringValue(s) => s.clone().into(),
        Value::IntValue(i) => (*i).into(),
        Value::DoubleValue(d) => (*d).into(),
        Value::BoolValue(b) => (*b).into(),
        Value::ArrayValue(a) => a
            .values
            .iter()
            .filter_map(|v| v.value.as_ref())
            .map(json_value)
            .collect(),
        Value::KvlistValue(kv) => kv
            .values
            .iter()
            .filter_map(|kv| {
                Some((
                    kv.key.clone(),
                    json_value(kv.value.as_ref()?.value.as_ref()?),
                ))
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Value::BytesValue(b) => hex::encode(b).into(),
        #[allow(unreachable_patterns)]
        _ => serde_json::Value::Null,
    }
}

/// Moves the attributes out of the decoded request: no string is copied.
fn attributes(kvs: Vec<OtlpKeyValue>) -> Vec<KeyValue> {
    capped_attributes(kvs).0
}

/// The attributes with their values capped (`MAX_VALUE_BYTES`), and whether any was cut.
fn capped_attributes(kvs: Vec<OtlpKeyValue>) -> (Vec<KeyValue>, bool) {
    let mut cut = false;
    let kvs = kvs
        .into_iter()
        .map(|kv| {
            let mut value = attr_value(kv.value.and_then(|v| v.value));
            cut |= cap_value(&mut value);
            KeyValue { key: kv.key, value }
        })
        .collect();
    (kvs, cut)
}

pub(crate) fn fixed<const N: usize>(
    bytes: &[u8],
    what: &str,
    span: usize,
) -> Result<[u8; N], String> {
    let id: [u8; N] = bytes.try_into().map_err(|_| {
        format!(
            "span #{span}: {what} must be {N} bytes, got {}",
            bytes.len()
        )
    })?;
    if id.iter().all(|b| *b == 0) {
        return Err(format!(
            "span #{span}: {what} is all zeros (invalid per the OTLP spec)"
        ));
    }
    Ok(id)
}

/// `service.name` of a resource, as text; `unknown_service` when absent or empty.
pub(crate) fn service_name(resource: &[KeyValue]) -> String {
    resource
        .iter()
        .find(|kv| kv.key == "service.name")
        .map(|kv| kv.value.as_text())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| UNKNOWN_SERVICE.to_owned())
}

/// The checks every span must pass (shared by both decoding paths, so their messages are the
/// same): ids of the right length and not all zeros, an empty or valid parent, and no end
/// before the start. `n` is the span's 1-based position in the request.
/// Attributes a span keeps: the rest are dropped and the span says so with
/// `tracer.truncated = true`. A span of 200,000 empty attributes was accepted and made every
/// search that returned it 7.6 MB of JSON.
pub const MAX_SPAN_ATTRIBUTES: usize = 128;
/// Bytes of a span name kept (cut at a character boundary): names are operations, listed and
/// searched.
pub const MAX_NAME_BYTES: usize = 512;
/// The attribute that marks a span cut by the limits above.
pub const TRUNCATED_KEY: &str = "tracer.truncated";

/// Bytes of an attribute's value kept (a string, or an array's or map's JSON text), cut at a
/// character boundary: a span whose one attribute held the whole 4 MiB body was stored, and
/// returned by every search that found it. The span says so with `tracer.truncated = true`.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Where `text` must end to be at most `limit` bytes, at a character boundary.
fn cut_point(text: &str, limit: usize) -> Option<usize> {
    if text.len() <= limit {
        return None;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(end)
}

/// `name` cut to at most `MAX_NAME_BYTES` at a character boundary, and whether it was cut.
pub fn capped_name(name: &str) -> (&str, bool) {
    match cut_point(name, MAX_NAME_BYTES) {
        Some(end) => (&name[..end], true),
        None => (name, false),
    }
}

/// An attribute value cut to at most `MAX_VALUE_BYTES`, and whether it was cut.
pub fn capped_value(value: &str) -> (&str, bool) {
    match cut_point(value, MAX_VALUE_BYTES) {
        Some(end) => (&value[..end], true),
        None => (value, false),
    }
}

/// Cuts a stored value to `MAX_VALUE_BYTES`; true if it was cut.
pub(crate) fn cap_value(value: &mut AttrValue) -> bool {
    match value {
        AttrValue::Str(s) | AttrValue::Json(s) => match cut_point(s, MAX_VALUE_BYTES) {
            Some(end) => {
                s.truncate(end);
                true
            }
            None => false,
        },
        AttrValue::Int(_) | AttrValue::Float(_) | AttrValue::Bool(_) => false,
    }
}

/// How far in the future a span may start. Retention deletes by start time, and a span dated
/// 2^63 ns was never deleted, while spans dated ahead of "now" were evicted last under the size
/// cap (real spans went first) and no search ending "now" found them. A day is more than any
/// clock error a host should have; the collector corrects the skew it can measure anyway.
const MAX_FUTURE_NANOS: u64 = 24 * 3_600_000_000_000;

/// Now, as span times are (Unix ns): read once per request, not per span.
pub(crate) fn unix_now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `(start, end)`: the span's times; `now`: [`unix_now_nanos`] at the request's arrival.
pub(crate) fn check_span(
    n: usize,
    trace_id: &[u8],
    span_id: &[u8],
    parent_span_id: &[u8],
    (start, end): (u64, u64),
    now: u64,
    name: &str,
) -> Result<(TraceId, SpanId, Option<SpanId>), String> {
    let trace_id = fixed::<16>(trace_id, "trace_id", n)?;
    let span_id = fixed::<8>(span_id, "span_id", n)?;
    let parent_span_id = if parent_span_id.is_empty() {
        None
    } else {
        Some(fixed::<8>(parent_span_id, "parent_span_id", n)?)
    };
    if end < start {
        return Err(format!("span #{n} ({name}): ends before it starts"));
    }
    if start > now.saturating_add(MAX_FUTURE_NANOS) {
        return Err(format!(
            "span #{n} ({name}): starts {} h after this collector's clock (more than 24 h): \
             the sender's clock is wrong",
            (start - now) / 3_600_000_000_000
        ));
    }
    Ok((trace_id, span_id, parent_span_id))
}

/// Converts a whole export request, taking its strings rather than copying them. `Err` says
/// what is wrong with the first bad span.
pub fn spans_from_request(req: ExportTraceServiceRequest) -> Result<Vec<SpanRecord>, String> {
    let mut out = Vec::new();
    let mut n = 0usize;
    let now = unix_now_nanos();
    for rs in req.resource_spans {
        // One resource per ResourceSpans, shared by its spans.
        let resource = Arc::new(
            rs.resource
                .map(|r| attributes(r.attributes))
                .unwrap_or_default(),
        );
        let service = service_name(&resource);
        for ss in rs.scope_spans {
            let (scope_name, scope_version) =
                ss.scope.map(|s| (s.name, s.version)).unwrap_or_default();
            for s in ss.spans {
                n += 1;
                let (trace_id, span_id, parent_span_id) = check_span(
                    n,
                    &s.trace_id,
                    &s.span_id,
                    &s.parent_span_id,
                    (s.start_time_unix_nano, s.end_time_unix_nano),
                    now,
                    &s.name,
                )?;
                let (status_code, status_message) = s
                    .status
                    .map_or((0, String::new()), |st| (st.code, st.message));
                let (name, name_cut) = capped_name(&s.name);
                let name_cut = name_cut.then(|| name.to_owned());
                let mut span_attributes = s.attributes;
                let too_many = span_attributes.len() > MAX_SPAN_ATTRIBUTES;
                span_attributes.truncate(MAX_SPAN_ATTRIBUTES);
                let (mut span_attributes, values_cut) = capped_attributes(span_attributes);
                if name_cut.is_some() || too_many || values_cut {
                    span_attributes.push(KeyValue {
                        key: TRUNCATED_KEY.into(),
                        value: AttrValue::Bool(true),
                    });
                }
                out.push(SpanRecord {
                    trace_id,
                    span_id,
                    parent_span_id,
                    service: service.clone(),
                    operation: name_cut.unwrap_or(s.name),
                    kind: s.kind,
                    start_unix_nano: s.start_time_unix_nano,
                    duration_nano: s.end_time_unix_nano - s.start_time_unix_nano,
                    status_code,
                    status_message,
                    attributes: span_attributes,
                    resource: resource.clone(),
                    events: s
                        .events
                        .into_iter()
                        .map(|e| SpanEvent {
                            time_unix_nano: e.time_unix_nano,
                            name: e.name,
                            attributes: attributes(e.attributes),
                        })
                        .collect(),
                    links: s
                        .links
                        .into_iter()
                        .filter_map(|l| {
                            Some(SpanLink {
                                trace_id: l.trace_id.as_slice().try_into().ok()?,
                                span_id: l.span_id.as_slice().try_into().ok()?,
                                attributes: attributes(l.attributes),
                            })
                        })
                        .collect(),
                    scope_name: scope_name.clone(),
                    scope_version: scope_version.clone(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    fn request(span: Span) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource::default()),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
        }
    }

    #[test]
    fn missing_service_name_becomes_unknown_service() {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "x".into(),
            ..Default::default()
        };
        let out = spans_from_request(request(span)).unwrap();
        assert_eq!(out[0].service, UNKNOWN_SERVICE);
        assert_eq!(out[0].parent_span_id, None);
    }

    #[test]
    fn bad_ids_and_times_are_rejected_with_a_reason() {
        let bad = Span {
            trace_id: vec![1; 15],
            span_id: vec![2; 8],
            ..Default::default()
        };
        assert!(spans_from_request(request(bad))
            .unwrap_err()
            .contains("trace_id must be 16 bytes"));
        let zero = Span {
            trace_id: vec![0; 16],
            span_id: vec![2; 8],
            ..Default::default()
        };
        assert!(spans_from_request(request(zero))
            .unwrap_err()
            .contains("all zeros"));
        let back = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            start_time_unix_nano: 10,
            end_time_unix_nano: 5,
            ..Default::default()
        };
        assert!(spans_from_request(request(back))
            .unwrap_err()
            .contains("ends before it starts"));
    }
}
