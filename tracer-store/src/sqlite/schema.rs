//! Versioned schema migrations. `PRAGMA user_version` counts the migrations applied; each runs
//! in its own transaction, so a crash mid-upgrade leaves the previous version intact. Migrations
//! are append-only: a released one never changes, a new layout is a new step.
use rusqlite::{params, Connection, Transaction};
use serde::Deserialize;

use super::{
    catalog::DbInterner,
    codec::{self, BodyRef},
    ctx, index_edges, index_tags,
};
use crate::{KeyValue, SpanEvent, SpanEventRef, SpanLink, SpanLinkRef, StoreError};

enum Step {
    Sql(&'static str),
    Code(fn(&Transaction<'_>) -> Result<(), StoreError>),
}

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&[Step]] = &[
    // 1: the first layout, JSON bodies and resources.
    &[Step::Sql(
        "CREATE TABLE services(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
         CREATE TABLE operations(id INTEGER PRIMARY KEY, service_id INTEGER NOT NULL, name TEXT NOT NULL,
                                 kind INTEGER NOT NULL, UNIQUE(service_id, name, kind));
         CREATE TABLE resources(id INTEGER PRIMARY KEY, hash INTEGER NOT NULL UNIQUE, attributes TEXT NOT NULL);
         CREATE TABLE spans(
            id INTEGER PRIMARY KEY,
            trace_id BLOB NOT NULL,
            span_id BLOB NOT NULL,
            parent_id BLOB,
            service_id INTEGER NOT NULL,
            operation_id INTEGER NOT NULL,
            start INTEGER NOT NULL,
            duration INTEGER NOT NULL,
            status INTEGER NOT NULL,
            resource_id INTEGER NOT NULL,
            body TEXT NOT NULL);
         CREATE INDEX spans_by_trace ON spans(trace_id);
         CREATE INDEX spans_by_service_start ON spans(service_id, start);
         CREATE INDEX spans_by_start ON spans(start);",
    )],
    // 2: binary bodies and resources with a string dictionary, the tag index, a span counter,
    // operation and duration in the service index, and the trace index as runs (see `recent`).
    &[
        Step::Sql(
            "CREATE TABLE strings(id INTEGER PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             ALTER TABLE resources RENAME TO v1_resources;
             ALTER TABLE spans RENAME TO v1_spans;
             CREATE TABLE resources(id INTEGER PRIMARY KEY, attributes BLOB NOT NULL);
             CREATE TABLE spans(
                id INTEGER PRIMARY KEY,
                trace_id BLOB NOT NULL,
                span_id BLOB NOT NULL,
                parent_id BLOB,
                service_id INTEGER NOT NULL,
                operation_id INTEGER NOT NULL,
                start INTEGER NOT NULL,
                duration INTEGER NOT NULL,
                status INTEGER NOT NULL,
                resource_id INTEGER NOT NULL,
                body BLOB NOT NULL);
             CREATE TABLE tag_index(hash INTEGER NOT NULL, start INTEGER NOT NULL, span INTEGER NOT NULL,
                                    PRIMARY KEY(hash, start, span)) WITHOUT ROWID;
             CREATE TABLE trace_runs(id INTEGER PRIMARY KEY, first_span INTEGER NOT NULL,
                                     last_span INTEGER NOT NULL);
             CREATE TABLE trace_index(run INTEGER NOT NULL, trace_id BLOB NOT NULL, span INTEGER NOT NULL,
                                      PRIMARY KEY(run, trace_id, span)) WITHOUT ROWID;",
        ),
        Step::Code(convert_v1),
        Step::Sql(
            "DROP TABLE v1_spans;
             DROP TABLE v1_resources;
             CREATE INDEX spans_by_service ON spans(service_id, start, operation_id, duration);
             CREATE INDEX spans_by_start ON spans(start);
             INSERT INTO trace_index(run, trace_id, span) SELECT 1, trace_id, id FROM spans ORDER BY trace_id, id;
             INSERT INTO trace_runs(id, first_span, last_span)
                SELECT 1, min(id), max(id) FROM spans HAVING count(*) > 0;
             INSERT INTO meta(key, value) VALUES ('span_count', (SELECT count(*) FROM spans));
             INSERT INTO meta(key, value) VALUES ('trace_indexed_upto', (SELECT coalesce(max(id), 0) FROM spans));",
        ),
    ],
    // 3: the edge index (both ends of a TCP request, for stitching traces across hosts),
    // filled from the spans already stored.
    &[
        Step::Sql(
            "CREATE TABLE edge_index(bucket INTEGER NOT NULL, seq INTEGER NOT NULL, span INTEGER NOT NULL,
                                     kind INTEGER NOT NULL, edge INTEGER,
                                     PRIMARY KEY(bucket, seq, span)) WITHOUT ROWID;",
        ),
        Step::Code(index_v2_edges),
    ],
    // 4: each operation's span count, so that retention can drop the names whose spans are
    // all gone (a client reaching a traced server can mint names at will).
    &[Step::Sql(
        "ALTER TABLE operations ADD COLUMN spans INTEGER NOT NULL DEFAULT 0;
         CREATE TEMP TABLE v4_counts(op INTEGER PRIMARY KEY, n INTEGER NOT NULL);
         INSERT INTO v4_counts SELECT operation_id, count(*) FROM spans GROUP BY operation_id;
         UPDATE operations SET spans = coalesce((SELECT n FROM v4_counts WHERE op = operations.id), 0);
         DROP TABLE v4_counts;",
    )],
];

/// The schema version this build writes.
pub(super) const VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database to [`VERSION`], refusing one written by a newer build.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(ctx("reading the schema version"))?;
    if found > VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: VERSION,
        });
    }
    if found == 1 && has_column(conn, "spans", "extra") {
        // The very first layout (2026-11-25, replaced within the hour, still user_version 1):
        // JSON `attrs` + `extra` columns that no released migration reads.
        return Err(StoreError::Database(
            "this store was written by a pre-release build whose layout cannot be upgraded \
             (spans with `attrs`/`extra` columns). Move the data directory aside (or delete it) \
             and start again; the collector then creates a new store"
                .into(),
        ));
    }
    for (i, steps) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i + 1;
        let what = || format!("migrating the schema to version {to}");
        let tx = conn
            .transaction()
            .map_err(|e| StoreError::Database(format!("{}: {e}", what())))?;
        for step in *steps {
            match step {
                Step::Sql(sql) => tx
                    .execute_batch(sql)
                    .map_err(|e| StoreError::Database(format!("{}: {e}", what())))?,
                Step::Code(f) => {
                    f(&tx).map_err(|e| StoreError::Database(format!("{}: {e}", what())))?
                }
            }
        }
        tx.pragma_update(None, "user_version", to)
            .and_then(|()| tx.commit())
            .map_err(|e| StoreError::Database(format!("{}: {e}", what())))?;
    }
    Ok(())
}

fn has_column(conn: &Connection, table: &str, column: &str) -> bool {
    conn.prepare(&format!(
        "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
    ))
    .and_then(|mut st| st.exists([column]))
    .unwrap_or(false)
}

/// A version-1 span body (JSON).
#[derive(Deserialize)]
struct V1Body {
    #[serde(rename = "k")]
    kind: i32,
    #[serde(rename = "m", default)]
    status_message: String,
    #[serde(rename = "a")]
    attributes: Vec<KeyValue>,
    #[serde(rename = "e", default)]
    events: Vec<SpanEvent>,
    #[serde(rename = "l", default)]
    links: Vec<SpanLink>,
    #[serde(rename = "s", default)]
    scope_name: String,
    #[serde(rename = "v", default)]
    scope_version: String,
}

/// Re-encodes version-1 resources and spans (ids kept, so spans keep their resource).
fn convert_v1(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let mut dict = DbInterner::new(tx).map_err(ctx("reading the dictionary"))?;
    let mut resources: std::collections::HashMap<i64, Vec<KeyValue>> = Default::default();
    {
        let mut st = tx
            .prepare("SELECT id, attributes FROM v1_resources")
            .map_err(ctx("reading version-1 resources"))?;
        let mut rows = st.query([]).map_err(ctx("reading version-1 resources"))?;
        let mut ins = tx
            .prepare("INSERT INTO resources(id, attributes) VALUES (?1, ?2)")
            .map_err(ctx("converting resources"))?;
        let mut blob = Vec::new();
        while let Some(r) = rows.next().map_err(ctx("reading version-1 resources"))? {
            let id: i64 = r.get(0).map_err(ctx("reading version-1 resources"))?;
            let json: String = r.get(1).map_err(ctx("reading version-1 resources"))?;
            let attrs: Vec<KeyValue> = serde_json::from_str(&json)
                .map_err(|e| StoreError::Database(format!("version-1 resource {id}: {e}")))?;
            blob.clear();
            let refs: Vec<_> = attrs.iter().map(KeyValue::as_ref).collect();
            codec::encode_resource(&mut blob, &refs, &mut dict);
            ins.execute(params![id, blob])
                .map_err(ctx("converting resources"))?;
            resources.insert(id, attrs);
        }
    }
    let mut st = tx
        .prepare(
            "SELECT id, trace_id, span_id, parent_id, service_id, operation_id, start, duration,
                    status, resource_id, body FROM v1_spans ORDER BY id",
        )
        .map_err(ctx("reading version-1 spans"))?;
    let mut rows = st.query([]).map_err(ctx("reading version-1 spans"))?;
    let mut ins = tx
        .prepare(
            "INSERT INTO spans(id, trace_id, span_id, parent_id, service_id, operation_id,
                    start, duration, status, resource_id, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .map_err(ctx("converting spans"))?;
    let mut tag = tx
        .prepare("INSERT OR IGNORE INTO tag_index(hash, start, span) VALUES (?1, ?2, ?3)")
        .map_err(ctx("converting spans"))?;
    let (mut body_buf, mut tags) = (Vec::new(), Vec::new());
    let no_resource = Vec::new();
    while let Some(r) = rows.next().map_err(ctx("reading version-1 spans"))? {
        let get = |e| StoreError::Database(format!("reading version-1 spans: {e}"));
        let id: i64 = r.get(0).map_err(get)?;
        let start: i64 = r.get(6).map_err(get)?;
        let status: i32 = r.get(8).map_err(get)?;
        let resource_id: i64 = r.get(9).map_err(get)?;
        let json: String = r.get(10).map_err(get)?;
        let b: V1Body = serde_json::from_str(&json)
            .map_err(|e| StoreError::Database(format!("version-1 span {id}: {e}")))?;
        body_buf.clear();
        // The owned v1 body as the borrowed records the codec takes.
        let attributes: Vec<_> = b.attributes.iter().map(KeyValue::as_ref).collect();
        let inner: Vec<Vec<_>> = b
            .events
            .iter()
            .map(|e| &e.attributes)
            .chain(b.links.iter().map(|l| &l.attributes))
            .map(|a| a.iter().map(KeyValue::as_ref).collect())
            .collect();
        let events: Vec<_> = b
            .events
            .iter()
            .zip(&inner)
            .map(|(e, a)| SpanEventRef {
                time_unix_nano: e.time_unix_nano,
                name: &e.name,
                attributes: a,
            })
            .collect();
        let links: Vec<_> = b
            .links
            .iter()
            .zip(&inner[b.events.len()..])
            .map(|(l, a)| SpanLinkRef {
                trace_id: l.trace_id,
                span_id: l.span_id,
                attributes: a,
            })
            .collect();
        codec::encode_body(
            &mut body_buf,
            &BodyRef {
                kind: b.kind,
                start_unix_nano: start as u64,
                status_message: &b.status_message,
                attributes: &attributes,
                events: &events,
                links: &links,
                scope_name: &b.scope_name,
                scope_version: &b.scope_version,
            },
            &mut dict,
        );
        ins.execute(params![
            id,
            r.get::<_, rusqlite::types::Value>(1).map_err(get)?,
            r.get::<_, rusqlite::types::Value>(2).map_err(get)?,
            r.get::<_, rusqlite::types::Value>(3).map_err(get)?,
            r.get::<_, i64>(4).map_err(get)?,
            r.get::<_, i64>(5).map_err(get)?,
            start,
            r.get::<_, i64>(7).map_err(get)?,
            status,
            resource_id,
            body_buf,
        ])
        .map_err(ctx("converting spans"))?;
        tags.clear();
        index_tags(&attributes, status, &mut tags);
        let resource: Vec<_> = resources
            .get(&resource_id)
            .unwrap_or(&no_resource)
            .iter()
            .map(KeyValue::as_ref)
            .collect();
        index_tags(&resource, crate::status::UNSET, &mut tags);
        tags.sort_unstable();
        tags.dedup();
        for h in &tags {
            tag.execute(params![h, start, id])
                .map_err(ctx("converting spans"))?;
        }
    }
    if let Some(e) = dict.error.take() {
        return Err(StoreError::Database(format!("growing the dictionary: {e}")));
    }
    Ok(())
}

/// Indexes the edges of the spans stored before the edge index existed.
fn index_v2_edges(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let dict = DbInterner::new(tx).map_err(ctx("reading the dictionary"))?;
    let what = "indexing the edges of stored spans";
    let mut st = tx
        .prepare("SELECT id, start, body FROM spans ORDER BY id")
        .map_err(ctx(what))?;
    let mut rows = st.query([]).map_err(ctx(what))?;
    let mut ins = tx
        .prepare(
            "INSERT OR IGNORE INTO edge_index(bucket, seq, span, kind, edge) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(ctx(what))?;
    let mut edges = Vec::new();
    while let Some(r) = rows.next().map_err(ctx(what))? {
        let id: i64 = r.get(0).map_err(ctx(what))?;
        let start = r.get::<_, i64>(1).map_err(ctx(what))? as u64;
        let body = r
            .get_ref(2)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(ctx(what))?;
        let b = codec::decode_body(body, start, &dict)
            .map_err(|e| StoreError::Database(format!("{what}: span {id}: {e}")))?;
        let attrs: Vec<_> = b.attributes.iter().map(KeyValue::as_ref).collect();
        edges.clear();
        index_edges(b.kind, &attrs, start, &mut edges);
        for e in &edges {
            ins.execute(params![e.bucket, e.seq, id, e.kind, e.edge])
                .map_err(ctx(what))?;
        }
    }
    Ok(())
}
