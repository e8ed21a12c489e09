//! What the agent lost, reported as spans, so that the collector can mark the traces of a host
//! that may be missing spans.
//!
//! Counters on `/metrics` say how much was lost; a trace needs to know *when* and *where*. Once a
//! second, if any record or span was dropped since the last look, the agent sends one span of its
//! own (service `tracer-agent`, name `tracer.loss`) covering that second, with what was lost as
//! attributes. The collector treats a trace with spans from that host in that window as possibly
//! incomplete. No new protocol is needed and any OTLP backend can show it.
//!
//! Each export endpoint (the collector, and each `--also-export`) gets its own span: the records
//! lost in the kernel are missing everywhere, but a span dropped on the way to one endpoint (its
//! queue full, or rejected) may have reached the others.
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message as _;

use crate::{
    probes::KernelCounters,
    resource::{kv_int, kv_str},
    spans::random_ids,
    stats::Stats,
};

/// The name of the spans the agent reports its losses with.
pub const LOSS_SPAN_NAME: &str = "tracer.loss";

/// Losses since the last look, from the counters.
pub struct LossWatch {
    /// Per endpoint (the collector first, then each `--also-export`): the totals of spans lost
    /// on the way (export queue full, rejected) and of records lost in the kernel (ring buffer
    /// full, connection table full) it was last told about.
    endpoints: Vec<EndpointLoss>,
}

#[derive(Clone, Copy, Default)]
struct EndpointLoss {
    spans: u64,
    records: u64,
    since_unix_ns: u64,
}

impl LossWatch {
    /// A watch over `endpoints` export endpoints (the collector's included).
    pub fn new(now_unix_ns: u64, endpoints: usize) -> Self {
        let start = EndpointLoss {
            since_unix_ns: now_unix_ns,
            ..Default::default()
        };
        LossWatch {
            endpoints: vec![start; endpoints.max(1)],
        }
    }

    /// For each endpoint that lost something since its last span, the `tracer.loss` span for
    /// it, encoded as an OTLP `Span` message: `(endpoint, span, encoded)`, the collector being
    /// endpoint 0. An endpoint for which `can_send` says no (its export queue is full: the span
    /// would be dropped, and that drop reported in turn, every second) gets nothing now, and its
    /// next span covers this window too.
    pub fn check(
        &mut self,
        kernel: &KernelCounters,
        stats: &Stats,
        now_unix_ns: u64,
        can_send: impl Fn(usize) -> bool,
    ) -> Vec<(usize, Span, Vec<u8>)> {
        use std::sync::atomic::Ordering::Relaxed;
        use tracer_common::counter as c;
        let records = kernel.get(c::RINGBUF_FULL)
            + kernel.get(c::CONN_TABLE_FULL)
            + stats.agent.unknown_connection_records.load(Relaxed);
        let export_stats =
            std::iter::once(&stats.export).chain(stats.also_exports.iter().map(|(_, e)| e));
        let mut spans_out = Vec::new();
        for (endpoint, (seen, export)) in self.endpoints.iter_mut().zip(export_stats).enumerate() {
            if !can_send(endpoint) {
                continue;
            }
            let spans =
                export.dropped_queue_full.load(Relaxed) + export.dropped_rejected.load(Relaxed);
            let (new_records, new_spans) = (
                records.saturating_sub(seen.records),
                spans.saturating_sub(seen.spans),
            );
            let since = std::mem::replace(&mut seen.since_unix_ns, now_unix_ns);
            (seen.records, seen.spans) = (records, spans);
            if new_records == 0 && new_spans == 0 {
                continue;
            }
            let (span, encoded) = loss_span(since, now_unix_ns, new_records, new_spans);
            spans_out.push((endpoint, span, encoded));
        }
        spans_out
    }
}

/// One `tracer.loss` span covering `since..now`.
fn loss_span(since: u64, now_unix_ns: u64, new_records: u64, new_spans: u64) -> (Span, Vec<u8>) {
    let (trace_id, span_id) = random_ids();
    let span = Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        name: LOSS_SPAN_NAME.into(),
        kind: SpanKind::Internal as i32,
        start_time_unix_nano: since,
        end_time_unix_nano: now_unix_ns.max(since),
        attributes: vec![
            kv_int("tracer.loss.records", new_records as i64),
            kv_int("tracer.loss.spans", new_spans as i64),
            kv_str(
                "tracer.loss.note",
                "traces of this host overlapping this span may miss spans",
            ),
        ],
        ..Default::default()
    };
    let encoded = span.encode_to_vec();
    (span, encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(span: &Span, key: &str) -> Option<i64> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        span.attributes.iter().find(|a| a.key == key).and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                Value::IntValue(i) => Some(*i),
                _ => None,
            }
        })
    }

    #[test]
    fn a_span_only_when_something_was_lost() {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = Stats::default();
        let kernel = KernelCounters::default();
        let mut watch = LossWatch::new(100, 1);
        assert!(watch.check(&kernel, &stats, 200, |_| true).is_empty());
        stats.export.dropped_queue_full.store(3, Relaxed);
        // No room to send it: the loss waits, and the next span covers both seconds.
        assert!(watch.check(&kernel, &stats, 250, |_| false).is_empty());
        stats.agent.unknown_connection_records.store(2, Relaxed);
        let found = watch.check(&kernel, &stats, 300, |_| true);
        let [(0, span, encoded)] = found.as_slice() else {
            panic!("one span for the collector, got {}", found.len());
        };
        assert_eq!(span.name, LOSS_SPAN_NAME);
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (200, 300)
        );
        assert_eq!(&Span::decode(encoded.as_slice()).unwrap(), span);
        assert_eq!(int(span, "tracer.loss.records"), Some(2));
        assert_eq!(int(span, "tracer.loss.spans"), Some(3));
        // Counted once: nothing new, no span.
        assert!(watch.check(&kernel, &stats, 400, |_| true).is_empty());
    }

    /// Spans dropped on the way to an `--also-export` endpoint are that endpoint's loss only;
    /// records lost in the kernel are every endpoint's.
    #[test]
    fn each_endpoint_hears_of_its_own_losses() {
        use std::sync::{atomic::Ordering::Relaxed, Arc};
        let mut stats = Stats::default();
        let relay = Arc::new(crate::export::ExportStats::default());
        stats.also_exports.push(("relay".into(), relay.clone()));
        let kernel = KernelCounters::default();
        let mut watch = LossWatch::new(100, 2);
        relay.dropped_rejected.store(5, Relaxed);
        let found = watch.check(&kernel, &stats, 200, |_| true);
        let [(1, span, _)] = found.as_slice() else {
            panic!("one span, for the relay only");
        };
        assert_eq!(int(span, "tracer.loss.spans"), Some(5));
        assert_eq!(int(span, "tracer.loss.records"), Some(0));
        // The collector's queue is full when records are lost: the relay hears now, the
        // collector in its next span, which covers both windows.
        stats.agent.unknown_connection_records.store(4, Relaxed);
        let found = watch.check(&kernel, &stats, 300, |endpoint| endpoint == 1);
        let [(1, span, _)] = found.as_slice() else {
            panic!("one span, for the relay only");
        };
        assert_eq!(int(span, "tracer.loss.records"), Some(4));
        let found = watch.check(&kernel, &stats, 400, |_| true);
        let [(0, span, _)] = found.as_slice() else {
            panic!("one span, for the collector only");
        };
        assert_eq!(
            (
                span.start_time_unix_nano,
                int(span, "tracer.loss.records"),
                int(span, "tracer.loss.spans")
            ),
            (200, Some(4), Some(0))
        );
    }
}
