//! Puts the gathered pieces of a stitched trace together: parents from the matched CLIENT /
//! SERVER pairs (over the parent an agent took from a forwarded `traceparent`), the root and
//! with it the one trace id shown, each host's clock correction, and what may be missing. The
//! spans come out as records plus the tags and warnings of the query-side contract, for
//! `jaeger.rs` to shape.
use std::collections::{HashMap, HashSet};

use tracer_store::{kind, AttrValue, KeyValue, SpanId, SpanRecord, TraceId};

use super::{attr, clock, edge_of, Gathered, Source};

/// One span of a stitched trace: the stored record with the trace's id, its stitched parent,
/// corrected times and the contract's tags added, and its own warnings.
#[derive(Clone, Debug)]
pub struct StitchedSpan {
    pub span: SpanRecord,
    pub warnings: Vec<String>,
}

/// A trace as the query API shows it: possibly several stored traces, linked.
#[derive(Clone, Debug)]
pub struct Stitched {
    /// The stored trace id of the root span; every span carries it.
    pub trace_id: TraceId,
    /// By (corrected) start time.
    pub spans: Vec<StitchedSpan>,
    pub warnings: Vec<String>,
    /// Why spans may be missing; empty when none are known to be.
    pub incomplete_reasons: Vec<String>,
    /// The stored traces it is made of.
    pub members: Vec<TraceId>,
    /// Spans were left out: a limit of one answer was reached (`incomplete_reasons` says which).
    pub truncated: bool,
}

impl Stitched {
    pub fn incomplete(&self) -> bool {
        !self.incomplete_reasons.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parent {
    None,
    Span(usize),
    /// Set on the span, but not in the trace.
    Missing(SpanId),
}

/// A parent the collector set.
struct Link {
    source: Source,
    /// What it replaced: `<source>:<span id>`.
    replaced: Option<String>,
}

/// Whether walking up from `from` reaches `target` (linking `target` under `from` would then
/// make a cycle).
fn reaches(parent: &[Parent], from: usize, target: usize) -> bool {
    let mut cur = from;
    // Bounded: stored parents can already form a cycle.
    for _ in 0..=parent.len() {
        if cur == target {
            return true;
        }
        match parent[cur] {
            Parent::Span(p) => cur = p,
            _ => return false,
        }
    }
    false
}

fn set_attr(s: &mut SpanRecord, key: &str, value: AttrValue) {
    match s.attributes.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => kv.value = value,
        None => s.attributes.push(KeyValue {
            key: key.into(),
            value,
        }),
    }
}

fn text(v: &str) -> AttrValue {
    AttrValue::Str(v.into())
}

fn describe(s: &SpanRecord) -> String {
    format!("{} ({} {})", hex::encode(s.span_id), s.service, s.operation)
}

pub(crate) fn assemble(g: Gathered) -> Stitched {
    let n = g.spans.len();
    let spans = g.spans;
    let index: HashMap<(TraceId, SpanId), usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.trace_id, s.span_id), i))
        .collect();
    let mut parent: Vec<Parent> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| match s.parent_span_id {
            None => Parent::None,
            Some(p) => match index.get(&(s.trace_id, p)) {
                Some(&j) if j != i => Parent::Span(j),
                _ => Parent::Missing(p),
            },
        })
        .collect();
    let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
    let mut warnings = g.warnings;
    let mut paired: HashSet<usize> = HashSet::new();
    let mut clock_pairs = Vec::with_capacity(g.pairs.len());
    for &(c, s, source) in &g.pairs {
        paired.insert(c);
        clock_pairs.push((c, s));
        if parent[s] == Parent::Span(c) {
            // The agent linked them already: both ends on its host (tcp-seq), or from the
            // caller's header (the agents' own `--inject-context`, or an SDK's), which the
            // sequence numbers now confirm: that, the exact evidence, is what the link says.
            let from_header = matches!(
                attr(&spans[s], "tracer.link.source"),
                Some("traceparent" | "b3")
            );
            if from_header && source == Source::TcpSeq {
                links[s] = Some(Link {
                    source,
                    replaced: None,
                });
            }
            continue;
        }
        if reaches(&parent, c, s) {
            warnings.push(format!(
                "SERVER span {} is an ancestor of its CLIENT span {}: not linked (it would make a cycle)",
                describe(&spans[s]),
                describe(&spans[c])
            ));
            continue;
        }
        let replaced = spans[s].parent_span_id.map(|p| {
            format!(
                "{}:{}",
                attr(&spans[s], "tracer.link.source").unwrap_or("parent"),
                hex::encode(p)
            )
        });
        links[s] = Some(Link { source, replaced });
        parent[s] = Parent::Span(c);
    }
    let earliest = |want: &dyn Fn(Parent) -> bool| {
        (0..n)
            .filter(|&i| want(parent[i]))
            .min_by_key(|&i| (spans[i].start_unix_nano, i))
    };
    // The root: the earliest span with no parent; else (its parent never arrived) the earliest
    // whose parent is missing; else (stored parents in a cycle) the earliest of all.
    let root = earliest(&|p| p == Parent::None)
        .or_else(|| earliest(&|p| matches!(p, Parent::Missing(_))))
        .or_else(|| earliest(&|_| true))
        .unwrap_or(0);
    let trace_id = spans.get(root).map_or([0; 16], |s| s.trace_id);
    let shifts = clock::shifts(&spans, &clock_pairs, root);

    let mut reasons = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        if s.kind == kind::CLIENT
            && edge_of(s).0.is_some()
            && !paired.contains(&i)
            && !g.ambiguous_clients.contains(&i)
        {
            reasons.push(format!(
                "CLIENT span {}: its server side never arrived",
                describe(s)
            ));
        }
        if let Parent::Missing(p) = parent[i] {
            reasons.push(format!(
                "span {}: its parent {} is not in the trace",
                describe(s),
                hex::encode(p)
            ));
        }
    }
    let truncated = g.truncated.is_some();
    if let Some(t) = g.truncated {
        reasons.push(t.clone());
        warnings.push(t);
    }

    let ids: Vec<SpanId> = spans.iter().map(|s| s.span_id).collect();
    let labels: Vec<Option<String>> = spans
        .iter()
        .map(|s| clock::host_label(s).map(str::to_owned))
        .collect();
    let mut out: Vec<(u64, usize, StitchedSpan)> = Vec::with_capacity(n);
    for (i, mut s) in spans.into_iter().enumerate() {
        let mut span_warnings = Vec::new();
        if s.trace_id != trace_id {
            let original = text(&hex::encode(s.trace_id));
            set_attr(&mut s, "tracer.trace_id.original", original);
            s.trace_id = trace_id;
        }
        s.parent_span_id = match parent[i] {
            Parent::None => None,
            Parent::Span(p) => Some(ids[p]),
            Parent::Missing(p) => Some(p),
        };
        match &links[i] {
            Some(l) => {
                let (source, confidence) = match l.source {
                    Source::TcpSeq => ("tcp-seq", "high"),
                    Source::TcpSeqNat => ("tcp-seq-nat", "low"),
                };
                set_attr(&mut s, "tracer.link.source", text(source));
                set_attr(&mut s, "tracer.link.confidence", text(confidence));
                set_attr(&mut s, "tracer.link.by", text("collector"));
                if let Some(r) = &l.replaced {
                    set_attr(&mut s, "tracer.link.replaced", text(r));
                }
            }
            None if attr(&s, "tracer.link.source").is_some() => {
                set_attr(&mut s, "tracer.link.by", text("agent"));
            }
            None => {}
        }
        let shift = shifts[i];
        if shift != 0 {
            let raw = s.start_unix_nano;
            let moved = |t: u64| (t as i64).saturating_add(shift).max(0) as u64;
            s.start_unix_nano = moved(raw);
            for e in &mut s.events {
                e.time_unix_nano = moved(e.time_unix_nano);
            }
            set_attr(
                &mut s,
                "tracer.clock.shift_us",
                AttrValue::Int(shift / 1000),
            );
            set_attr(
                &mut s,
                "tracer.clock.raw_start_us",
                AttrValue::Int((raw / 1000) as i64),
            );
            span_warnings.push(format!(
                "clock skew: shifted by {:+} µs (host {}) so it lies inside its parent",
                shift / 1000,
                labels[i].as_deref().unwrap_or("unknown")
            ));
        }
        out.push((
            s.start_unix_nano,
            i,
            StitchedSpan {
                span: s,
                warnings: span_warnings,
            },
        ));
    }
    out.sort_by_key(|(start, i, _)| (*start, *i));
    Stitched {
        trace_id,
        spans: out.into_iter().map(|(_, _, s)| s).collect(),
        warnings,
        incomplete_reasons: reasons,
        members: g.members,
        truncated,
    }
}
