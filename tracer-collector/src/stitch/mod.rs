//! Stitching: the traces that one request's spans were stored under, read back as one trace.
//!
//! Agents on different hosts cannot agree on a trace id, but both ends of a request carry the
//! same `tracer.tcp.edge` (addresses, ports, and the TCP sequence number of the request's first
//! byte). The store indexes those keys when it stores the spans; here, at query time, a trace
//! pulls in the trace of every span at the other end of one of its requests, repeatedly
//! (bounded), and the pieces are put together: the SERVER span becomes the child of its CLIENT
//! span (`assemble.rs`), each host's clock is aligned to the root's (`clock.rs`), and what may
//! be missing is said. This module finds the pieces. ARCHITECTURE.md ("Stitching traces in the
//! collector") has the reasons for linking at query time rather than at ingest.
use std::collections::{HashMap, HashSet};

use tracer_store::{
    edge_keys, kind, AttrValue, EdgeKey, KeyValue, SpanId, SpanRecord, SpanStore, StoreError,
    TraceId, TraceLimit, TraceQuery,
};

mod assemble;
mod clock;

pub use assemble::{Stitched, StitchedSpan};

/// How far one stitched trace may grow: a pathological key (a span whose edge matches a long
/// chain of traces) must not make one query read the whole store.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Stored traces pulled into one stitched trace at most.
    pub max_traces: usize,
    /// Spans in one stitched trace at most (a trace that would pass it is not pulled in).
    pub max_spans: usize,
    /// What is read of the stored trace asked for (its first spans to arrive), and what one
    /// search answers with at most, all its traces together: a client can put any number of
    /// spans under one trace id, and a trace of 16,000 spans once took seconds and hundreds of
    /// MiB to answer.
    pub answer: TraceLimit,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_traces: 64,
            max_spans: 20_000,
            answer: TraceLimit {
                max_spans: 50_000,
                max_bytes: 64 << 20,
            },
        }
    }
}

/// The stitched trace that stored trace `id` belongs to, or `None` if `id` is unknown.
pub fn trace(
    store: &dyn SpanStore,
    id: &TraceId,
    limits: Limits,
) -> Result<Option<Stitched>, StoreError> {
    let first = store.trace_limited(id, limits.answer)?;
    if first.spans.is_empty() {
        return Ok(None);
    }
    let cut = first.truncated.then(|| {
        format!(
            "truncated: this trace has {} spans; the first {} to arrive are shown (one answer \
             holds {} spans or {} MiB at most)",
            first.total,
            first.spans.len(),
            limits.answer.max_spans,
            limits.answer.max_bytes >> 20
        )
    });
    let budget = limits.answer.max_bytes.saturating_sub(first.bytes);
    let mut gathered = gather(store, *id, first.spans, limits, budget)?;
    if cut.is_some() {
        gathered.truncated = cut;
    }
    let mut stitched = assemble::assemble(gathered);
    mark_losses(store, &mut stitched)?;
    Ok(Some(stitched))
}

/// The service and span name agents report their losses with: a span covering each second in
/// which a host's agent dropped records or spans (tracer-user's `loss.rs`).
const LOSS_SERVICE: &str = "tracer-agent";
const LOSS_SPAN: &str = "tracer.loss";
/// Loss spans cover about a second; one that starts this much before the trace can overlap it.
const LOSS_LOOKBACK_NS: u64 = 5_000_000_000;

/// A trace with spans from a host whose agent reported losses while the trace ran may miss
/// spans: says so, with what was lost.
fn mark_losses(store: &dyn SpanStore, stitched: &mut Stitched) -> Result<(), StoreError> {
    let spans = || stitched.spans.iter().map(|s| &s.span);
    if spans().all(|s| s.service == LOSS_SERVICE) {
        return Ok(());
    }
    // Raw (stored) times: a loss span is in its own host's clock, as that host's spans were.
    let raw_start = |s: &SpanRecord| {
        s.attributes
            .iter()
            .find_map(|kv| match kv.value {
                AttrValue::Int(us) if kv.key == "tracer.clock.raw_start_us" => {
                    u64::try_from(us).ok().map(|us| us * 1000)
                }
                _ => None,
            })
            .unwrap_or(s.start_unix_nano)
    };
    let (Some(start), Some(end)) = (
        spans().map(raw_start).min(),
        spans()
            .map(|s| raw_start(s).saturating_add(s.duration_nano))
            .max(),
    ) else {
        return Ok(());
    };
    let hosts: HashSet<&str> = spans().filter_map(clock::host_of).collect();
    let ids = store.find_trace_ids(&TraceQuery {
        service: Some(LOSS_SERVICE.into()),
        operation: Some(LOSS_SPAN.into()),
        start_unix_nano: Some(start.saturating_sub(LOSS_LOOKBACK_NS)),
        end_unix_nano: Some(end),
        limit: 100,
        ..TraceQuery::default()
    })?;
    let mut reasons = Vec::new();
    for id in ids {
        for loss in store.trace(&id)? {
            let overlaps = loss.start_unix_nano <= end
                && loss.start_unix_nano.saturating_add(loss.duration_nano) >= start;
            if loss.operation != LOSS_SPAN
                || !overlaps
                || !clock::host_of(&loss).is_some_and(|h| hosts.contains(h))
            {
                continue;
            }
            let count = |key: &str| {
                loss.attributes
                    .iter()
                    .find_map(|kv| match kv.value {
                        AttrValue::Int(n) if kv.key == key => Some(n),
                        _ => None,
                    })
                    .unwrap_or(0)
            };
            reasons.push(format!(
                "host {}: its agent lost {} records and {} spans while this trace ran \
                 (span {} of tracer-agent)",
                clock::host_label(&loss).unwrap_or("?"),
                count("tracer.loss.records"),
                count("tracer.loss.spans"),
                hex::encode(loss.span_id),
            ));
        }
    }
    stitched.incomplete_reasons.extend(reasons);
    Ok(())
}

/// Stored traces a search looks at at most, per stitched trace asked for (and at least
/// [`MIN_SEARCHED_TRACES`]): when more found traces than that stitch into one, the search stops
/// there and returns fewer than asked for.
const SEARCHED_PER_RESULT: usize = 8;
const MIN_SEARCHED_TRACES: usize = 6_000;

/// A search (`query.limit` results at most) whose results are stitched traces, each once,
/// newest match first: a stitched trace appears where its first matching piece would have.
pub fn search(
    store: &dyn SpanStore,
    query: &TraceQuery,
    limits: Limits,
) -> Result<Vec<Stitched>, StoreError> {
    let want = query.limit.max(1);
    let cap = (want * SEARCHED_PER_RESULT).max(MIN_SEARCHED_TRACES);
    let mut out: Vec<Stitched> = Vec::new();
    // What is left of the answer's size: each trace gets the rest.
    let mut left = limits.answer;
    // Stored traces already part of a result (or looked at), and the results' own ids.
    let mut covered: HashSet<TraceId> = HashSet::new();
    let mut ids_out: HashSet<TraceId> = HashSet::new();
    let mut ask = want;
    loop {
        let ids = store.find_trace_ids(&TraceQuery {
            limit: ask,
            ..query.clone()
        })?;
        for id in &ids {
            if !covered.insert(*id) {
                continue;
            }
            let Some(mut t) = trace(
                store,
                id,
                Limits {
                    answer: left,
                    ..limits
                },
            )?
            else {
                continue; // deleted since it was found
            };
            covered.extend(t.members.iter().copied());
            if ids_out.insert(t.trace_id) {
                left.max_spans = left.max_spans.saturating_sub(t.spans.len());
                left.max_bytes = left
                    .max_bytes
                    .saturating_sub(t.spans.iter().map(|s| s.span.approx_bytes()).sum());
                let full = left.max_spans == 0 || left.max_bytes == 0;
                if full && out.len() + 1 < want {
                    t.warnings.push(format!(
                        "the search stopped at this trace: its answer held {} spans or {} MiB, \
                         the most one answer holds; narrow the search for more",
                        limits.answer.max_spans,
                        limits.answer.max_bytes >> 20
                    ));
                }
                out.push(t);
                if out.len() == want || full {
                    return Ok(out);
                }
            }
        }
        // Fewer ids than asked for: the search has nothing more.
        if ids.len() < ask || ask >= cap {
            return Ok(out);
        }
        ask = (ask * 4).min(cap);
    }
}

/// What a span says about its place in a TCP stream (the store's rule, [`edge_keys`]).
pub(crate) fn edge_of(s: &SpanRecord) -> (Option<&str>, Option<u32>) {
    let attrs: Vec<_> = s.attributes.iter().map(KeyValue::as_ref).collect();
    edge_keys(s.kind, &attrs)
}

/// A string attribute of a span.
pub(crate) fn attr<'a>(s: &'a SpanRecord, key: &str) -> Option<&'a str> {
    s.attributes.iter().find_map(|kv| match &kv.value {
        AttrValue::Str(v) if kv.key == key => Some(v.as_str()),
        _ => None,
    })
}

type SpanKey = (TraceId, SpanId);

fn key_of(s: &SpanRecord) -> SpanKey {
    (s.trace_id, s.span_id)
}

/// The spans carrying one exact edge key, by kind.
#[derive(Default)]
struct Ends {
    clients: Vec<SpanKey>,
    servers: Vec<SpanKey>,
}

impl Ends {
    fn add(&mut self, s: &SpanRecord) {
        let list = match s.kind {
            kind::CLIENT => &mut self.clients,
            kind::SERVER => &mut self.servers,
            _ => return,
        };
        if !list.contains(&key_of(s)) {
            list.push(key_of(s));
        }
    }

    /// The one CLIENT and one SERVER span, when the key is that unambiguous.
    fn pair(&self) -> Option<(SpanKey, SpanKey)> {
        match (&self.clients[..], &self.servers[..]) {
            ([c], [s]) => Some((*c, *s)),
            _ => None,
        }
    }
}

/// How a CLIENT span was joined to its SERVER span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The same `tracer.tcp.edge` on both.
    TcpSeq,
    /// The same `tracer.tcp.seq`, method and path, and nothing else that fits (NAT fallback).
    TcpSeqNat,
}

/// The pieces of one stitched trace, before they are put together.
pub(crate) struct Gathered {
    /// Every span, each once, in the order their traces were loaded.
    pub spans: Vec<SpanRecord>,
    /// (CLIENT, SERVER) indexes into `spans`, and how they were matched.
    pub pairs: Vec<(usize, usize, Source)>,
    /// CLIENT spans (indexes) whose server side is ambiguous rather than missing.
    pub ambiguous_clients: HashSet<usize>,
    pub warnings: Vec<String>,
    /// Set when a limit stopped the trace from growing.
    pub truncated: Option<String>,
    /// The stored traces that make it up, the first asked for first.
    pub members: Vec<TraceId>,
}

struct Gatherer<'s> {
    store: &'s dyn SpanStore,
    limits: Limits,
    /// [`SpanRecord::approx_bytes`] traces pulled in may still take.
    bytes_left: usize,
    spans: Vec<SpanRecord>,
    index: HashMap<SpanKey, usize>,
    members: Vec<TraceId>,
    truncated: Option<String>,
}

impl Gatherer<'_> {
    fn add_spans(&mut self, spans: Vec<SpanRecord>) {
        for s in spans {
            if let std::collections::hash_map::Entry::Vacant(e) = self.index.entry(key_of(&s)) {
                e.insert(self.spans.len());
                self.spans.push(s);
            }
        }
    }

    /// Loads stored trace `t` into the stitched one, unless it is there already or a limit
    /// says no.
    fn pull_in(&mut self, t: TraceId) -> Result<bool, StoreError> {
        if self.members.contains(&t) {
            return Ok(false);
        }
        if self.members.len() >= self.limits.max_traces {
            self.truncated = Some(format!(
                "truncated: more than {} stored traces are linked to this one; the rest are not shown",
                self.limits.max_traces
            ));
            return Ok(false);
        }
        let room = TraceLimit {
            max_spans: self.limits.max_spans.saturating_sub(self.spans.len()),
            max_bytes: self.bytes_left,
        };
        let linked = self.store.trace_limited(&t, room)?;
        if linked.truncated {
            self.truncated = Some(format!(
                "truncated: the linked traces have more than {} spans (or {} MiB); the rest are \
                 not shown",
                self.limits.max_spans,
                self.limits.answer.max_bytes >> 20
            ));
            return Ok(false);
        }
        self.bytes_left -= linked.bytes.min(self.bytes_left);
        self.members.push(t);
        self.add_spans(linked.spans);
        Ok(true)
    }
}

/// The closure of trace `id` over edges: every trace holding the other end of one of its
/// requests, and theirs in turn.
fn gather(
    store: &dyn SpanStore,
    id: TraceId,
    first: Vec<SpanRecord>,
    limits: Limits,
    bytes_left: usize,
) -> Result<Gathered, StoreError> {
    let mut g = Gatherer {
        store,
        limits,
        bytes_left,
        spans: Vec::with_capacity(first.len()),
        index: HashMap::new(),
        members: vec![id],
        truncated: None,
    };
    g.add_spans(first);
    let mut ends: HashMap<String, Ends> = HashMap::new();
    let mut nat: Vec<(SpanKey, SpanKey)> = Vec::new();
    let mut nat_tried: HashSet<SpanKey> = HashSet::new();
    let mut cursor = 0;
    loop {
        // Exact keys: every span's, once each.
        while cursor < g.spans.len() {
            let s = &g.spans[cursor];
            cursor += 1;
            let (Some(edge), _) = edge_of(s) else {
                continue;
            };
            if let Some(e) = ends.get_mut(edge) {
                e.add(s);
                continue;
            }
            let (edge, start) = (edge.to_owned(), s.start_unix_nano);
            let mut e = Ends::default();
            e.add(&g.spans[cursor - 1]);
            for other in store.edge_spans(EdgeKey::Exact(&edge), start)? {
                // The index is by hash: check the key itself.
                if edge_of(&other).0 == Some(edge.as_str()) {
                    e.add(&other);
                }
            }
            if let Some((c, s)) = e.pair() {
                g.pull_in(c.0)?;
                g.pull_in(s.0)?;
            }
            ends.insert(edge, e);
        }
        // The NAT fallback, for CLIENT spans whose exact key found no SERVER span.
        for i in 0..g.spans.len() {
            let c = &g.spans[i];
            if c.kind != kind::CLIENT || !nat_tried.insert(key_of(c)) {
                continue;
            }
            let (Some(edge), Some(_)) = edge_of(c) else {
                continue;
            };
            if ends.get(edge).is_some_and(|e| !e.servers.is_empty()) {
                continue;
            }
            let c = c.clone();
            if let Some(server) = nat_match(store, &c)? {
                g.pull_in(server.trace_id)?;
                if g.members.contains(&server.trace_id) {
                    nat.push((key_of(&c), key_of(&server)));
                }
            }
        }
        // Traces the fallback pulled in have edges of their own to follow.
        if cursor == g.spans.len() {
            break;
        }
    }
    let mut pairs = Vec::new();
    let mut warnings = Vec::new();
    let mut ambiguous_clients = HashSet::new();
    let mut keys: Vec<(&String, &Ends)> = ends.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (edge, e) in keys {
        if let Some((c, s)) = e.pair() {
            if let (Some(&ci), Some(&si)) = (g.index.get(&c), g.index.get(&s)) {
                pairs.push((ci, si, Source::TcpSeq));
            }
        } else if e.clients.len() > 1 || e.servers.len() > 1 {
            warnings.push(format!(
                "request {edge} is carried by {} CLIENT and {} SERVER spans: none of them linked by it",
                e.clients.len(),
                e.servers.len()
            ));
            ambiguous_clients.extend(e.clients.iter().filter_map(|c| g.index.get(c).copied()));
        }
    }
    for (c, s) in nat {
        if let (Some(&ci), Some(&si)) = (g.index.get(&c), g.index.get(&s)) {
            // A SERVER span with the exact key may have come in later (from beyond the lookup
            // window, through another trace): the exact pair wins.
            if !pairs.iter().any(|&(pc, _, _)| pc == ci) {
                pairs.push((ci, si, Source::TcpSeqNat));
            }
        }
    }
    Ok(Gathered {
        spans: g.spans,
        pairs,
        ambiguous_clients,
        warnings,
        truncated: g.truncated,
        members: g.members,
    })
}

/// Whether two spans are the same HTTP request by what both ends see of it.
fn same_request(a: &SpanRecord, b: &SpanRecord) -> bool {
    let m = |s| attr(s, "http.request.method");
    let p = |s| attr(s, "url.path");
    m(a).is_some() && m(a) == m(b) && p(a).is_some() && p(a) == p(b)
}

/// Whether `s`'s exact edge key is carried by a span of kind `other` (its exact other end).
fn has_exact_end(store: &dyn SpanStore, s: &SpanRecord, other: i32) -> Result<bool, StoreError> {
    let Some(edge) = edge_of(s).0 else {
        return Ok(false);
    };
    Ok(store
        .edge_spans(EdgeKey::Exact(edge), s.start_unix_nano)?
        .iter()
        .any(|o| o.kind == other && edge_of(o).0 == Some(edge)))
}

/// The candidates at the other end of `s` by sequence number alone: spans of kind `other`
/// with the same seq, method and path, that have no exact other end of their own.
fn seq_candidates(
    store: &dyn SpanStore,
    s: &SpanRecord,
    other: i32,
) -> Result<Vec<SpanRecord>, StoreError> {
    let Some(seq) = edge_of(s).1 else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for o in store.edge_spans(EdgeKey::Seq(seq), s.start_unix_nano)? {
        let back = if other == kind::SERVER {
            kind::CLIENT
        } else {
            kind::SERVER
        };
        if o.kind == other
            && edge_of(&o).1 == Some(seq)
            && same_request(s, &o)
            && !has_exact_end(store, &o, back)?
        {
            out.push(o);
        }
    }
    Ok(out)
}

/// The SERVER span of CLIENT span `c` by the NAT fallback: the only SERVER span with `c`'s
/// sequence number, method and path (and no exact CLIENT of its own), of which `c` is in turn
/// the only such CLIENT span. Addresses are not compared: behind NAT or a load balancer each end
/// sees different ones (a virtual IP and port on one side, the balancer's address on the other).
fn nat_match(store: &dyn SpanStore, c: &SpanRecord) -> Result<Option<SpanRecord>, StoreError> {
    let servers = seq_candidates(store, c, kind::SERVER)?;
    let [server] = &servers[..] else {
        return Ok(None);
    };
    let clients = seq_candidates(store, server, kind::CLIENT)?;
    Ok(match &clients[..] {
        [only] if key_of(only) == key_of(c) => Some(server.clone()),
        _ => None,
    })
}
