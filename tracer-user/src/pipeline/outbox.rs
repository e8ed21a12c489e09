//! Spans on their way out of the pipeline: encoded into a batch per resource for the exporter,
//! printed (`--stdout`), or laid out and dropped (`tracer replay`).
use std::sync::Arc;

use crate::{
    export::{self, ExportResource, SpanBatch, SpanSender, OUTBOX_BYTES},
    spans::{self, Span},
};

pub enum Sink {
    /// The collector, then any other endpoints (`--also-export`), each with its own queue.
    Otlp(SpanSender, Vec<SpanSender>),
    Stdout,
    /// `tracer replay`: each drain's spans are laid out into a request as the exporter would
    /// (heads around the batches), then dropped.
    Discard(export::Encoder, Vec<u8>, export::Recycler),
}

impl Sink {
    /// For `tracer replay`.
    pub fn discard() -> Self {
        Sink::Discard(
            export::Encoder::default(),
            Vec::new(),
            export::Recycler::default(),
        )
    }

    /// Export endpoint `i` of an OTLP sink: 0 the collector, then each `--also-export` in order.
    pub(crate) fn endpoint(&self, i: usize) -> Option<&SpanSender> {
        match self {
            Sink::Otlp(tx, also) => match i {
                0 => Some(tx),
                i => also.get(i - 1),
            },
            Sink::Stdout | Sink::Discard(..) => None,
        }
    }
}

/// Spans on their way out: encoded into a batch per resource, and handed to the sink once per
/// drain, or as soon as a batch holds `OUTBOX_BYTES`.
pub(crate) struct Outbox {
    pub(crate) sink: Sink,
    pub(crate) batches: Vec<SpanBatch>,
    /// Scratch space for span names.
    pub(crate) name: String,
}

impl Outbox {
    /// Encodes a final span for the exporter (by reference: moving a span is a `memcpy` call,
    /// which was 4% of the agent's time).
    pub(crate) fn send(&mut self, resource: &Arc<ExportResource>, span: &Span) {
        let recycler = match &self.sink {
            Sink::Otlp(tx, _) => &tx.recycler,
            Sink::Discard(_, _, recycler) => recycler,
            Sink::Stdout => {
                println!("{}", stdout_line(&resource.proto, &span.to_proto()));
                span.name_into(&mut self.name);
                return;
            }
        };
        // A drain sees a few processes: a scan beats a hash.
        let i = match self.batches.iter().position(|b| b.is_for(resource)) {
            Some(i) => i,
            None => {
                self.batches.push(recycler.batch(resource));
                self.batches.len() - 1
            }
        };
        let batch = &mut self.batches[i];
        batch.push(span, &mut self.name);
        if batch.bytes_len() >= OUTBOX_BYTES {
            let full = self.batches.swap_remove(i);
            self.hand_over(full);
        }
    }

    /// Sends one of the agent's own spans, already encoded (rare: the `tracer.loss` spans).
    /// `endpoint`: 0 the collector, then each `--also-export` in order.
    pub(crate) fn send_encoded(
        &mut self,
        endpoint: usize,
        resource: &Arc<ExportResource>,
        span: &opentelemetry_proto::tonic::trace::v1::Span,
        encoded: &[u8],
    ) {
        let recycler = match &self.sink {
            Sink::Otlp(tx, _) => &tx.recycler,
            Sink::Discard(_, _, recycler) => recycler,
            Sink::Stdout => {
                println!("{}", stdout_line(&resource.proto, span));
                return;
            }
        };
        let mut batch = recycler.batch(resource);
        batch.push_encoded(encoded);
        match &self.sink {
            // A batch from the collector's pool for any endpoint: the pools only recycle buffers.
            Sink::Otlp(..) => {
                if let Some(tx) = self.sink.endpoint(endpoint) {
                    tx.send(batch);
                }
            }
            _ => self.hand_over(batch),
        }
    }

    pub(crate) fn flush(&mut self) {
        let mut batches = std::mem::take(&mut self.batches);
        for batch in batches.drain(..) {
            self.hand_over(batch);
        }
        self.batches = batches;
    }

    fn hand_over(&mut self, batch: SpanBatch) {
        match &mut self.sink {
            Sink::Otlp(tx, also) => {
                for other in also.iter() {
                    other.send(other.copy_of(&batch));
                }
                tx.send(batch);
            }
            Sink::Discard(encoder, heads, recycler) => {
                heads.clear();
                let pieces = encoder.layout(std::slice::from_ref(&batch), heads);
                std::hint::black_box(&pieces);
                recycler.return_batches(std::iter::once(batch));
            }
            Sink::Stdout => {}
        }
    }
}

/// `--stdout`: one JSON object a line, with the service and attributes flattened for reading.
fn stdout_line(
    resource: &opentelemetry_proto::tonic::resource::v1::Resource,
    span: &opentelemetry_proto::tonic::trace::v1::Span,
) -> String {
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
    fn json(v: &Value) -> serde_json::Value {
        match v {
            Value::StringValue(s) => s.clone().into(),
            Value::IntValue(i) => (*i).into(),
            Value::BoolValue(b) => (*b).into(),
            Value::DoubleValue(d) => (*d).into(),
            Value::ArrayValue(a) => a
                .values
                .iter()
                .filter_map(|v| v.value.as_ref())
                .map(json)
                .collect(),
            other => format!("{other:?}").into(),
        }
    }
    fn flat(kvs: &[KeyValue]) -> serde_json::Map<String, serde_json::Value> {
        kvs.iter()
            .filter_map(|kv| Some((kv.key.clone(), json(kv.value.as_ref()?.value.as_ref()?))))
            .collect()
    }
    let hex = spans::hex;
    let kind = match span.kind {
        2 => "SERVER",
        3 => "CLIENT",
        _ => "INTERNAL",
    };
    let res = flat(&resource.attributes);
    // Span names and attributes come from the network: a terminal must not receive their escapes.
    crate::client::json_for_terminal(&serde_json::json!({
        "service": res.get("service.name"),
        "name": span.name,
        "kind": kind,
        "trace_id": hex(&span.trace_id),
        "span_id": hex(&span.span_id),
        "start_unix_nano": span.start_time_unix_nano,
        "duration_us": (span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano)) as f64 / 1000.0,
        "status": span.status.as_ref().map_or(0, |s| s.code),
        "attributes": flat(&span.attributes),
        "resource": res,
    }))
}
