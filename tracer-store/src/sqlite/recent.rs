//! The trace index of the newest spans, in memory.
//!
//! Trace ids are random, so a B-tree keyed by them takes every insert at a random page: with
//! commits of a few hundred spans, nearly one dirty 4 KiB page per span, which measured as half
//! of the ingest cost. Instead, spans are indexed here at commit time and written to the
//! database in bulk, as an immutable sorted *run* of `(trace_id, span)` once enough accumulate
//! (see `SqliteStore`'s maintenance thread): an append, a few bytes per span. A lookup checks
//! this map and probes each run.
//!
//! Nothing here needs to be durable: the spans table is the truth, and on open every span past
//! the last run (`meta.trace_indexed_upto`) is read back into the map.
use std::sync::Arc;

use crate::{SpanId, TraceId};

/// Spans of one trace: (span id, row id). Most traces the agent sees have one span, which then
/// costs no allocation.
#[derive(Clone)]
pub(super) enum Spans {
    One((SpanId, i64)),
    Many(Vec<(SpanId, i64)>),
}

impl Spans {
    pub fn as_slice(&self) -> &[(SpanId, i64)] {
        match self {
            Spans::One(x) => std::slice::from_ref(x),
            Spans::Many(v) => v,
        }
    }

    fn push(&mut self, x: (SpanId, i64)) {
        match self {
            Spans::One(a) => *self = Spans::Many(vec![*a, x]),
            Spans::Many(v) => v.push(x),
        }
    }
}

/// Seeded foldhash: a lookup per span on the write path (duplicate check and insert), where
/// SipHash cost more than the map itself.
pub(super) type Map = foldhash::HashMap<TraceId, Spans>;

#[derive(Default)]
pub(super) struct Recent {
    /// Spans committed since the last run began.
    current: Map,
    current_spans: usize,
    /// Spans being written out as a run; dropped once the run has committed.
    frozen: Option<Arc<Map>>,
}

impl Recent {
    pub fn insert(&mut self, trace_id: TraceId, span_id: SpanId, row: i64) {
        match self.current.entry(trace_id) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push((span_id, row)),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Spans::One((span_id, row)));
            }
        }
        self.current_spans += 1;
    }

    /// Whether the span is indexed here (a batch sent again).
    pub fn contains(&self, trace_id: &TraceId, span_id: &SpanId) -> bool {
        let has = |m: &Map| {
            m.get(trace_id)
                .is_some_and(|v| v.as_slice().iter().any(|(s, _)| s == span_id))
        };
        has(&self.current) || self.frozen.as_deref().is_some_and(has)
    }

    /// Row ids of a trace's spans known here.
    pub fn rows(&self, trace_id: &TraceId, out: &mut Vec<i64>) {
        for m in std::iter::once(&self.current).chain(self.frozen.as_deref()) {
            if let Some(v) = m.get(trace_id) {
                out.extend(v.as_slice().iter().map(|(_, r)| *r));
            }
        }
    }

    pub fn current_spans(&self) -> usize {
        self.current_spans
    }

    /// Starts a run: the current spans become frozen (still found by lookups) and are returned
    /// for writing; `None` if a run is already being written.
    pub fn freeze(&mut self) -> Option<Arc<Map>> {
        if self.frozen.is_some() || self.current.is_empty() {
            return None;
        }
        let m = Arc::new(std::mem::take(&mut self.current));
        self.current_spans = 0;
        self.frozen = Some(m.clone());
        Some(m)
    }

    /// The frozen spans are in a committed run now.
    pub fn run_written(&mut self) {
        self.frozen = None;
    }

    /// The frozen spans could not be written: fold them back, to be retried with the next run.
    pub fn run_failed(&mut self) {
        if let Some(m) = self.frozen.take() {
            for (t, spans) in m.iter() {
                for x in spans.as_slice() {
                    self.insert(*t, x.0, x.1);
                }
            }
        }
    }
}
