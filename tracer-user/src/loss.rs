//! What the agent lost, reported as spans, so that the collector can mark the traces of a host
//! that may be missing spans.
//!
//! Counters on `/metrics` say how much was lost; a trace needs to know *when* and *where*. Once a
//! second, if any record or span was dropped since the last look, the agent sends one span of its
//! own (service `tracer-agent`, name `tracer.loss`) covering that second, with what was lost as
//! attributes. The collector treats a trace with spans from that host in that window as possibly
//! incomplete. No new protocol is needed and any OTLP backend can show it.
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
#[derive(Default)]
pub struct LossWatch {
    /// Records lost in the kernel (ring buffer full, connection table full) and spans lost on
    /// the way out (export queue full, rejected by the collector), at the last look.
    records: u64,
    spans: u64,
    since_unix_ns: u64,
}

impl LossWatch {
    pub fn new(now_unix_ns: u64) -> Self {
        LossWatch {
            since_unix_ns: now_unix_ns,
            ..Default::default()
        }
    }

    /// The `tracer.loss` span for what was lost since the last call, encoded as an OTLP `Span`
    /// message, if anything was. With `can_send` false (the export queue is full: the span
    /// would be dropped, and that drop reported in turn, every second) nothing is made, and the
    /// next span covers this window too.
    pub fn check(
        &mut self,
        kernel: &KernelCounters,
        stats: &Stats,
        now_unix_ns: u64,
        can_send: bool,
    ) -> Option<(Span, Vec<u8>)> {
        use std::sync::atomic::Ordering::Relaxed;
        use tracer_common::counter as c;
        let records = kernel.get(c::RINGBUF_FULL)
            + kernel.get(c::CONN_TABLE_FULL)
            + stats.agent.unknown_connection_records.load(Relaxed);
        let spans = stats.export.dropped_queue_full.load(Relaxed)
            + stats.export.dropped_rejected.load(Relaxed);
        let (new_records, new_spans) = (
            records.saturating_sub(self.records),
            spans.saturating_sub(self.spans),
        );
        if !can_send {
            return None;
        }
        let since = std::mem::replace(&mut self.since_unix_ns, now_unix_ns);
        self.records = records;
        self.spans = spans;
        if new_records == 0 && new_spans == 0 {
            return None;
        }
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
        Some((span, encoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_only_when_something_was_lost() {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = Stats::default();
        let kernel = KernelCounters::default();
        let mut watch = LossWatch::new(100);
        assert!(watch.check(&kernel, &stats, 200, true).is_none());
        stats.export.dropped_queue_full.store(3, Relaxed);
        // No room to send it: the loss waits, and the next span covers both seconds.
        assert!(watch.check(&kernel, &stats, 250, false).is_none());
        stats.agent.unknown_connection_records.store(2, Relaxed);
        let (span, encoded) = watch.check(&kernel, &stats, 300, true).unwrap();
        assert_eq!(span.name, LOSS_SPAN_NAME);
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (200, 300)
        );
        assert_eq!(Span::decode(encoded.as_slice()).unwrap(), span);
        let int = |k: &str| {
            span.attributes.iter().find(|a| a.key == k).and_then(|a| {
                match a.value.as_ref()?.value.as_ref()? {
                    opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(i) => {
                        Some(*i)
                    }
                    _ => None,
                }
            })
        };
        assert_eq!(int("tracer.loss.records"), Some(2));
        assert_eq!(int("tracer.loss.spans"), Some(3));
        // Counted once: nothing new, no span.
        assert!(watch.check(&kernel, &stats, 400, true).is_none());
    }
}
