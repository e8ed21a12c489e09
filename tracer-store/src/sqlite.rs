//! The embedded store: one SQLite database file (WAL mode) in the data directory.
//!
//! Layout: spans are rows with the fields queries filter on as columns (trace id, service,
//! operation, start, duration, status), the attributes in one text column and the rare rest
//! (events, links, status message, scope) as JSON, so a write is one row and three small index
//! entries, not one row per attribute.
//! Resources (host and process facts shared by many spans) are stored once, by hash.
//!
//! Attributes are stored as text in a separator format (see `encode_attrs`) that SQLite can
//! search with `instr`, so tag filters run inside the database over the rows the service/time
//! index yields, newest first, and stop at the limit.
//!
//! Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL (the OS page cache) before
//! `write` returns, so a killed process (`kill -9`) loses nothing acknowledged; a power loss can
//! lose the last transactions, which a tracing store accepts for a ~10x faster commit.
use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Mutex,
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::{
    AttrValue, DependencyLink, KeyValue, Operation, Retention, RetentionReport, SpanEvent,
    SpanLink, SpanRecord, SpanStore, StoreError, StoreStats, TraceId, TraceQuery,
};

/// Schema migrations, applied in order; `PRAGMA user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE services(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
     CREATE TABLE operations(id INTEGER PRIMARY KEY, service_id INTEGER NOT NULL, name TEXT NOT NULL,
                             kind INTEGER NOT NULL, UNIQUE(service_id, name, kind));
     CREATE TABLE resources(id INTEGER PRIMARY KEY, hash INTEGER NOT NULL UNIQUE, attrs TEXT NOT NULL);
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
        attrs TEXT NOT NULL,
        extra TEXT NOT NULL);
     CREATE INDEX spans_by_trace ON spans(trace_id);
     CREATE INDEX spans_by_service_start ON spans(service_id, start);
     CREATE INDEX spans_by_start ON spans(start);",
];

/// Rows deleted per retention step, so ingest waits for the writer lock only briefly.
const DELETE_CHUNK: i64 = 20_000;

/// What a span row keeps beside its columns and attributes (JSON; mostly tiny).
#[derive(Serialize, Deserialize)]
struct Extra {
    #[serde(rename = "k")]
    kind: i32,
    #[serde(rename = "m", default, skip_serializing_if = "String::is_empty")]
    status_message: String,
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    events: Vec<SpanEvent>,
    #[serde(rename = "l", default, skip_serializing_if = "Vec::is_empty")]
    links: Vec<SpanLink>,
    #[serde(rename = "s", default, skip_serializing_if = "String::is_empty")]
    scope_name: String,
    #[serde(rename = "v", default, skip_serializing_if = "String::is_empty")]
    scope_version: String,
}

/// Separators of the attribute text format: `RS key US value US type ... RS`. Every attribute is
/// bounded by RS on both sides, so `instr(attrs, RS key US value US)` finds exactly that
/// key/value pair, whatever its type; SQLite does tag filtering without decoding anything.
const RS: char = '\u{1e}';
const US: char = '\u{1f}';

fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([RS, US]) {
        // The separators cannot appear inside; they are replaced (practically never happens).
        std::borrow::Cow::Owned(s.replace([RS, US], "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn encode_attrs(kvs: &[KeyValue]) -> String {
    let mut out = String::with_capacity(kvs.len() * 32 + 1);
    out.push(RS);
    for kv in kvs {
        let t = match kv.value {
            AttrValue::Str(_) => 's',
            AttrValue::Int(_) => 'i',
            AttrValue::Float(_) => 'f',
            AttrValue::Bool(_) => 'b',
            AttrValue::Json(_) => 'j',
        };
        out.push_str(&clean(&kv.key));
        out.push(US);
        match &kv.value {
            AttrValue::Str(v) | AttrValue::Json(v) => out.push_str(&clean(v)),
            other => out.push_str(&other.as_text()),
        }
        out.push(US);
        out.push(t);
        out.push(RS);
    }
    out
}

fn decode_attrs(text: &str) -> Result<Vec<KeyValue>, StoreError> {
    let bad = || StoreError::Database(format!("corrupt attribute text: {text:?}"));
    text.split(RS)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut it = part.split(US);
            let (key, value, t) = (
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
            );
            let value = match t {
                "s" => AttrValue::Str(value.to_owned()),
                "j" => AttrValue::Json(value.to_owned()),
                "i" => AttrValue::Int(value.parse().map_err(|_| bad())?),
                "f" => AttrValue::Float(value.parse().map_err(|_| bad())?),
                "b" => AttrValue::Bool(value == "true"),
                _ => return Err(bad()),
            };
            Ok(KeyValue {
                key: key.to_owned(),
                value,
            })
        })
        .collect()
}

/// The `instr` pattern that finds `key = value` in an attribute text.
fn tag_pattern(key: &str, value: &str) -> String {
    format!("{RS}{}{US}{}{US}", clean(key), clean(value))
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

struct Writer {
    conn: Connection,
    /// Interned ids, so the hot path rarely touches the small tables.
    services: HashMap<String, i64>,
    operations: HashMap<(i64, String, i32), i64>,
    resources: HashMap<u64, i64>,
}

pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Writer>,
    readers: Mutex<Vec<Connection>>,
}

fn resource_hash(attrs: &[KeyValue]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(attrs)
        .unwrap_or_default()
        .hash(&mut h);
    // SQLite integers are signed 64-bit: keep the hash in range.
    h.finish() >> 1
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`, applying schema migrations.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| open_err(format!("cannot create the directory: {e}")))?;
        let path = dir.join("spans.db");
        let conn = Connection::open(&path).map_err(|e| open_err(e.to_string()))?;
        // auto_vacuum must be chosen before the first table exists; it lets retention shrink the file.
        // A larger auto-checkpoint batches the WAL's fsyncs: durability against a crash of the
        // process does not depend on them (see the module comment).
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 8192;")
            .map_err(|e| open_err(format!("not a usable SQLite database: {e}")))?;
        migrate(&conn).map_err(|e| match e {
            StoreError::Database(reason) => open_err(reason),
            other => other,
        })?;
        let mut writer = Writer {
            conn,
            services: HashMap::new(),
            operations: HashMap::new(),
            resources: HashMap::new(),
        };
        writer.load_interned().map_err(db_err)?;
        Ok(SqliteStore {
            path,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn reader(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        c.execute_batch("PRAGMA cache_size = -32768;")
            .map_err(db_err)?;
        Ok(c)
    }

    fn give_back(&self, c: Connection) {
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 8 {
            pool.push(c);
        }
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let c = self.reader()?;
        let out = f(&c);
        self.give_back(c);
        out
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(StoreError::NewerSchema {
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

impl Writer {
    fn load_interned(&mut self) -> rusqlite::Result<()> {
        let mut st = self.conn.prepare("SELECT id, name FROM services")?;
        for row in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
            let (id, name) = row?;
            self.services.insert(name, id);
        }
        let mut st = self
            .conn
            .prepare("SELECT id, service_id, name, kind FROM operations")?;
        for row in st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i32>(3)?,
            ))
        })? {
            let (id, svc, name, kind) = row?;
            self.operations.insert((svc, name, kind), id);
        }
        let mut st = self.conn.prepare("SELECT id, hash FROM resources")?;
        for row in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
            let (id, hash) = row?;
            self.resources.insert(hash as u64, id);
        }
        Ok(())
    }
}

/// Interning inside a transaction: ids are remembered only once the transaction commits.
struct Interned {
    services: Vec<(String, i64)>,
    operations: Vec<((i64, String, i32), i64)>,
    resources: Vec<(u64, i64)>,
}

impl SpanStore for SqliteStore {
    fn write(&self, spans: &[SpanRecord]) -> Result<(), StoreError> {
        if spans.is_empty() {
            return Ok(());
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let w = &mut *w;
        let mut new = Interned {
            services: Vec::new(),
            operations: Vec::new(),
            resources: Vec::new(),
        };
        let tx = w.conn.transaction().map_err(db_err)?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO spans(trace_id, span_id, parent_id, service_id, operation_id, start, duration, status, resource_id, attrs, extra) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)")
                .map_err(db_err)?;
            let mut last_resource: Option<(&[KeyValue], i64)> = None;
            for s in spans {
                let service_id = match w.services.get(&s.service).copied().or_else(|| {
                    new.services
                        .iter()
                        .find(|(n, _)| *n == s.service)
                        .map(|(_, id)| *id)
                }) {
                    Some(id) => id,
                    None => {
                        tx.execute("INSERT INTO services(name) VALUES (?1)", [&s.service])
                            .map_err(db_err)?;
                        let id = tx.last_insert_rowid();
                        new.services.push((s.service.clone(), id));
                        id
                    }
                };
                let op_key = (service_id, s.operation.clone(), s.kind);
                let operation_id = match w.operations.get(&op_key).copied().or_else(|| {
                    new.operations
                        .iter()
                        .find(|(k, _)| *k == op_key)
                        .map(|(_, id)| *id)
                }) {
                    Some(id) => id,
                    None => {
                        tx.execute(
                            "INSERT INTO operations(service_id, name, kind) VALUES (?1, ?2, ?3)",
                            params![service_id, s.operation, s.kind],
                        )
                        .map_err(db_err)?;
                        let id = tx.last_insert_rowid();
                        new.operations.push((op_key, id));
                        id
                    }
                };
                // Spans of one batch usually share a resource: comparing with the last one is
                // cheaper than hashing it again.
                let resource_id = match last_resource {
                    Some((last, id)) if last == s.resource.as_slice() => id,
                    _ => {
                        let hash = resource_hash(&s.resource);
                        let id = match w.resources.get(&hash).copied().or_else(|| {
                            new.resources
                                .iter()
                                .find(|(h, _)| *h == hash)
                                .map(|(_, id)| *id)
                        }) {
                            Some(id) => id,
                            None => {
                                let attrs = encode_attrs(&s.resource);
                                tx.execute("INSERT INTO resources(hash, attrs) VALUES (?1, ?2) ON CONFLICT(hash) DO NOTHING", params![hash as i64, attrs]).map_err(db_err)?;
                                let id: i64 = tx
                                    .query_row(
                                        "SELECT id FROM resources WHERE hash = ?1",
                                        [hash as i64],
                                        |r| r.get(0),
                                    )
                                    .map_err(db_err)?;
                                new.resources.push((hash, id));
                                id
                            }
                        };
                        last_resource = Some((s.resource.as_slice(), id));
                        id
                    }
                };
                let extra = Extra {
                    kind: s.kind,
                    status_message: s.status_message.clone(),
                    events: s.events.clone(),
                    links: s.links.clone(),
                    scope_name: s.scope_name.clone(),
                    scope_version: s.scope_version.clone(),
                };
                let extra = serde_json::to_string(&extra).map_err(db_err)?;
                let attrs = encode_attrs(&s.attributes);
                insert
                    .execute(params![
                        &s.trace_id[..],
                        &s.span_id[..],
                        s.parent_span_id.as_ref().map(|p| &p[..]),
                        service_id,
                        operation_id,
                        s.start_unix_nano as i64,
                        s.duration_nano as i64,
                        s.status_code,
                        resource_id,
                        attrs,
                        extra
                    ])
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        w.services.extend(new.services);
        w.operations.extend(new.operations);
        w.resources.extend(new.resources);
        Ok(())
    }

    fn services(&self) -> Result<Vec<String>, StoreError> {
        self.with_reader(|c| {
            let mut st = c
                .prepare_cached("SELECT name FROM services ORDER BY name")
                .map_err(db_err)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
    }

    fn operations(&self, service: &str, kind: Option<i32>) -> Result<Vec<Operation>, StoreError> {
        self.with_reader(|c| {
            let mut st = c
                .prepare_cached("SELECT o.name, o.kind FROM operations o JOIN services s ON s.id = o.service_id WHERE s.name = ?1 AND (?2 IS NULL OR o.kind = ?2) ORDER BY o.name, o.kind")
                .map_err(db_err)?;
            let rows = st.query_map(params![service, kind], |r| Ok(Operation { name: r.get(0)?, kind: r.get(1)? })).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
    }

    fn trace(&self, trace_id: &TraceId) -> Result<Vec<SpanRecord>, StoreError> {
        self.with_reader(|c| load_trace(c, trace_id, &mut HashMap::new()))
    }

    fn find_traces(&self, q: &TraceQuery) -> Result<Vec<Vec<SpanRecord>>, StoreError> {
        self.with_reader(|c| {
            let service_id: Option<i64> = match &q.service {
                Some(name) => match c.query_row("SELECT id FROM services WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(db_err)? {
                    Some(id) => Some(id),
                    None => return Ok(Vec::new()),
                },
                None => None,
            };
            let operation_ids: Option<Vec<i64>> = match (&q.operation, service_id) {
                (Some(op), Some(svc)) => {
                    let mut st = c.prepare_cached("SELECT id FROM operations WHERE service_id = ?1 AND name = ?2").map_err(db_err)?;
                    let ids: Vec<i64> = st.query_map(params![svc, op], |r| r.get(0)).map_err(db_err)?.collect::<Result<_, _>>().map_err(db_err)?;
                    if ids.is_empty() {
                        return Ok(Vec::new());
                    }
                    Some(ids)
                }
                (Some(op), None) => {
                    let mut st = c.prepare_cached("SELECT id FROM operations WHERE name = ?1").map_err(db_err)?;
                    let ids: Vec<i64> = st.query_map(params![op], |r| r.get(0)).map_err(db_err)?.collect::<Result<_, _>>().map_err(db_err)?;
                    if ids.is_empty() {
                        return Ok(Vec::new());
                    }
                    Some(ids)
                }
                _ => None,
            };
            let mut sql = String::from("SELECT s.trace_id, s.operation_id FROM spans s WHERE s.start >= ?1 AND s.start <= ?2");
            if let Some(id) = service_id {
                sql.push_str(&format!(" AND s.service_id = {id}"));
            }
            if let Some(ops) = &operation_ids {
                let list: Vec<String> = ops.iter().map(i64::to_string).collect();
                sql.push_str(&format!(" AND s.operation_id IN ({})", list.join(",")));
            }
            if let Some(min) = q.min_duration_nano {
                sql.push_str(&format!(" AND s.duration >= {}", min as i64));
            }
            if let Some(max) = q.max_duration_nano {
                sql.push_str(&format!(" AND s.duration <= {}", max as i64));
            }
            // Tags are matched by SQLite on the attribute text of the span or of its resource.
            let mut patterns: Vec<String> = Vec::new();
            for (k, v) in &q.tags {
                if k == "error" {
                    // `error=true` is how Jaeger users ask for failed spans: it is the status.
                    let op = if v == "true" { "=" } else { "!=" };
                    sql.push_str(&format!(" AND s.status {op} {}", crate::status::ERROR));
                    continue;
                }
                patterns.push(tag_pattern(k, v));
                let n = patterns.len() + 2;
                sql.push_str(&format!(
                    " AND (instr(s.attrs, ?{n}) > 0 OR s.resource_id IN (SELECT id FROM resources WHERE instr(attrs, ?{n}) > 0))"
                ));
            }
            sql.push_str(" ORDER BY s.start DESC");
            let start = q.start_unix_nano.unwrap_or(0) as i64;
            let end = q.end_unix_nano.map_or(i64::MAX, |e| e.min(i64::MAX as u64) as i64);
            let mut st = c.prepare(&sql).map_err(db_err)?;
            let mut values: Vec<rusqlite::types::Value> = vec![start.into(), end.into()];
            values.extend(patterns.into_iter().map(rusqlite::types::Value::from));
            let mut rows = st.query(rusqlite::params_from_iter(values)).map_err(db_err)?;
            let mut found: Vec<TraceId> = Vec::new();
            let mut seen: HashSet<TraceId> = HashSet::new();
            let limit = q.limit.max(1);
            while let Some(row) = rows.next().map_err(db_err)? {
                let tid: Vec<u8> = row.get(0).map_err(db_err)?;
                let Ok(tid) = <TraceId>::try_from(tid.as_slice()) else { continue };
                if seen.insert(tid) {
                    found.push(tid);
                    if found.len() >= limit {
                        break;
                    }
                }
            }
            drop(rows);
            let mut resources = HashMap::new();
            found.iter().map(|t| load_trace(c, t, &mut resources)).collect()
        })
    }

    fn dependencies(
        &self,
        end_unix_nano: u64,
        lookback_nano: u64,
    ) -> Result<Vec<DependencyLink>, StoreError> {
        self.with_reader(|c| {
            let mut st = c
                .prepare_cached(
                    "SELECT ps.name, cs.name, ch.duration, ch.status FROM spans ch
                     JOIN spans p ON p.trace_id = ch.trace_id AND p.span_id = ch.parent_id
                     JOIN services cs ON cs.id = ch.service_id JOIN services ps ON ps.id = p.service_id
                     WHERE ch.start >= ?1 AND ch.start <= ?2 AND ch.parent_id IS NOT NULL AND ch.service_id != p.service_id",
                )
                .map_err(db_err)?;
            let start = end_unix_nano.saturating_sub(lookback_nano) as i64;
            let mut edges: HashMap<(String, String), (u64, Vec<u64>)> = HashMap::new();
            let rows = st
                .query_map(params![start, end_unix_nano.min(i64::MAX as u64) as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i32>(3)?))
                })
                .map_err(db_err)?;
            for row in rows {
                let (parent, child, duration, status) = row.map_err(db_err)?;
                let e = edges.entry((parent, child)).or_default();
                e.0 += u64::from(status == crate::status::ERROR);
                e.1.push(duration.max(0) as u64);
            }
            let mut out: Vec<DependencyLink> = edges
                .into_iter()
                .map(|((parent, child), (errors, mut durations))| {
                    durations.sort_unstable();
                    let n = durations.len() as u64;
                    let p95 = durations[((durations.len() * 95).div_ceil(100)).saturating_sub(1).min(durations.len() - 1)];
                    DependencyLink {
                        parent,
                        child,
                        call_count: n,
                        error_count: errors,
                        avg_duration_nano: durations.iter().sum::<u64>() / n.max(1),
                        p95_duration_nano: p95,
                    }
                })
                .collect();
            out.sort_by(|a, b| (&a.parent, &a.child).cmp(&(&b.parent, &b.child)));
            Ok(out)
        })
    }

    fn enforce_retention(&self, policy: &Retention) -> Result<RetentionReport, StoreError> {
        let mut deleted = 0u64;
        if let Some(age) = policy.max_age {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let cutoff = now.saturating_sub(age.as_nanos() as u64) as i64;
            loop {
                let n = {
                    let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                    w.conn
                        .execute("DELETE FROM spans WHERE id IN (SELECT id FROM spans WHERE start < ?1 ORDER BY start LIMIT ?2)", params![cutoff, DELETE_CHUNK])
                        .map_err(db_err)?
                };
                deleted += n as u64;
                if (n as i64) < DELETE_CHUNK {
                    break;
                }
            }
        }
        if let Some(max) = policy.max_bytes {
            loop {
                let size = self.used_bytes()?;
                if size <= max {
                    break;
                }
                let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                let n = w
                    .conn
                    .execute("DELETE FROM spans WHERE id IN (SELECT id FROM spans ORDER BY start LIMIT ?1)", [DELETE_CHUNK])
                    .map_err(db_err)?;
                deleted += n as u64;
                if n == 0 {
                    break;
                }
            }
        }
        if deleted > 0 {
            let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            // Give freed pages back to the file system and fold the WAL in.
            w.conn
                .execute_batch("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(db_err)?;
        }
        Ok(RetentionReport {
            deleted_spans: deleted,
        })
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let spans: i64 = self.with_reader(|c| {
            c.query_row("SELECT count(*) FROM spans", [], |r| r.get(0))
                .map_err(db_err)
        })?;
        Ok(StoreStats {
            spans: spans as u64,
            bytes: self.used_bytes()?,
        })
    }
}

impl SqliteStore {
    /// Bytes in use: pages minus free pages.
    fn used_bytes(&self) -> Result<u64, StoreError> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let q = |p: &str| -> Result<i64, StoreError> {
            w.conn
                .query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
                .map_err(db_err)
        };
        Ok(((q("page_count")? - q("freelist_count")?) * q("page_size")?) as u64)
    }
}

fn load_trace(
    c: &Connection,
    trace_id: &TraceId,
    resources: &mut HashMap<i64, Vec<KeyValue>>,
) -> Result<Vec<SpanRecord>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT s.span_id, s.parent_id, sv.name, o.name, s.start, s.duration, s.status, s.resource_id, s.attrs, s.extra
             FROM spans s JOIN services sv ON sv.id = s.service_id JOIN operations o ON o.id = s.operation_id
             WHERE s.trace_id = ?1 ORDER BY s.start",
        )
        .map_err(db_err)?;
    let mut rows = st.query([&trace_id[..]]).map_err(db_err)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(db_err)? {
        let span_id: Vec<u8> = r.get(0).map_err(db_err)?;
        let parent: Option<Vec<u8>> = r.get(1).map_err(db_err)?;
        let resource_id: i64 = r.get(7).map_err(db_err)?;
        if let std::collections::hash_map::Entry::Vacant(slot) = resources.entry(resource_id) {
            let attrs: String = c
                .query_row(
                    "SELECT attrs FROM resources WHERE id = ?1",
                    [resource_id],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            slot.insert(decode_attrs(&attrs)?);
        }
        let attrs: String = r.get(8).map_err(db_err)?;
        let extra: String = r.get(9).map_err(db_err)?;
        let body: Extra = serde_json::from_str(&extra).map_err(db_err)?;
        out.push(SpanRecord {
            trace_id: *trace_id,
            span_id: span_id.as_slice().try_into().map_err(db_err)?,
            parent_span_id: parent.and_then(|p| p.as_slice().try_into().ok()),
            service: r.get(2).map_err(db_err)?,
            operation: r.get(3).map_err(db_err)?,
            kind: body.kind,
            start_unix_nano: r.get::<_, i64>(4).map_err(db_err)? as u64,
            duration_nano: r.get::<_, i64>(5).map_err(db_err)? as u64,
            status_code: r.get(6).map_err(db_err)?,
            status_message: body.status_message,
            attributes: decode_attrs(&attrs)?,
            resource: resources[&resource_id].clone(),
            events: body.events,
            links: body.links,
            scope_name: body.scope_name,
            scope_version: body.scope_version,
        });
    }
    Ok(out)
}
