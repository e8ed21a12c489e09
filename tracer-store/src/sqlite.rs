//! The embedded store: one SQLite database (`spans.db`, WAL mode) in the data directory.
//!
//! # Schema (version 3; `schema.rs` has the migrations)
//!
//! - `spans(id, trace_id BLOB(16), span_id BLOB(8), parent_id, service_id, operation_id, start,
//!   duration, status, resource_id, body BLOB)`: one row per span. The columns are what
//!   searches filter on; everything else (kind, attributes, events, links, scope, status
//!   message) is one compact binary `body` (`codec.rs`, ~180 bytes for an HTTP span with 17
//!   attributes), not one row per attribute.
//! - `services`, `operations(service_id, name, kind)`, `strings` (the dictionary of attribute
//!   keys, scope and event names that bodies refer to by id) and `resources` (host and process
//!   attributes, stored once and shared by their spans): small interned tables, mirrored in
//!   memory (`catalog.rs`).
//! - Indexes: `spans_by_service(service_id, start, operation_id, duration)`, which answers
//!   service, operation and duration filters without reading rows; `spans_by_start(start)` for
//!   time-only searches, the service map and retention; `tag_index(hash, start, span)` for
//!   selected tags; `trace_index(run, trace_id, span)` + `trace_runs` for traces by id;
//!   `edge_index(bucket, seq, span, kind, edge)` for the two ends of a TCP request (see below).
//! - `meta`: the span count (kept exact by every write and delete, so `stats` is O(1)) and
//!   how far the trace index runs go.
//!
//! # Writing
//!
//! Callers encode their spans on their own thread (interning names through the in-memory
//! catalog), from borrowed [`SpanRef`]s: `write_refs` takes them as the collector's protobuf
//! decoder lends them, `write` lends owned records the same way. Then group commit: whichever caller finds no commit running becomes the leader and
//! writes every batch waiting (its own included, up to 16k spans) in one transaction on the
//! single writer connection, with cached multi-row `INSERT` statements (`insert_many`); each
//! caller returns once the commit that holds its spans is done. A batch sent again (a lost acknowledgement) is not stored twice,
//! as long as its first copy is still in the recent trace index.
//!
//! The trace index is the unusual part. Trace ids are random, so a B-tree keyed by them takes
//! each insert at a random page, and a commit of a few hundred spans dirties nearly a 4 KiB page
//! per span: measured, that index alone halved ingest. Instead, committed spans are indexed in
//! memory (`recent.rs`), and every 262,144 spans a background thread writes them out, sorted,
//! as one immutable *run* of `(trace_id, span)`: an append of ~40 bytes a span. A lookup reads
//! the memory map and probes each run (at 10 million spans, 40 B-tree probes). The spans table
//! stays the source of truth: on open, spans past the last run are read back into memory.
//!
//! The same reasoning limits the tag index to values that are both searched for and rare:
//! errors, HTTP statuses from 400, and a few low-cardinality keys (`db.system`, `rpc.method`,
//! ...). `url.path` (every distinct value another insertion point) and ubiquitous keys like
//! `http.request.method` are left to the fallback: decoding the bodies of the candidates
//! that the service/time index yields, newest first, up to `SCAN_LIMIT` of them.
//!
//! The edge index finds the other end of a request (`tracer.tcp.edge`, `tracer.tcp.seq`) when
//! a trace is read and stitched: one entry per CLIENT or SERVER span that has them, in the
//! spans' own transaction. Its key is the request's TCP sequence number, which both ends see
//! even behind NAT (so one entry serves the exact lookup and the NAT fallback; the hash of the
//! whole edge string is a column that exact lookups check). Sequence numbers are random, so the
//! key comes after a time bucket (start >> 28, ~0.27 s): a commit inserts, sorted, into the few
//! pages of the current bucket instead of all over an index as large as the retention period.
//! Measured (store bench, 50k agent spans, alternated with the index-less schema): with ~4 s
//! buckets and separate edge and seq entries, a 512-span commit dirtied most of its bucket's
//! pages and ingest took 1.9x the CPU; as built, 1.2x (and 35 bytes a span). A lookup is one
//! statement seeking each of the 61 buckets within [`crate::EDGE_WINDOW_NANO`] (8 s, the clock
//! disagreement tolerated between two hosts).
//!
//! # Durability
//!
//! WAL with `synchronous=NORMAL` by default ([`Durability::ProcessCrash`]): a commit has
//! written its WAL frames (into the OS page cache) before `write` returns, so killing the
//! process, even with `kill -9`, loses nothing acknowledged; a power loss or kernel crash can
//! lose the last commits (never corrupting the file). [`Durability::PowerLoss`] adds an fsync
//! per group commit (`synchronous=FULL`). A background thread checkpoints the WAL into the
//! database, at most once a second, so commits rarely pay for it.
//!
//! # Reading
//!
//! Readers use their own read-only connections (a small pool); WAL lets them run during
//! writes. A search walks one index newest first (the tag index for an indexed tag, else the
//! service index, else the start index), checks each candidate span against every condition,
//! and loads whole traces for the first `limit` distinct trace ids. The service map scans spans
//! by start time and joins each child to its parent through a sliding window of recent spans,
//! falling back to a lookup by trace id for parents outside it; before that, the edge index of
//! the window pairs each request's CLIENT and SERVER spans, and a paired SERVER span counts
//! under its CLIENT span's service instead of its stored parent's. (Stitching traces is the
//! collector's, `tracer-collector/src/stitch`; the store only answers `edge_spans`.)
//!
//! # Retention
//!
//! By age, the spans that started before the cutoff (by the start index); by size, the spans
//! that arrived first (by row id: start times are the client's to choose, and by them spans
//! dated ahead of the clock were deleted last). 5,000 per transaction so ingest is never blocked
//! for long, deleting their tag and edge index entries too (recomputed from the bodies); trace index
//! runs go once all their spans are gone. Freed pages are returned to the file system with
//! `incremental_vacuum` (the database is created with `auto_vacuum=INCREMENTAL`), and the WAL,
//! which keeps its largest size until a checkpoint truncates it, counts against the size limit.
//! Each operation row counts its spans (in the transactions that insert and delete them);
//! operations left with none are dropped, from the table and the catalog. A batch encoded with
//! the id of an operation dropped meanwhile is not committed but encoded again (the catalog's
//! epoch says when to check).
use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use crate::{
    status, with_span_refs, DependencyLink, KeyValueRef, Operation, Retention, RetentionReport,
    SpanId, SpanRecord, SpanRef, SpanStore, StoreError, StoreStats, TraceId, TraceQuery,
};

mod alloc;
mod catalog;
mod codec;
mod query;
mod recent;
mod schema;

use catalog::{Catalog, Missing, Pending};
use codec::BodyRef;
use recent::Recent;

/// Spans one group commit takes at most, so one transaction (and the wait of its callers)
/// stays short.
const MAX_GROUP_SPANS: usize = 16_384;
/// Spans deleted per retention transaction: ingest waits at most for one of these.
const DELETE_CHUNK: usize = 5_000;
/// Pages freed per `incremental_vacuum` step, for the same reason.
const VACUUM_CHUNK: u32 = 4_096;
/// Run entries written per transaction.
const RUN_CHUNK: usize = 16_384;
/// The background checkpointer runs at most this often.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);
/// WAL pages at which the committing writer checkpoints itself, for when the background
/// checkpointer cannot catch up with a steady stream of commits (a WAL only restarts from its
/// beginning once fully checkpointed).
const WRITER_CHECKPOINT_PAGES: u32 = 16_384;
/// Idle reader connections kept.
const MAX_IDLE_READERS: usize = 8;

/// Whether attribute `key` has tag index entries: keys searches commonly ask for, with few
/// distinct values. Left out on purpose: high-cardinality keys (`url.path`, `http.target`):
/// every distinct value is a separate insertion point in the index, costing a page write per
/// commit; and keys that are nearly always present with a few common values
/// (`http.request.method`, `http.route`), which the operation name mostly covers: an entry
/// for nearly every span, for searches that the service index answers by decoding a few
/// candidates anyway.
fn indexed_key(key: &str) -> bool {
    matches!(
        key,
        "http.response.status_code"
            | "http.status_code"
            | "db.system"
            | "db.operation"
            | "rpc.service"
            | "rpc.method"
            | "rpc.grpc.status_code"
            | "messaging.system"
            | "messaging.destination.name"
            | "peer.service"
            | "exception.type"
            | "error"
    )
}

/// Whether `key = value` gets a tag index entry. Common values (`GET`, statuses below 400) are
/// left out: they are the haystack, found at once by scanning a service's recent spans, and
/// indexing them would cost an entry for nearly every span. Stored data depends on this rule,
/// so changing it needs a migration.
fn worth_indexing(key: &str, value: &str) -> bool {
    indexed_key(key)
        && match key {
            "http.response.status_code" | "http.status_code" => {
                value.parse::<i64>().is_ok_and(|c| c >= 400)
            }
            "error" => value == "true",
            "rpc.grpc.status_code" => value != "0",
            _ => true,
        }
}

/// Appends the tag index keys of a span's (or its resource's) attributes; an error status is
/// indexed as `error=true`, the way the query API shows it.
pub(crate) fn index_tags(attrs: &[KeyValueRef<'_>], status_code: i32, out: &mut Vec<i64>) {
    for kv in attrs {
        if indexed_key(kv.key) {
            let text = kv.value.as_text();
            if worth_indexing(kv.key, &text) {
                out.push(codec::tag_hash(kv.key, &text));
            }
        }
    }
    if status_code == status::ERROR {
        out.push(codec::tag_hash("error", "true"));
    }
}

/// Edge index buckets are `start >> EDGE_BUCKET_SHIFT` (see the module documentation).
const EDGE_BUCKET_SHIFT: u32 = 28;
/// Buckets a lookup looks at on either side of its own: enough to cover
/// [`crate::EDGE_WINDOW_NANO`].
const EDGE_BUCKET_REACH: i64 = crate::EDGE_WINDOW_NANO.div_ceil(1 << EDGE_BUCKET_SHIFT) as i64;

fn edge_bucket(start: u64) -> i64 {
    (start >> EDGE_BUCKET_SHIFT) as i64
}

/// The buckets a lookup near `start` seeks.
fn edge_buckets(start: u64) -> std::ops::RangeInclusive<i64> {
    let b = edge_bucket(start);
    b - EDGE_BUCKET_REACH..=b + EDGE_BUCKET_REACH
}

/// The sequence number at the end of an edge string (`...#<seq>`).
fn edge_seq(edge: &str) -> Option<u32> {
    edge.rsplit_once('#')?.1.parse().ok()
}

/// The stored hash of a whole edge string, fixed forever (it is stored). A collision costs a
/// candidate the stitcher checks against the string and drops.
fn edge_hash(edge: &str) -> i64 {
    codec::tag_hash(crate::EDGE_ATTR, edge)
}

/// One edge index entry (its span row id aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct EdgeEntry {
    pub bucket: i64,
    pub seq: i64,
    pub kind: i32,
    /// [`edge_hash`] of the span's `tracer.tcp.edge`, if it has one.
    pub edge: Option<i64>,
}

/// Appends a span's edge index entry, if it is an end of a request with a known sequence
/// number (`tracer.tcp.seq`, else the one in `tracer.tcp.edge`).
pub(crate) fn index_edges(
    kind: i32,
    attrs: &[KeyValueRef<'_>],
    start: u64,
    out: &mut Vec<EdgeEntry>,
) {
    let (edge, seq) = crate::edge_keys(kind, attrs);
    if let Some(seq) = seq.or_else(|| edge.and_then(edge_seq)) {
        out.push(EdgeEntry {
            bucket: edge_bucket(start),
            seq: i64::from(seq),
            kind,
            edge: edge.map(edge_hash),
        });
    }
}

/// The tag index key a search for `key = value` can use, if the index has every such span.
fn searchable_tag(key: &str, value: &str) -> Option<i64> {
    worth_indexing(key, value).then(|| codec::tag_hash(key, value))
}

/// Inserts `n` rows of `cols` columns with multi-row `INSERT ... VALUES` statements of
/// `sizes` rows each (largest first, ending with 1, so any `n` is a sum of them); `bind(st, i,
/// p)` binds row `i` from parameter `p` on. Measured against a statement execution per row:
/// one execution keeps SQLite's cursors open from row to row, so appends (rising span ids and
/// start times, a sorted trace index run) find their place on the last page instead of
/// descending from the root, and opening cursors, binding and resetting are paid per chunk.
/// The statements are cached like the others.
fn insert_many(
    tx: &Connection,
    head: &str,
    cols: usize,
    n: usize,
    sizes: &[usize],
    mut bind: impl FnMut(&mut rusqlite::Statement<'_>, usize, usize) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let mut done = 0;
    for &size in sizes {
        if n - done < size {
            continue;
        }
        let mut sql = String::with_capacity(head.len() + size * (2 * cols + 2));
        sql.push_str(head);
        for r in 0..size {
            sql.push_str(if r == 0 { "(?" } else { ",(?" });
            for _ in 1..cols {
                sql.push_str(",?");
            }
            sql.push(')');
        }
        let mut st = tx.prepare_cached(&sql)?;
        while n - done >= size {
            for r in 0..size {
                bind(&mut st, done + r, r * cols + 1)?;
            }
            st.raw_execute()?;
            done += size;
        }
    }
    debug_assert_eq!(done, n, "sizes must end with 1");
    Ok(())
}

/// Adds `(operation id, spans)` to the operations' span counts (negative to subtract), one
/// statement per distinct operation.
fn add_operation_spans(tx: &Connection, mut counts: Vec<(i64, i64)>) -> rusqlite::Result<()> {
    counts.sort_unstable();
    let mut st = tx.prepare_cached("UPDATE operations SET spans = spans + ?2 WHERE id = ?1")?;
    let mut i = 0;
    while i < counts.len() {
        let op = counts[i].0;
        let mut n = 0;
        while i < counts.len() && counts[i].0 == op {
            n += counts[i].1;
            i += 1;
        }
        st.execute(params![op, n])?;
    }
    Ok(())
}

/// Wraps a database error with what was being done.
fn ctx<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Database(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the store down with it; the data behind these locks
    // stays consistent because SQLite transactions roll back.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How much a successful `write` survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The process being killed (`kill -9`, a panic, the OOM killer): committed pages are in
    /// the WAL file (the OS's page cache) before `write` returns. A power loss or kernel crash
    /// may lose the last second or so of commits, never corrupting the database.
    /// (`synchronous=NORMAL`: no fsync per commit, only at checkpoints.)
    #[default]
    ProcessCrash,
    /// Also power loss: every commit waits for an fsync of the WAL (`synchronous=FULL`).
    PowerLoss,
}

/// Settings for [`SqliteStore::open_with`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Spans indexed in memory before their trace ids are written out as one sorted run (see
    /// the module documentation). More means more memory (~60 bytes a span) and fewer runs for
    /// a trace lookup to probe: the default, 262,144, is ~15 MiB and 40 runs at 10 million spans.
    pub trace_run_spans: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::default(),
            trace_run_spans: 262_144,
        }
    }
}

pub struct SqliteStore {
    inner: Arc<Inner>,
    maintenance: Option<JoinHandle<()>>,
}

struct Inner {
    path: PathBuf,
    catalog: RwLock<Catalog>,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    writer: Mutex<Writer>,
    /// The trace index of spans not yet in a run.
    recent: RwLock<Recent>,
    readers: Mutex<Vec<Connection>>,
    resources: Mutex<HashMap<i64, Arc<query::Resource>>>,
    maintenance: Mutex<MaintenanceState>,
    maintenance_cv: Condvar,
    run_spans: usize,
    /// Serializes `write_run` (the maintenance thread's and an explicit one).
    run_lock: Mutex<()>,
    /// Serializes explicit checkpoints: SQLite does not wait for a running one.
    checkpoint_lock: Mutex<()>,
    /// Held (locked) for the store's lifetime: one process per data directory.
    _lock: File,
}

struct Writer {
    conn: Connection,
    /// The next span row id. Assigned here rather than by SQLite so ids are never reused (runs
    /// and `meta.trace_indexed_upto` refer to them) and are known before the commit.
    next_span: i64,
}

#[derive(Default)]
struct MaintenanceState {
    /// Commits happened since the last checkpoint.
    dirty: bool,
    /// The maintenance thread waits for `dirty` (rather than pausing between checkpoints), so
    /// a commit needs to wake it; during the pause commits only set `dirty`, sparing a wakeup
    /// (two context switches) per commit.
    waiting: bool,
    stop: bool,
}

/// Spans encoded by their caller, waiting for a group commit.
#[derive(Default)]
struct EncodedBatch {
    rows: Vec<Row>,
    /// Bodies of all rows, back to back.
    bodies: Vec<u8>,
    /// Tag index keys of all rows, back to back.
    tags: Vec<i64>,
    /// Edge index entries of all rows, back to back.
    edges: Vec<EdgeEntry>,
    /// The catalog's epoch when the batch was encoded ([`Catalog::epoch`]).
    epoch: u64,
}

/// What became of a batch handed to the group commit.
enum Committed {
    Stored,
    /// Not written: an operation it names was pruned after it was encoded. Encoding it again
    /// gives the name a new id.
    Stale,
}

struct Row {
    trace_id: TraceId,
    span_id: SpanId,
    parent_id: Option<SpanId>,
    service_id: i64,
    operation_id: i64,
    start: i64,
    duration: i64,
    status: i32,
    resource_id: i64,
    body_end: usize,
    tags_end: usize,
    edges_end: usize,
}

#[derive(Default)]
struct Queue {
    pending: Vec<(u64, EncodedBatch)>,
    next_ticket: u64,
    leader: bool,
    results: HashMap<u64, Result<Committed, StoreError>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`, applying schema migrations.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(dir, &StoreOptions::default())
    }

    pub fn open_with(dir: &Path, options: &StoreOptions) -> Result<SqliteStore, StoreError> {
        alloc::install();
        let open_err = |reason: String| StoreError::Open {
            path: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| open_err(format!("cannot create the directory: {e}")))?;
        let lock_path = dir.join("spans.db.lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| open_err(format!("cannot create {}: {e}", lock_path.display())))?;
        // Ids of the interned tables and of spans are handed out in memory, so a second writer
        // would corrupt them: refuse rather than wait.
        lock_file.try_lock().map_err(|e| {
            open_err(format!(
                "it is in use by another store (lock on {}): {e}",
                lock_path.display()
            ))
        })?;
        let path = dir.join("spans.db");
        let mut conn = Connection::open(&path)
            .map_err(|e| open_err(format!("cannot open {}: {e}", path.display())))?;
        let sync = match options.durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        // auto_vacuum must be chosen before the first table exists (it is a no-op later): it
        // lets retention give pages back to the file system. journal_size_limit = -1 keeps the
        // WAL file's blocks allocated between restarts of the log: overwriting is ~2.5x cheaper
        // for the kernel than growing a file.
        conn.execute_batch(&format!(
            "PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {sync};
             PRAGMA journal_size_limit = -1;
             PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES};
             PRAGMA cache_size = -131072;
             PRAGMA temp_store = MEMORY;"
        ))
        .map_err(|e| {
            open_err(format!(
                "{} is not a usable SQLite database: {e}",
                path.display()
            ))
        })?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| open_err(e.to_string()))?;
        schema::migrate(&mut conn).map_err(|e| match e {
            StoreError::Database(reason) => open_err(reason),
            other => other,
        })?;
        conn.set_prepared_statement_cache_capacity(64);
        let catalog = Catalog::load(&conn).map_err(|e| open_err(e.to_string()))?;
        let (recent, next_span) = load_recent(&conn).map_err(|e| open_err(e.to_string()))?;
        let inner = Arc::new(Inner {
            path,
            catalog: RwLock::new(catalog),
            queue: Mutex::default(),
            queue_cv: Condvar::new(),
            writer: Mutex::new(Writer { conn, next_span }),
            recent: RwLock::new(recent),
            readers: Mutex::default(),
            resources: Mutex::default(),
            maintenance: Mutex::default(),
            maintenance_cv: Condvar::new(),
            run_spans: options.trace_run_spans.max(1),
            run_lock: Mutex::new(()),
            checkpoint_lock: Mutex::new(()),
            _lock: lock_file,
        });
        let maintenance = {
            let inner = inner.clone();
            let conn = Connection::open(&inner.path).map_err(|e| open_err(e.to_string()))?;
            conn.busy_timeout(Duration::from_secs(1))
                .map_err(|e| open_err(e.to_string()))?;
            std::thread::Builder::new()
                .name("store-maintenance".into())
                .spawn(move || inner.maintenance_loop(conn))
                .map_err(|e| open_err(format!("cannot start the maintenance thread: {e}")))?
        };
        Ok(SqliteStore {
            inner,
            maintenance: Some(maintenance),
        })
    }

    /// Writes the recent trace index out as a run now rather than when it is full (tests use
    /// it to exercise both halves of the index deterministically).
    #[doc(hidden)]
    pub fn write_trace_index_run(&self) -> Result<(), StoreError> {
        self.inner.write_run()
    }
}

/// Reads back the spans past the last trace index run, and finds the next span id. Also drops
/// the rows of a run whose writing was interrupted (it is written again from these spans).
fn load_recent(conn: &Connection) -> Result<(Recent, i64), StoreError> {
    let what = "rebuilding the recent trace index";
    conn.execute(
        "DELETE FROM trace_index WHERE run > (SELECT coalesce(max(id), 0) FROM trace_runs)",
        [],
    )
    .map_err(ctx(what))?;
    let upto: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'trace_indexed_upto'",
            [],
            |r| r.get(0),
        )
        .map_err(ctx(what))?;
    let mut recent = Recent::default();
    let mut next = upto + 1;
    let mut st = conn
        .prepare("SELECT id, trace_id, span_id FROM spans WHERE id > ?1 ORDER BY id")
        .map_err(ctx(what))?;
    let mut rows = st.query([upto]).map_err(ctx(what))?;
    while let Some(r) = rows.next().map_err(ctx(what))? {
        let id: i64 = r.get(0).map_err(ctx(what))?;
        let t = r
            .get_ref(1)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(ctx(what))?;
        let s = r
            .get_ref(2)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(ctx(what))?;
        let (Ok(t), Ok(s)) = (TraceId::try_from(t), SpanId::try_from(s)) else {
            return Err(StoreError::Database(format!(
                "{what}: span {id} has a malformed id"
            )));
        };
        recent.insert(t, s, id);
        next = next.max(id + 1);
    }
    let max: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM spans", [], |r| r.get(0))
        .map_err(ctx(what))?;
    Ok((recent, next.max(max + 1)))
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        lock(&self.inner.maintenance).stop = true;
        self.inner.maintenance_cv.notify_all();
        if let Some(t) = self.maintenance.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// Background work that keeps commits cheap: folding the WAL into the database, and
    /// writing the recent trace index out as runs.
    fn maintenance_loop(&self, conn: Connection) {
        loop {
            {
                let mut st = lock(&self.maintenance);
                while !st.dirty && !st.stop {
                    st.waiting = true;
                    st = self
                        .maintenance_cv
                        .wait(st)
                        .unwrap_or_else(|e| e.into_inner());
                }
                if st.stop {
                    return;
                }
                st.waiting = false;
                st.dirty = false;
            }
            // PASSIVE never blocks the writer. Failures (a full disk, say) are retried after
            // the next commit; the writer's own auto-checkpoint remains as a backstop.
            {
                let _one_at_a_time = lock(&self.checkpoint_lock);
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
            if self.read_recent().current_spans() >= self.run_spans {
                let _ = self.write_run();
            }
            // Then a pause that commits do not cut short (only `stop` does), so that this
            // really runs at most every CHECKPOINT_INTERVAL. Woken by every commit, it used
            // to checkpoint (two fsyncs) after nearly every one, and with small batches (the
            // live collector saw 2 spans a request) the pages that consecutive commits write
            // again and again were copied to the database each time. Measured with 2-span
            // writes (`cargo bench -p tracer-collector -- profile-store`, BENCH_BATCH=2),
            // together with the wakeup spared below: 61 -> 44 µs CPU per span.
            let deadline = Instant::now() + CHECKPOINT_INTERVAL;
            let mut st = lock(&self.maintenance);
            while !st.stop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = self
                    .maintenance_cv
                    .wait_timeout(st, left)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            }
            if st.stop {
                return;
            }
        }
    }

    fn read_recent(&self) -> std::sync::RwLockReadGuard<'_, Recent> {
        self.recent.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_recent(&self) -> std::sync::RwLockWriteGuard<'_, Recent> {
        self.recent.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the recent trace index out as a run, sorted so that it is appended to the index
    /// rather than scattered, in transactions of `RUN_CHUNK` entries so ingest is never held
    /// up for long. Lookups keep finding the spans in memory until the run is complete.
    fn write_run(&self) -> Result<(), StoreError> {
        let _one_at_a_time = lock(&self.run_lock);
        let Some(frozen) = self.write_recent().freeze() else {
            return Ok(());
        };
        let mut entries: Vec<(TraceId, i64)> = frozen
            .iter()
            .flat_map(|(t, spans)| spans.as_slice().iter().map(move |(_, row)| (*t, *row)))
            .collect();
        entries.sort_unstable();
        let first = entries.iter().map(|e| e.1).min().unwrap_or(0);
        let last = entries.iter().map(|e| e.1).max().unwrap_or(0);
        let result = (|| {
            let run: i64 = lock(&self.writer)
                .conn
                .query_row("SELECT coalesce(max(id), 0) + 1 FROM trace_runs", [], |r| {
                    r.get(0)
                })
                .map_err(ctx("starting a trace index run"))?;
            let chunks = entries.chunks(RUN_CHUNK).count();
            for (i, chunk) in entries.chunks(RUN_CHUNK).enumerate() {
                let mut w = lock(&self.writer);
                let tx = w
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(ctx("writing a trace index run"))?;
                insert_many(
                    &tx,
                    "INSERT OR IGNORE INTO trace_index(run, trace_id, span) VALUES ",
                    3,
                    chunk.len(),
                    &[512, 64, 8, 1],
                    |st, i, p| {
                        let (t, row) = &chunk[i];
                        st.raw_bind_parameter(p, run)?;
                        st.raw_bind_parameter(p + 1, &t[..])?;
                        st.raw_bind_parameter(p + 2, row)
                    },
                )
                .map_err(ctx("writing a trace index run"))?;
                if i + 1 == chunks {
                    tx.execute(
                        "INSERT INTO trace_runs(id, first_span, last_span) VALUES (?1, ?2, ?3)",
                        params![run, first, last],
                    )
                    .and_then(|_| {
                        tx.execute(
                            "UPDATE meta SET value = max(value, ?1) WHERE key = 'trace_indexed_upto'",
                            [last],
                        )
                    })
                    .map_err(ctx("finishing a trace index run"))?;
                }
                tx.commit().map_err(ctx("writing a trace index run"))?;
            }
            Ok(())
        })();
        let mut recent = self.write_recent();
        match result {
            Ok(()) => recent.run_written(),
            Err(_) => recent.run_failed(),
        }
        result
    }

    fn reader(&self) -> Result<Connection, StoreError> {
        if let Some(c) = lock(&self.readers).pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(ctx("opening a reader connection"))?;
        c.execute_batch("PRAGMA cache_size = -32768;")
            .map_err(ctx("opening a reader connection"))?;
        c.busy_timeout(Duration::from_secs(10))
            .map_err(ctx("opening a reader connection"))?;
        c.set_prepared_statement_cache_capacity(64);
        Ok(c)
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let c = self.reader()?;
        let out = f(&c);
        let mut pool = lock(&self.readers);
        if pool.len() < MAX_IDLE_READERS {
            pool.push(c);
        }
        out
    }

    /// Encodes `spans` on the calling thread, interning new names as needed.
    fn encode(&self, spans: &[SpanRef<'_>]) -> Result<EncodedBatch, StoreError> {
        // Each pass resolves one level (strings and services, then resources and operations
        // that need their ids), so three passes always suffice.
        for _ in 0..4 {
            let mut missing = Missing::default();
            let batch = {
                let cat = self.catalog.read().unwrap_or_else(|e| e.into_inner());
                encode_batch(&cat, spans, &mut missing)
            };
            if missing.is_empty() {
                return Ok(batch);
            }
            self.catalog
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .allocate(missing);
        }
        Err(StoreError::Database(
            "interning names did not converge (a bug)".into(),
        ))
    }

    /// Group commit: the caller that finds no commit running becomes the leader and commits
    /// every batch waiting, its own included; the others sleep until a commit has theirs.
    fn write(&self, batch: EncodedBatch) -> Result<Committed, StoreError> {
        let mut q = lock(&self.queue);
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.pending.push((ticket, batch));
        loop {
            if let Some(result) = q.results.remove(&ticket) {
                return result;
            }
            if q.leader {
                q = self.queue_cv.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            q.leader = true;
            let mut spans = 0;
            let take = q
                .pending
                .iter()
                .take_while(|(_, b)| {
                    let before = spans;
                    spans += b.rows.len();
                    before < MAX_GROUP_SPANS
                })
                .count()
                .max(1);
            let group: Vec<(u64, EncodedBatch)> = q.pending.drain(..take).collect();
            drop(q);
            let mut leader = LeaderGuard {
                inner: self,
                tickets: group.iter().map(|(t, _)| *t).collect(),
                results: Vec::new(),
            };
            leader.results = self.commit_group(&group);
            drop(leader);
            q = lock(&self.queue);
        }
    }

    fn commit_group(
        &self,
        group: &[(u64, EncodedBatch)],
    ) -> Vec<(u64, Result<Committed, StoreError>)> {
        let mut w = lock(&self.writer);
        // Pruning runs under the writer lock too, so nothing is pruned between this check and
        // the commit.
        let (group, stale): (Vec<_>, Vec<_>) = {
            let cat = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            group.iter().partition(|(_, b)| {
                b.epoch == cat.epoch() || b.rows.iter().all(|r| cat.has_operation(r.operation_id))
            })
        };
        let mut out: Vec<(u64, Result<Committed, StoreError>)> = stale
            .iter()
            .map(|(t, _)| (*t, Ok(Committed::Stale)))
            .collect();
        if group.is_empty() {
            return out;
        }
        let batches: Vec<&EncodedBatch> = group.iter().map(|(_, b)| b).collect();
        match self.commit(&mut w, &batches) {
            Ok(()) => out.extend(group.iter().map(|(t, _)| (*t, Ok(Committed::Stored)))),
            Err(e) if group.len() == 1 => out.push((group[0].0, Err(e))),
            // One caller's bad batch must not fail the others: retry them one by one.
            Err(_) => out.extend(
                group
                    .iter()
                    .map(|(t, b)| (*t, self.commit(&mut w, &[b]).map(|()| Committed::Stored))),
            ),
        }
        out
    }

    fn commit(&self, w: &mut Writer, batches: &[&EncodedBatch]) -> Result<(), StoreError> {
        // Taken after the batches were queued, so it holds every id they use.
        let pending: Pending = self
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .pending()
            .clone();
        let mut next_span = w.next_span;
        // (trace, span, row) of the spans stored, for the recent trace index.
        let mut stored: Vec<(TraceId, SpanId, i64)> = Vec::new();
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx("starting a write"))?;
        pending.persist(&tx).map_err(ctx("storing new names"))?;
        {
            let recent = self.read_recent();
            let mut seen: foldhash::HashSet<(TraceId, SpanId)> = Default::default();
            let mut tag = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO tag_index(hash, start, span) VALUES (?1, ?2, ?3)",
                )
                .map_err(ctx("storing spans"))?;
            // Inserted together, sorted, so the cursor only moves forward.
            let mut edges_new: Vec<(EdgeEntry, i64)> = Vec::new();
            // (row, body, row id) of the spans to insert.
            let mut new: Vec<(&Row, &[u8], i64)> = Vec::new();
            for b in batches {
                let (mut body_start, mut tags_start, mut edges_start) = (0, 0, 0);
                for r in &b.rows {
                    let (body, tags, edges) = (
                        &b.bodies[body_start..r.body_end],
                        &b.tags[tags_start..r.tags_end],
                        &b.edges[edges_start..r.edges_end],
                    );
                    body_start = r.body_end;
                    tags_start = r.tags_end;
                    edges_start = r.edges_end;
                    // A batch sent again (its acknowledgement was lost) is not stored twice,
                    // as long as the first copy is recent.
                    if recent.contains(&r.trace_id, &r.span_id)
                        || (batches.len() > 1 || b.rows.len() > 1)
                            && !seen.insert((r.trace_id, r.span_id))
                    {
                        continue;
                    }
                    let id = next_span;
                    next_span += 1;
                    for h in tags {
                        tag.execute(params![h, r.start, id])
                            .map_err(ctx("storing tags"))?;
                    }
                    edges_new.extend(edges.iter().map(|e| (*e, id)));
                    new.push((r, body, id));
                    stored.push((r.trace_id, r.span_id, id));
                }
            }
            insert_many(
                &tx,
                "INSERT INTO spans(id, trace_id, span_id, parent_id, service_id, operation_id, \
                 start, duration, status, resource_id, body) VALUES ",
                11,
                new.len(),
                &[128, 32, 8, 1],
                |st, i, p| {
                    let (r, body, id) = new[i];
                    st.raw_bind_parameter(p, id)?;
                    st.raw_bind_parameter(p + 1, &r.trace_id[..])?;
                    st.raw_bind_parameter(p + 2, &r.span_id[..])?;
                    st.raw_bind_parameter(p + 3, r.parent_id.as_ref().map(|p| &p[..]))?;
                    st.raw_bind_parameter(p + 4, r.service_id)?;
                    st.raw_bind_parameter(p + 5, r.operation_id)?;
                    st.raw_bind_parameter(p + 6, r.start)?;
                    st.raw_bind_parameter(p + 7, r.duration)?;
                    st.raw_bind_parameter(p + 8, r.status)?;
                    st.raw_bind_parameter(p + 9, r.resource_id)?;
                    st.raw_bind_parameter(p + 10, body)
                },
            )
            .map_err(ctx("storing spans"))?;
            edges_new.sort_unstable_by_key(|(e, id)| (e.bucket, e.seq, *id));
            insert_many(
                &tx,
                "INSERT OR IGNORE INTO edge_index(bucket, seq, span, kind, edge) VALUES ",
                5,
                edges_new.len(),
                &[64, 8, 1],
                |st, i, p| {
                    let (e, id) = &edges_new[i];
                    st.raw_bind_parameter(p, e.bucket)?;
                    st.raw_bind_parameter(p + 1, e.seq)?;
                    st.raw_bind_parameter(p + 2, id)?;
                    st.raw_bind_parameter(p + 3, e.kind)?;
                    st.raw_bind_parameter(p + 4, e.edge)
                },
            )
            .map_err(ctx("storing edges"))?;
            // Each operation's span count, for pruning names whose spans are all gone. A
            // batch has few distinct operations; consecutive spans mostly share one.
            let mut per_op: Vec<(i64, i64)> = Vec::new();
            for (r, _, _) in &new {
                match per_op.last_mut() {
                    Some((op, n)) if *op == r.operation_id => *n += 1,
                    _ => per_op.push((r.operation_id, 1)),
                }
            }
            add_operation_spans(&tx, per_op).map_err(ctx("counting operations"))?;
        }
        tx.prepare_cached("UPDATE meta SET value = value + ?1 WHERE key = 'span_count'")
            .and_then(|mut st| st.execute([stored.len() as i64]))
            .map_err(ctx("counting spans"))?;
        tx.commit().map_err(ctx("committing spans"))?;
        w.next_span = next_span;
        if !pending.is_empty() {
            self.catalog
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .committed(&pending);
        }
        {
            // Before the callers return, so a trace is found as soon as `write` returns.
            let mut recent = self.write_recent();
            for (t, s, row) in stored {
                recent.insert(t, s, row);
            }
        }
        let mut m = lock(&self.maintenance);
        m.dirty = true;
        if m.waiting {
            m.waiting = false;
            drop(m);
            self.maintenance_cv.notify_one();
        }
        Ok(())
    }

    /// Deletes up to `limit` of the `which` oldest spans with their tag and edge index
    /// entries, in one transaction, and drops the trace index runs that only point at deleted
    /// spans. Returns how many spans.
    fn delete_oldest(&self, which: Oldest, limit: usize) -> Result<usize, StoreError> {
        let mut w = lock(&self.writer);
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx("starting a retention step"))?;
        let victims = match which {
            Oldest::StartedBefore(cutoff) => query::tagged_spans(
                self,
                &tx,
                "SELECT id, start, status, resource_id, body FROM spans INDEXED BY spans_by_start
                 WHERE start < ?1 ORDER BY start LIMIT ?2",
                params![cutoff, limit as i64],
            )?,
            Oldest::Arrived => query::tagged_spans(
                self,
                &tx,
                "SELECT id, start, status, resource_id, body FROM spans ORDER BY id LIMIT ?1",
                params![limit as i64],
            )?,
        };
        let mut per_op: Vec<(i64, i64)> = Vec::with_capacity(victims.len());
        {
            let mut del_tag = tx
                .prepare_cached(
                    "DELETE FROM tag_index WHERE hash = ?1 AND start = ?2 AND span = ?3",
                )
                .map_err(ctx("deleting tags"))?;
            let mut del_edge = tx
                .prepare_cached(
                    "DELETE FROM edge_index WHERE bucket = ?1 AND seq = ?2 AND span = ?3",
                )
                .map_err(ctx("deleting edges"))?;
            let mut del = tx
                .prepare_cached("DELETE FROM spans WHERE id = ?1 RETURNING operation_id")
                .map_err(ctx("deleting spans"))?;
            for v in &victims {
                let (id, start) = (v.id, v.start);
                for h in &v.tags {
                    del_tag
                        .execute(params![h, start, id])
                        .map_err(ctx("deleting tags"))?;
                }
                for e in &v.edges {
                    del_edge
                        .execute(params![e.bucket, e.seq, id])
                        .map_err(ctx("deleting edges"))?;
                }
                let op: i64 = del
                    .query_row([id], |r| r.get(0))
                    .map_err(ctx("deleting spans"))?;
                per_op.push((op, -1));
            }
        }
        add_operation_spans(&tx, per_op).map_err(ctx("counting operations"))?;
        // Runs go whole, once every span in their id range is gone; until then lookups skip
        // their stale entries. Checked per run (a handful), not by the oldest live id: one
        // span with a skewed far-future start would otherwise pin every later run.
        let runs: Vec<(i64, i64, i64)> = tx
            .prepare_cached("SELECT id, first_span, last_span FROM trace_runs")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(ctx("listing trace index runs"))?;
        for (run, first, last) in runs {
            let live: bool = tx
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM spans WHERE id BETWEEN ?1 AND ?2)")
                .and_then(|mut st| st.query_row([first, last], |r| r.get(0)))
                .map_err(ctx("checking a trace index run"))?;
            if !live {
                tx.execute("DELETE FROM trace_index WHERE run = ?1", [run])
                    .and_then(|_| tx.execute("DELETE FROM trace_runs WHERE id = ?1", [run]))
                    .map_err(ctx("dropping a trace index run"))?;
            }
        }
        tx.execute(
            "UPDATE meta SET value = value - ?1 WHERE key = 'span_count'",
            [victims.len() as i64],
        )
        .map_err(ctx("counting spans"))?;
        tx.commit().map_err(ctx("committing a retention step"))?;
        Ok(victims.len())
    }

    /// Gives free pages back to the file system, a chunk per writer lock.
    fn shrink(&self) -> Result<(), StoreError> {
        loop {
            let w = lock(&self.writer);
            let free: u32 = w
                .conn
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .map_err(ctx("reading the free page count"))?;
            if free == 0 {
                break;
            }
            w.conn
                .execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_CHUNK})"))
                .map_err(ctx("shrinking the database"))?;
        }
        // Pages moved by the vacuum live in the WAL until a checkpoint writes them back and
        // truncates the database file; TRUNCATE also empties the WAL. It waits for readers
        // (busy timeout) but gives up at once if a reader holds an old snapshot for long, so
        // it is tried a few times; a file that stays larger is shrunk by a later checkpoint.
        let _one_at_a_time = lock(&self.checkpoint_lock);
        let w = lock(&self.writer);
        for _ in 0..20 {
            let busy: i64 = w
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .map_err(ctx("checkpointing after retention"))?;
            if busy == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Drops the operations none of whose spans are left, from the table and the catalog; a
    /// batch encoded before with one of them is then encoded again ([`Committed::Stale`]).
    /// Returns how many.
    fn prune_operations(&self) -> Result<usize, StoreError> {
        let mut w = lock(&self.writer);
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx("starting to prune operations"))?;
        let gone: Vec<(i64, i64, String, i32)> = tx
            .prepare_cached(
                "DELETE FROM operations WHERE spans <= 0 RETURNING id, service_id, name, kind",
            )
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect()
            })
            .map_err(ctx("pruning operations"))?;
        tx.commit().map_err(ctx("pruning operations"))?;
        if !gone.is_empty() {
            self.catalog
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .prune_operations(&gone);
        }
        Ok(gone.len())
    }

    /// Bytes of the write-ahead log file (0 if there is none).
    fn wal_bytes(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        std::fs::metadata(wal).map_or(0, |m| m.len())
    }

    /// Bytes the database uses: its pages minus the free ones (the WAL is not counted).
    fn used_bytes(&self, c: &Connection) -> Result<u64, StoreError> {
        let q = |p: &str| -> Result<i64, StoreError> {
            c.query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
                .map_err(ctx("reading the database size"))
        };
        Ok(((q("page_count")? - q("freelist_count")?) * q("page_size")?).max(0) as u64)
    }

    fn span_count(&self, c: &Connection) -> Result<u64, StoreError> {
        c.query_row("SELECT value FROM meta WHERE key = 'span_count'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n.max(0) as u64)
        .map_err(ctx("reading the span count"))
    }
}

/// Which spans retention deletes first.
#[derive(Clone, Copy)]
enum Oldest {
    /// By start time, those starting before this (Unix ns): the age limit.
    StartedBefore(i64),
    /// By arrival (row id): the size limit. Start times are the client's to choose; by them,
    /// spans dated ahead of the collector's clock were deleted last and pushed out everyone
    /// else's.
    Arrived,
}

/// Hands results to the waiting callers even if the commit panicked, so no caller waits
/// forever for a leader that is gone.
struct LeaderGuard<'a> {
    inner: &'a Inner,
    tickets: Vec<u64>,
    results: Vec<(u64, Result<Committed, StoreError>)>,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        let mut q = lock(&self.inner.queue);
        q.leader = false;
        let mut results = std::mem::take(&mut self.results);
        if results.len() != self.tickets.len() {
            results = self
                .tickets
                .iter()
                .map(|t| (*t, Err(StoreError::Database("the write panicked".into()))))
                .collect();
        }
        q.results.extend(results);
        drop(q);
        self.inner.queue_cv.notify_all();
    }
}

/// One encoding pass over `spans`; fills `missing` with the names that need ids first (the
/// batch is then incomplete and thrown away).
fn encode_batch(cat: &Catalog, spans: &[SpanRef<'_>], missing: &mut Missing) -> EncodedBatch {
    let mut out = EncodedBatch {
        rows: Vec::with_capacity(spans.len()),
        bodies: Vec::with_capacity(spans.len() * 192),
        tags: Vec::new(),
        edges: Vec::new(),
        epoch: cat.epoch(),
    };
    let Missing {
        strings,
        services,
        operations,
        resources,
    } = missing;
    let mut interner = cat.interner(strings);
    let mut resource_blob = Vec::new();
    let mut resource_tags = Vec::new();
    // Spans of one batch mostly share a resource: compare with the last one before encoding.
    let mut last_resource: Option<(&[KeyValueRef<'_>], i64)> = None;
    let mut last_service: Option<(&str, i64)> = None;
    for s in spans {
        let service_id = match last_service {
            Some((name, id)) if name == s.service => Some(id),
            _ => {
                let id = cat.service_id(s.service);
                match id {
                    Some(id) => last_service = Some((s.service, id)),
                    None if !services.iter().any(|n| n == s.service) => {
                        services.push(s.service.to_owned())
                    }
                    None => {}
                }
                id
            }
        };
        let operation_id =
            service_id.and_then(|svc| match cat.operation_id(svc, s.operation, s.kind) {
                Some(id) => Some(id),
                None => {
                    operations.push((svc, s.operation.to_owned(), s.kind));
                    None
                }
            });
        let resource_id = match last_resource {
            Some((attrs, id)) if std::ptr::eq(attrs, s.resource) || attrs == s.resource => Some(id),
            _ => {
                last_resource = None;
                resource_blob.clear();
                let before = interner.missing();
                codec::encode_resource(&mut resource_blob, s.resource, &mut interner);
                if interner.missing() > before {
                    None // the blob changes once its keys have ids
                } else if let Some(id) = cat.resource_id(&resource_blob) {
                    resource_tags.clear();
                    index_tags(s.resource, status::UNSET, &mut resource_tags);
                    last_resource = Some((s.resource, id));
                    Some(id)
                } else {
                    resources.push(resource_blob.clone());
                    None
                }
            }
        };
        let body_start = out.bodies.len();
        codec::encode_body(
            &mut out.bodies,
            &BodyRef {
                kind: s.kind,
                start_unix_nano: s.start_unix_nano,
                status_message: s.status_message,
                attributes: s.attributes,
                events: s.events,
                links: s.links,
                scope_name: s.scope_name,
                scope_version: s.scope_version,
            },
            &mut interner,
        );
        let (Some(service_id), Some(operation_id), Some(resource_id)) =
            (service_id, operation_id, resource_id)
        else {
            out.bodies.truncate(body_start);
            continue;
        };
        let tags_start = out.tags.len();
        index_tags(s.attributes, s.status_code, &mut out.tags);
        out.tags.extend_from_slice(&resource_tags);
        if out.tags.len() - tags_start > 1 {
            let mut unique: Vec<i64> = out.tags.drain(tags_start..).collect();
            unique.sort_unstable();
            unique.dedup();
            out.tags.extend(unique);
        }
        index_edges(s.kind, s.attributes, s.start_unix_nano, &mut out.edges);
        out.rows.push(Row {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_id: s.parent_span_id,
            service_id,
            operation_id,
            // Stored as SQLite's signed integers; wrapping keeps every value exact (ordering
            // only breaks past the year 2262).
            start: s.start_unix_nano as i64,
            duration: s.duration_nano as i64,
            status: s.status_code,
            resource_id,
            body_end: out.bodies.len(),
            tags_end: out.tags.len(),
            edges_end: out.edges.len(),
        });
    }
    out
}

impl SpanStore for SqliteStore {
    fn write(&self, spans: &[SpanRecord]) -> Result<(), StoreError> {
        with_span_refs(spans, |refs| self.write_refs(refs))
    }

    fn write_refs(&self, spans: &[SpanRef<'_>]) -> Result<(), StoreError> {
        if spans.is_empty() {
            return Ok(());
        }
        // Stale only if retention pruned one of the batch's operations between its encoding and
        // its commit (at most once a retention pass): encoding again is then enough.
        for _ in 0..8 {
            let batch = self.inner.encode(spans)?;
            if let Committed::Stored = self.inner.write(batch)? {
                return Ok(());
            }
        }
        Err(StoreError::Database(
            "operations kept being pruned while this batch was written".into(),
        ))
    }

    fn services(&self) -> Result<Vec<String>, StoreError> {
        self.inner.with_reader(|c| {
            let mut st = c
                .prepare_cached("SELECT name FROM services ORDER BY name")
                .map_err(ctx("listing services"))?;
            let rows = st
                .query_map([], |r| r.get(0))
                .map_err(ctx("listing services"))?;
            rows.collect::<Result<_, _>>()
                .map_err(ctx("listing services"))
        })
    }

    fn operations(&self, service: &str, kind: Option<i32>) -> Result<Vec<Operation>, StoreError> {
        self.inner.with_reader(|c| {
            let mut st = c
                .prepare_cached(
                    "SELECT o.name, o.kind FROM operations o JOIN services s ON s.id = o.service_id
                     WHERE s.name = ?1 AND (?2 IS NULL OR o.kind = ?2) ORDER BY o.name, o.kind",
                )
                .map_err(ctx("listing operations"))?;
            let rows = st
                .query_map(params![service, kind], |r| {
                    Ok(Operation {
                        name: r.get(0)?,
                        kind: r.get(1)?,
                    })
                })
                .map_err(ctx("listing operations"))?;
            rows.collect::<Result<_, _>>()
                .map_err(ctx("listing operations"))
        })
    }

    fn trace(&self, trace_id: &TraceId) -> Result<Vec<SpanRecord>, StoreError> {
        self.inner
            .with_reader(|c| query::load_trace(&self.inner, c, trace_id))
    }

    fn trace_limited(
        &self,
        trace_id: &TraceId,
        limit: crate::TraceLimit,
    ) -> Result<crate::LimitedTrace, StoreError> {
        self.inner
            .with_reader(|c| query::load_trace_limited(&self.inner, c, trace_id, limit))
    }

    fn find_traces(&self, q: &TraceQuery) -> Result<Vec<Vec<SpanRecord>>, StoreError> {
        self.inner
            .with_reader(|c| query::find_traces(&self.inner, c, q))
    }

    fn find_trace_ids(&self, q: &TraceQuery) -> Result<Vec<TraceId>, StoreError> {
        self.inner
            .with_reader(|c| query::find_trace_ids(&self.inner, c, q))
    }

    fn edge_spans(
        &self,
        key: crate::EdgeKey<'_>,
        near_unix_nano: u64,
    ) -> Result<Vec<SpanRecord>, StoreError> {
        self.inner
            .with_reader(|c| query::edge_spans(&self.inner, c, key, near_unix_nano))
    }

    fn dependencies(
        &self,
        end_unix_nano: u64,
        lookback_nano: u64,
    ) -> Result<Vec<DependencyLink>, StoreError> {
        self.inner
            .with_reader(|c| query::dependencies(&self.inner, c, end_unix_nano, lookback_nano))
    }

    fn enforce_retention(&self, policy: &Retention) -> Result<RetentionReport, StoreError> {
        let mut deleted = 0u64;
        if let Some(age) = policy.max_age {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let cutoff = now.saturating_sub(age.as_nanos().min(u128::from(u64::MAX)) as u64);
            loop {
                let n = self.inner.delete_oldest(
                    Oldest::StartedBefore(cutoff.min(i64::MAX as u64) as i64),
                    DELETE_CHUNK,
                )?;
                deleted += n as u64;
                if n < DELETE_CHUNK {
                    break;
                }
            }
        }
        if let Some(max) = policy.max_bytes {
            loop {
                let (used, count) = self
                    .inner
                    .with_reader(|c| Ok((self.inner.used_bytes(c)?, self.inner.span_count(c)?)))?;
                if used <= max || count == 0 {
                    break;
                }
                // Aim at the excess from the average span size; pages that only thin out
                // (random trace ids) free nothing, so the loop measures again after each step.
                let per_span = (used / count).max(1);
                let want = ((used - max) / per_span).clamp(1, DELETE_CHUNK as u64) as usize;
                let n = self.inner.delete_oldest(Oldest::Arrived, want)?;
                deleted += n as u64;
                if n == 0 {
                    break;
                }
            }
        }
        // The WAL is on disk too: it keeps its largest size until a checkpoint truncates it
        // (so that commits overwrite rather than grow it), which the size limit must count.
        let over = policy.max_bytes.is_some_and(|max| {
            let file = std::fs::metadata(&self.inner.path).map_or(0, |m| m.len());
            file + self.inner.wal_bytes() > max
        });
        if deleted > 0 || over {
            self.inner.shrink()?;
        }
        let pruned = self.inner.prune_operations()?;
        Ok(RetentionReport {
            deleted_spans: deleted,
            pruned_operations: pruned as u64,
        })
    }

    fn operations_overflowed(&self) -> u64 {
        self.inner
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .operations_overflowed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.with_reader(|c| {
            Ok(StoreStats {
                spans: self.inner.span_count(c)?,
                bytes: self.inner.used_bytes(c)?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every count decomposes into the chunk sizes: all rows land, in order, none twice.
    #[test]
    fn insert_many_inserts_every_row_once_for_any_count() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a INTEGER, b BLOB)")
            .unwrap();
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 137, 300] {
            conn.execute("DELETE FROM t", []).unwrap();
            insert_many(
                &conn,
                "INSERT INTO t(a, b) VALUES ",
                2,
                n,
                &[64, 8, 1],
                |st, i, p| {
                    st.raw_bind_parameter(p, i as i64)?;
                    st.raw_bind_parameter(p + 1, &[i as u8][..])
                },
            )
            .unwrap();
            let rows: Vec<(i64, Vec<u8>)> = conn
                .prepare("SELECT a, b FROM t ORDER BY rowid")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let want: Vec<(i64, Vec<u8>)> = (0..n).map(|i| (i as i64, vec![i as u8])).collect();
            assert_eq!(rows, want, "n = {n}");
        }
    }
}
