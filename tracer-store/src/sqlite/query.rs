//! Reads: traces by id, trace search, the service map, and the tag keys retention must delete.
use std::{
    collections::{hash_map::Entry, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use rusqlite::{Connection, OptionalExtension, Params, Row};

use super::{
    codec, ctx, edge_bucket, edge_buckets, edge_hash, edge_seq, index_edges, index_tags, lock,
    searchable_tag, EdgeEntry, Inner,
};
use crate::{
    kind, status, DependencyLink, KeyValue, LimitedTrace, SpanId, SpanRecord, StoreError, TraceId,
    TraceLimit, TraceQuery,
};

/// Candidate spans a search examines at most when they need checking beyond what the driving
/// index guarantees (tags, durations): bounds the worst case (a rare tag over a long window)
/// to well under a second, at the price of possibly fewer results than asked for.
const SCAN_LIMIT: usize = 200_000;
/// Decoded resources kept for reads.
const MAX_CACHED_RESOURCES: usize = 4_096;

/// A resource as stored and decoded.
pub(super) struct Resource {
    blob: Vec<u8>,
    attrs: Arc<Vec<KeyValue>>,
}

fn blob<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r [u8]> {
    Ok(r.get_ref(i)?.as_blob()?)
}

fn blob_or_null<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<Option<&'r [u8]>> {
    Ok(r.get_ref(i)?.as_blob_or_null()?)
}

fn corrupt(e: codec::Corrupt) -> StoreError {
    StoreError::Database(e.to_string())
}

fn resource(inner: &Inner, c: &Connection, id: i64) -> Result<Arc<Resource>, StoreError> {
    if let Some(r) = lock(&inner.resources).get(&id) {
        return Ok(r.clone());
    }
    let blob: Vec<u8> = c
        .prepare_cached("SELECT attributes FROM resources WHERE id = ?1")
        .and_then(|mut st| st.query_row([id], |r| r.get(0)))
        .map_err(|e| StoreError::Database(format!("reading resource {id}: {e}")))?;
    let attrs = {
        let cat = inner.catalog.read().unwrap_or_else(|e| e.into_inner());
        codec::decode_resource(&blob, &*cat).map_err(corrupt)?
    };
    let r = Arc::new(Resource {
        blob,
        attrs: Arc::new(attrs),
    });
    let mut cache = lock(&inner.resources);
    if cache.len() >= MAX_CACHED_RESOURCES {
        cache.clear();
    }
    cache.insert(id, r.clone());
    Ok(r)
}

fn trace_id_of(b: &[u8]) -> Result<TraceId, StoreError> {
    b.try_into()
        .map_err(|_| StoreError::Database(format!("a stored trace id has {} bytes", b.len())))
}

/// Row ids of a trace's spans: the recent ones from memory, the others from each run. Memory
/// is read first: a run written meanwhile committed before its spans left memory, so the
/// database read that follows (a newer snapshot) sees it.
fn trace_rows(inner: &Inner, c: &Connection, trace_id: &TraceId) -> Result<Vec<i64>, StoreError> {
    let mut rows = Vec::new();
    inner.read_recent().rows(trace_id, &mut rows);
    let mut st = c
        .prepare_cached(
            "SELECT t.span FROM trace_runs r
             CROSS JOIN trace_index t ON t.run = r.id AND t.trace_id = ?1",
        )
        .map_err(ctx("looking up a trace"))?;
    let found = st
        .query_map([&trace_id[..]], |r| r.get::<_, i64>(0))
        .map_err(ctx("looking up a trace"))?;
    for row in found {
        rows.push(row.map_err(ctx("looking up a trace"))?);
    }
    rows.sort_unstable();
    rows.dedup();
    Ok(rows)
}

pub(super) fn load_trace(
    inner: &Inner,
    c: &Connection,
    trace_id: &TraceId,
) -> Result<Vec<SpanRecord>, StoreError> {
    Ok(load_trace_limited(inner, c, trace_id, TraceLimit::NONE)?.spans)
}

/// The trace's spans in arrival order (row ids rise with arrival) until `limit`, then sorted
/// by start: only the row ids of the rest are read.
pub(super) fn load_trace_limited(
    inner: &Inner,
    c: &Connection,
    trace_id: &TraceId,
    limit: TraceLimit,
) -> Result<LimitedTrace, StoreError> {
    let rows = trace_rows(inner, c, trace_id)?;
    let mut out = Vec::with_capacity(rows.len().min(limit.max_spans).min(65_536));
    let mut order = Vec::with_capacity(out.capacity());
    let (mut bytes, mut truncated) = (0, false);
    for &id in &rows {
        if out.len() >= limit.max_spans || bytes >= limit.max_bytes {
            truncated = true;
            break;
        }
        let Some(span) = span_at(inner, c, id)? else {
            continue; // deleted by retention since it was indexed
        };
        if span.trace_id != *trace_id {
            continue; // a stale index entry
        }
        bytes += span.approx_bytes();
        order.push((span.start_unix_nano, id));
        out.push(span);
    }
    // By start, ties in arrival order.
    let mut idx: Vec<usize> = (0..out.len()).collect();
    idx.sort_by_key(|i| order[*i]);
    let mut slots: Vec<Option<SpanRecord>> = out.into_iter().map(Some).collect();
    let spans: Vec<SpanRecord> = idx.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok(LimitedTrace {
        total: if truncated { rows.len() } else { spans.len() },
        spans,
        truncated,
        bytes,
    })
}

/// The span in row `id`, if it still exists.
fn span_at(inner: &Inner, c: &Connection, id: i64) -> Result<Option<SpanRecord>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT s.span_id, s.parent_id, sv.name, o.name, s.start, s.duration, s.status,
                    s.resource_id, s.body, s.trace_id
             FROM spans s
             CROSS JOIN services sv ON sv.id = s.service_id
             CROSS JOIN operations o ON o.id = s.operation_id
             WHERE s.id = ?1",
        )
        .map_err(ctx("reading a span"))?;
    let mut found = st.query([id]).map_err(ctx("reading a span"))?;
    let Some(r) = found.next().map_err(ctx("reading a span"))? else {
        return Ok(None);
    };
    let get = |e: rusqlite::Error| StoreError::Database(format!("reading a span: {e}"));
    let trace_id = trace_id_of(blob(r, 9).map_err(get)?)?;
    let span_id = blob(r, 0).map_err(get)?;
    let parent = blob_or_null(r, 1).map_err(get)?;
    let start = r.get::<_, i64>(4).map_err(get)? as u64;
    let resource = resource(inner, c, r.get(7).map_err(get)?)?;
    let body = {
        let blob = blob(r, 8).map_err(get)?;
        let cat = inner.catalog.read().unwrap_or_else(|e| e.into_inner());
        codec::decode_body(blob, start, &*cat).map_err(corrupt)?
    };
    Ok(Some(SpanRecord {
        trace_id,
        span_id: span_id
            .try_into()
            .map_err(|_| StoreError::Database("a stored span id is not 8 bytes".into()))?,
        parent_span_id: parent
            .map(|p| {
                p.try_into().map_err(|_| {
                    StoreError::Database("a stored parent span id is not 8 bytes".into())
                })
            })
            .transpose()?,
        service: r.get(2).map_err(get)?,
        operation: r.get(3).map_err(get)?,
        kind: body.kind,
        start_unix_nano: start,
        duration_nano: r.get::<_, i64>(5).map_err(get)? as u64,
        status_code: r.get(6).map_err(get)?,
        status_message: body.status_message,
        attributes: body.attributes,
        resource: resource.attrs.clone(),
        events: body.events,
        links: body.links,
        scope_name: body.scope_name,
        scope_version: body.scope_version,
    }))
}

/// The spans indexed under `key` around `near` (see [`crate::SpanStore::edge_spans`]): one
/// seek per bucket of the window.
pub(super) fn edge_spans(
    inner: &Inner,
    c: &Connection,
    key: crate::EdgeKey<'_>,
    near: u64,
) -> Result<Vec<SpanRecord>, StoreError> {
    let what = "looking up an edge";
    let (seq, edge) = match key {
        crate::EdgeKey::Exact(e) => match edge_seq(e) {
            Some(seq) => (seq, Some(edge_hash(e))),
            None => return Ok(Vec::new()),
        },
        crate::EdgeKey::Seq(seq) => (seq, None),
    };
    // One statement: the buckets as a series, each joined to the index by a seek.
    let buckets = edge_buckets(near);
    let ids: Vec<i64> = c
        .prepare_cached(
            "WITH RECURSIVE b(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM b WHERE x < ?2)
             SELECT e.span FROM b CROSS JOIN edge_index e
             WHERE e.bucket = b.x AND e.seq = ?3 AND (?4 IS NULL OR e.edge = ?4)",
        )
        .and_then(|mut st| {
            st.query_map(
                rusqlite::params![buckets.start(), buckets.end(), seq, edge],
                |r| r.get(0),
            )?
            .collect()
        })
        .map_err(ctx(what))?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(span) = span_at(inner, c, id)? {
            out.push(span);
        }
    }
    Ok(out)
}

/// A tag condition of a search.
struct Cond<'q> {
    key: &'q str,
    value: &'q str,
    matcher: codec::TagMatcher<'q>,
}

impl Cond<'_> {
    fn holds(
        &self,
        status_code: i32,
        body: &[u8],
        resource: &dyn Fn() -> Result<Arc<Resource>, StoreError>,
    ) -> Result<bool, StoreError> {
        // What the query API shows as tags without being attributes.
        let pseudo = match self.key {
            "error" => (status_code == status::ERROR) == (self.value == "true"),
            "otel.status_code" => match self.value {
                "ERROR" => status_code == status::ERROR,
                "OK" => status_code == status::OK,
                _ => false,
            },
            "span.kind" => {
                let k = codec::TagMatcher::body_kind(body).map_err(corrupt)?;
                kind::name(k) == Some(self.value)
            }
            _ => false,
        };
        Ok(pseudo
            || self.matcher.in_body(body).map_err(corrupt)?
            || self
                .matcher
                .in_resource(&resource()?.blob)
                .map_err(corrupt)?)
    }
}

/// The index a search walks, newest first.
enum Driver {
    /// The tag index, for a tag it has.
    Tag(i64),
    /// The service index, which also holds operation and duration: those filters need no
    /// table reads.
    Service(i64),
    Time,
}

fn clamp(t: u64) -> i64 {
    t.min(i64::MAX as u64) as i64
}

/// What a search checks of a span beyond its driving index.
struct Filter<'q> {
    service_id: Option<i64>,
    operation_ids: Option<Vec<i64>>,
    min_duration: Option<i64>,
    max_duration: Option<i64>,
    conds: Vec<Cond<'q>>,
}

impl Filter<'_> {
    fn columns_match(&self, service: i64, operation: i64, duration: i64) -> bool {
        self.service_id.is_none_or(|s| s == service)
            && self
                .operation_ids
                .as_ref()
                .is_none_or(|ops| ops.contains(&operation))
            && self.min_duration.is_none_or(|m| duration >= m)
            && self.max_duration.is_none_or(|m| duration <= m)
    }
}

/// The trace of a span that passed the column checks, if its tags match too and its trace is
/// not found already.
#[allow(clippy::too_many_arguments)]
fn candidate(
    inner: &Inner,
    c: &Connection,
    filter: &Filter<'_>,
    seen: &HashSet<TraceId>,
    trace_id: &[u8],
    status_code: i32,
    resource_id: i64,
    body: &[u8],
) -> Result<Option<TraceId>, StoreError> {
    let tid = trace_id_of(trace_id)?;
    if seen.contains(&tid) {
        return Ok(None);
    }
    let res = || resource(inner, c, resource_id);
    for cond in &filter.conds {
        if !cond.holds(status_code, body, &res)? {
            return Ok(None);
        }
    }
    Ok(Some(tid))
}

pub(super) fn find_traces(
    inner: &Inner,
    c: &Connection,
    q: &TraceQuery,
) -> Result<Vec<Vec<SpanRecord>>, StoreError> {
    let found = find_trace_ids(inner, c, q)?;
    let mut out = Vec::with_capacity(found.len());
    for t in &found {
        let spans = load_trace(inner, c, t)?;
        // Empty only in the instant between a commit and its spans entering the trace index.
        if !spans.is_empty() {
            out.push(spans);
        }
    }
    Ok(out)
}

pub(super) fn find_trace_ids(
    inner: &Inner,
    c: &Connection,
    q: &TraceQuery,
) -> Result<Vec<TraceId>, StoreError> {
    let service_id: Option<i64> = match &q.service {
        Some(name) => match c
            .prepare_cached("SELECT id FROM services WHERE name = ?1")
            .and_then(|mut st| st.query_row([name], |r| r.get(0)).optional())
            .map_err(ctx("looking up the service"))?
        {
            Some(id) => Some(id),
            None => return Ok(Vec::new()),
        },
        None => None,
    };
    let operation_ids: Option<Vec<i64>> = match &q.operation {
        Some(op) => {
            let mut st = c
                .prepare_cached(
                    "SELECT id FROM operations WHERE name = ?1 AND (?2 IS NULL OR service_id = ?2)",
                )
                .map_err(ctx("looking up the operation"))?;
            let ids = st
                .query_map(rusqlite::params![op, service_id], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<i64>, _>>())
                .map_err(ctx("looking up the operation"))?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            Some(ids)
        }
        None => None,
    };
    let start = clamp(q.start_unix_nano.unwrap_or(0));
    let end = clamp(q.end_unix_nano.unwrap_or(u64::MAX));
    if start > end {
        return Ok(Vec::new());
    }
    let conds: Vec<Cond<'_>> = {
        let cat = inner.catalog.read().unwrap_or_else(|e| e.into_inner());
        q.tags
            .iter()
            .map(|(k, v)| Cond {
                key: k,
                value: v,
                matcher: codec::TagMatcher::new(k, v, cat.string_id(k)),
            })
            .collect()
    };
    let driver = if let Some(h) = q.tags.iter().find_map(|(k, v)| searchable_tag(k, v)) {
        Driver::Tag(h)
    } else if let Some(svc) = service_id {
        Driver::Service(svc)
    } else {
        Driver::Time
    };
    let filter = Filter {
        service_id,
        operation_ids,
        min_duration: q.min_duration_nano.map(clamp),
        max_duration: q.max_duration_nano.map(clamp),
        conds,
    };
    // Columns: id, service_id, operation_id, duration, then (unless the driver is the
    // covering service index) trace_id, status, resource_id, body.
    let full = "s.id, s.service_id, s.operation_id, s.duration, s.trace_id, s.status, s.resource_id, s.body";
    let (sql, key) = match driver {
        Driver::Tag(h) => (
            format!(
                "SELECT {full} FROM tag_index t CROSS JOIN spans s ON s.id = t.span
                 WHERE t.hash = ?3 AND t.start >= ?1 AND t.start <= ?2 AND s.start = t.start
                 ORDER BY t.start DESC, t.span DESC"
            ),
            Some(h),
        ),
        Driver::Service(svc) => (
            "SELECT s.id, s.service_id, s.operation_id, s.duration FROM spans s INDEXED BY spans_by_service
             WHERE s.service_id = ?3 AND s.start >= ?1 AND s.start <= ?2
             ORDER BY s.start DESC"
                .to_owned(),
            Some(svc),
        ),
        Driver::Time => (
            format!(
                "SELECT {full} FROM spans s INDEXED BY spans_by_start
                 WHERE s.start >= ?1 AND s.start <= ?2 AND ?3 IS NULL
                 ORDER BY s.start DESC"
            ),
            None,
        ),
    };
    // Whether a candidate can fail a check: then the scan is bounded.
    let bounded = !filter.conds.is_empty()
        || filter.min_duration.is_some()
        || filter.max_duration.is_some()
        || filter.operation_ids.is_some()
        || (service_id.is_some() && !matches!(driver, Driver::Service(_)));
    let limit = q.limit.max(1);
    let mut found: Vec<TraceId> = Vec::new();
    let mut seen: HashSet<TraceId> = HashSet::new();
    {
        let what = "searching traces";
        let mut st = c.prepare_cached(&sql).map_err(ctx(what))?;
        let mut fetch = c
            .prepare_cached("SELECT trace_id, status, resource_id, body FROM spans WHERE id = ?1")
            .map_err(ctx(what))?;
        let mut rows = st
            .query(rusqlite::params![start, end, key])
            .map_err(ctx(what))?;
        let mut scanned = 0usize;
        while let Some(r) = rows.next().map_err(ctx(what))? {
            scanned += 1;
            if bounded && scanned > SCAN_LIMIT {
                break;
            }
            let num = |i: usize| r.get::<_, i64>(i).map_err(ctx(what));
            if !filter.columns_match(num(1)?, num(2)?, num(3)?) {
                continue;
            }
            let hit = if r.as_ref().column_count() > 4 {
                let blob = |i: usize| blob(r, i).map_err(ctx(what));
                candidate(
                    inner,
                    c,
                    &filter,
                    &seen,
                    blob(4)?,
                    num(5)? as i32,
                    num(6)?,
                    blob(7)?,
                )?
            } else {
                let mut one = fetch.query([num(0)?]).map_err(ctx(what))?;
                match one.next().map_err(ctx(what))? {
                    Some(f) => {
                        let blob = |i: usize| blob(f, i).map_err(ctx(what));
                        let n = |i: usize| f.get::<_, i64>(i).map_err(ctx(what));
                        candidate(
                            inner,
                            c,
                            &filter,
                            &seen,
                            blob(0)?,
                            n(1)? as i32,
                            n(2)?,
                            blob(3)?,
                        )?
                    }
                    None => None, // deleted meanwhile
                }
            };
            if let Some(tid) = hit {
                seen.insert(tid);
                found.push(tid);
                if found.len() >= limit {
                    break;
                }
            }
        }
    }
    Ok(found)
}

/// How far before a child span its parent is looked for while scanning by start time; parents
/// further back (or after, beyond `SKEW`) are looked up by trace id instead.
const PARENT_SLACK: i64 = 10_000_000_000;
/// How far after a child its parent may start (clocks of different hosts disagree).
const SKEW: i64 = 2_000_000_000;

/// A child span whose parent is wanted.
struct Child {
    start: i64,
    trace_id: TraceId,
    parent_id: SpanId,
    service: i64,
    duration: i64,
    status: i32,
}

/// The service map. Spans are scanned by start time, from a little before the window to a
/// little after it, keeping the spans of a sliding slice of time in a map: nearly every child
/// finds its parent there (parents start shortly before their children), with memory bounded
/// by the spans of `PARENT_SLACK + SKEW` rather than of the whole window. The few others
/// (very long parents, skewed clocks) are looked up by trace id. Either way a parent counts
/// wherever it is in time and in whichever order parent and child were written. A SERVER span
/// that [`stitched_parents`] pairs with its CLIENT span counts with that span's service as its
/// parent, whatever parent it was stored with.
pub(super) fn dependencies(
    inner: &Inner,
    c: &Connection,
    end_unix_nano: u64,
    lookback_nano: u64,
) -> Result<Vec<DependencyLink>, StoreError> {
    let what = "computing the service map";
    let from = clamp(end_unix_nano.saturating_sub(lookback_nano));
    let end = clamp(end_unix_nano);
    let stitched = stitched_parents(c, from, end)?;
    let mut st = c
        .prepare_cached(
            "SELECT start, trace_id, span_id, parent_id, service_id, duration, status, id
             FROM spans INDEXED BY spans_by_start
             WHERE start >= ?1 AND start <= ?2 ORDER BY start",
        )
        .map_err(ctx(what))?;
    let mut rows = st
        .query(rusqlite::params![
            from.saturating_sub(PARENT_SLACK + SKEW),
            end.saturating_add(SKEW)
        ])
        .map_err(ctx(what))?;
    // Each span's service, and whether the span is an error: a call is an error on the map if
    // either end says so (a CLIENT span with a 4xx is an error on the caller's side only).
    let mut services: HashMap<(TraceId, SpanId), (i64, bool)> = HashMap::new();
    let mut by_start: VecDeque<(i64, TraceId, SpanId)> = VecDeque::new();
    let mut waiting: VecDeque<Child> = VecDeque::new();
    let mut unresolved: Vec<Child> = Vec::new();
    let mut edges: HashMap<(i64, i64), (u64, Vec<u64>)> = HashMap::new();
    let mut add_edge = |(parent, parent_error): (i64, bool), c: &Child| {
        if parent != c.service {
            let e = edges.entry((parent, c.service)).or_default();
            e.0 += u64::from(parent_error || c.status == status::ERROR);
            e.1.push(c.duration as u64);
        }
    };
    let blob8 = |v: &[u8]| -> Result<SpanId, StoreError> {
        v.try_into()
            .map_err(|_| StoreError::Database(format!("{what}: a stored span id is not 8 bytes")))
    };
    loop {
        let row = rows.next().map_err(ctx(what))?;
        let now = match row {
            Some(r) => r.get::<_, i64>(0).map_err(ctx(what))?,
            None => i64::MAX,
        };
        // Children whose parent had every chance to show up by now.
        while waiting
            .front()
            .is_some_and(|c| c.start.saturating_add(SKEW) < now)
        {
            let Some(child) = waiting.pop_front() else {
                break;
            };
            match services.get(&(child.trace_id, child.parent_id)) {
                Some(p) => add_edge(*p, &child),
                None => unresolved.push(child),
            }
        }
        let Some(r) = row else { break };
        while by_start
            .front()
            .is_some_and(|(t, _, _)| *t < now.saturating_sub(PARENT_SLACK + SKEW))
        {
            if let Some((_, t, s)) = by_start.pop_front() {
                services.remove(&(t, s));
            }
        }
        let trace_id = trace_id_of(blob(r, 1).map_err(ctx(what))?)?;
        let span_id = blob8(blob(r, 2).map_err(ctx(what))?)?;
        let service: i64 = r.get(4).map_err(ctx(what))?;
        let error = r.get::<_, i32>(6).map_err(ctx(what))? == status::ERROR;
        services.insert((trace_id, span_id), (service, error));
        by_start.push_back((now, trace_id, span_id));
        if now >= from && now <= end {
            if let Some(client) = stitched.get(&r.get::<_, i64>(7).map_err(ctx(what))?) {
                add_edge(
                    *client,
                    &Child {
                        start: now,
                        trace_id,
                        parent_id: [0; 8],
                        service,
                        duration: r.get(5).map_err(ctx(what))?,
                        status: r.get(6).map_err(ctx(what))?,
                    },
                );
            } else if let Some(p) = blob_or_null(r, 3).map_err(ctx(what))? {
                waiting.push_back(Child {
                    start: now,
                    trace_id,
                    parent_id: blob8(p)?,
                    service,
                    duration: r.get(5).map_err(ctx(what))?,
                    status: r.get(6).map_err(ctx(what))?,
                });
            }
        }
    }
    drop(rows);
    drop(services);
    if !unresolved.is_empty() {
        let mut st = c
            .prepare_cached("SELECT trace_id, span_id, service_id, status FROM spans WHERE id = ?1")
            .map_err(ctx(what))?;
        let mut by_trace: HashMap<TraceId, HashMap<SpanId, (i64, bool)>> = HashMap::new();
        for child in &unresolved {
            let spans = match by_trace.entry(child.trace_id) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let mut spans = HashMap::new();
                    for id in trace_rows(inner, c, &child.trace_id)? {
                        let mut found = st.query([id]).map_err(ctx(what))?;
                        if let Some(r) = found.next().map_err(ctx(what))? {
                            if blob(r, 0).map_err(ctx(what))? == &child.trace_id[..] {
                                let s = blob8(blob(r, 1).map_err(ctx(what))?)?;
                                let error = r.get::<_, i32>(3).map_err(ctx(what))? == status::ERROR;
                                spans.insert(s, (r.get(2).map_err(ctx(what))?, error));
                            }
                        }
                    }
                    e.insert(spans)
                }
            };
            if let Some(p) = spans.get(&child.parent_id) {
                add_edge(*p, child);
            }
        }
    }
    let names: HashMap<i64, String> = c
        .prepare_cached("SELECT id, name FROM services")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(ctx(what))?;
    let name = |id: i64| {
        names
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::Database(format!("{what}: unknown service id {id}")))
    };
    let mut out = Vec::with_capacity(edges.len());
    for ((parent, child), (errors, mut durations)) in edges {
        let n = durations.len();
        let sum: u128 = durations.iter().map(|d| u128::from(*d)).sum();
        // Nearest rank: the smallest duration at or above 95% of the calls.
        let rank = (n * 95).div_ceil(100).max(1) - 1;
        let (_, p95, _) = durations.select_nth_unstable(rank);
        out.push(DependencyLink {
            parent: name(parent)?,
            child: name(child)?,
            call_count: n as u64,
            error_count: errors,
            avg_duration_nano: (sum / n as u128) as u64,
            p95_duration_nano: *p95,
        });
    }
    out.sort_by(|a, b| (&a.parent, &a.child).cmp(&(&b.parent, &b.child)));
    Ok(out)
}

/// SERVER spans (row ids) that started in `[from, end]` and whose exact edge key has exactly
/// one CLIENT and one SERVER span around them, with the CLIENT span's service: the pairs the
/// stitcher links (its NAT fallback is not counted here). Keys carried by more than one span of
/// a kind are left out, as the stitcher leaves them unlinked.
fn stitched_parents(
    c: &Connection,
    from: i64,
    end: i64,
) -> Result<HashMap<i64, (i64, bool)>, StoreError> {
    let what = "pairing the ends of requests for the service map";
    let window = crate::EDGE_WINDOW_NANO as i64;
    let mut st = c
        .prepare_cached(
            "SELECT e.edge, e.kind, e.span, s.service_id, s.start, s.status
             FROM edge_index e CROSS JOIN spans s ON s.id = e.span
             WHERE e.bucket BETWEEN ?1 AND ?2 AND e.edge IS NOT NULL",
        )
        .map_err(ctx(what))?;
    let mut rows = st
        .query(rusqlite::params![
            edge_bucket(from.saturating_sub(window).max(0) as u64),
            edge_bucket(end.saturating_add(window) as u64),
        ])
        .map_err(ctx(what))?;
    /// Per key: CLIENT spans seen, their service and error; SERVER spans seen, the row and its
    /// start.
    #[derive(Default)]
    struct Ends {
        clients: u32,
        client_service: (i64, bool),
        servers: u32,
        server: (i64, i64),
    }
    let mut by_key: HashMap<i64, Ends> = HashMap::new();
    while let Some(r) = rows.next().map_err(ctx(what))? {
        let get = |i: usize| r.get::<_, i64>(i).map_err(ctx(what));
        let e = by_key.entry(get(0)?).or_default();
        match get(1)? as i32 {
            kind::CLIENT => {
                e.clients += 1;
                e.client_service = (get(3)?, get(5)? as i32 == status::ERROR);
            }
            kind::SERVER => {
                e.servers += 1;
                e.server = (get(2)?, get(4)?);
            }
            _ => {}
        }
    }
    Ok(by_key
        .into_values()
        .filter(|e| e.clients == 1 && e.servers == 1 && (from..=end).contains(&e.server.1))
        .map(|e| (e.server.0, e.client_service))
        .collect())
}

/// A span about to be deleted, with the index entries that point at it.
pub(super) struct Victim {
    pub id: i64,
    pub start: i64,
    pub tags: Vec<i64>,
    pub edges: Vec<EdgeEntry>,
}

/// Runs `sql` (selecting id, start, status, resource_id, body) and returns each span's id,
/// start, tag and edge index entries, recomputed from its body exactly as they were at insert.
pub(super) fn tagged_spans(
    inner: &Inner,
    c: &Connection,
    sql: &str,
    params: impl Params,
) -> Result<Vec<Victim>, StoreError> {
    let what = "reading spans to delete";
    let mut st = c.prepare_cached(sql).map_err(ctx(what))?;
    let mut rows = st.query(params).map_err(ctx(what))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(ctx(what))? {
        let id: i64 = r.get(0).map_err(ctx(what))?;
        let start: i64 = r.get(1).map_err(ctx(what))?;
        let status_code: i32 = r.get(2).map_err(ctx(what))?;
        let res = resource(inner, c, r.get(3).map_err(ctx(what))?)?;
        let body = blob(r, 4).map_err(ctx(what))?;
        let decoded = {
            let cat = inner.catalog.read().unwrap_or_else(|e| e.into_inner());
            codec::decode_body(body, start as u64, &*cat).map_err(corrupt)?
        };
        let mut tags = Vec::new();
        let refs: Vec<_> = decoded.attributes.iter().map(KeyValue::as_ref).collect();
        index_tags(&refs, status_code, &mut tags);
        let mut edges = Vec::new();
        index_edges(decoded.kind, &refs, start as u64, &mut edges);
        let refs: Vec<_> = res.attrs.iter().map(KeyValue::as_ref).collect();
        index_tags(&refs, status::UNSET, &mut tags);
        tags.sort_unstable();
        tags.dedup();
        out.push(Victim {
            id,
            start,
            tags,
            edges,
        });
    }
    Ok(out)
}
