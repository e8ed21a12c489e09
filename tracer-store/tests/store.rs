//! The SQLite store against real database files in temporary directories (no mocks): round
//! trips, trace assembly across writes, searches, the service map, retention, migrations,
//! concurrency, reopening, and a `kill -9` in the middle of writing.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tracer_store::{
    kind, status, AttrValue, KeyValue, Retention, SpanEvent, SpanLink, SpanRecord, SpanStore,
    SqliteStore, StoreError, StoreOptions, TraceQuery,
};

/// A fresh directory per test (and process).
fn dir(name: &str) -> PathBuf {
    let d = dir_keep(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The same directory as `dir(name)`, without wiping it.
fn dir_keep(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tracer-store-{name}-{}", std::process::id()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn kv(k: &str, v: AttrValue) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: v,
    }
}

fn text(k: &str, v: &str) -> KeyValue {
    kv(k, AttrValue::Str(v.into()))
}

/// Tiny trace index runs, so that lookups go through the on-disk runs as well as memory.
fn small_runs() -> StoreOptions {
    StoreOptions {
        trace_run_spans: 16,
        ..Default::default()
    }
}

fn span(
    trace: u8,
    id: u8,
    parent: Option<u8>,
    service: &str,
    op: &str,
    start: u64,
    dur: u64,
) -> SpanRecord {
    SpanRecord {
        trace_id: [trace; 16],
        span_id: [id; 8],
        parent_span_id: parent.map(|p| [p; 8]),
        service: service.into(),
        operation: op.into(),
        kind: kind::SERVER,
        start_unix_nano: start,
        duration_nano: dur,
        status_code: status::UNSET,
        status_message: String::new(),
        attributes: vec![
            text("http.request.method", "GET"),
            kv("http.response.status_code", AttrValue::Int(200)),
        ],
        resource: vec![text("service.name", service), text("host.name", "h1")].into(),
        events: vec![],
        links: vec![],
        scope_name: "scope".into(),
        scope_version: "1".into(),
    }
}

#[test]
fn every_field_round_trips_and_traces_assemble_across_writes() {
    let path = dir("roundtrip");
    let store = SqliteStore::open_with(&path, &small_runs()).unwrap();
    let t0 = now();
    let mut root = span(1, 1, None, "web", "GET /", t0, 1000);
    root.kind = kind::CLIENT;
    root.status_code = status::ERROR;
    root.status_message = "boom: ünïcödé".into();
    root.attributes.extend([
        kv("ratio", AttrValue::Float(0.5)),
        kv("nan-ish", AttrValue::Float(-1e300)),
        kv("ok", AttrValue::Bool(false)),
        kv("yes", AttrValue::Bool(true)),
        kv("neg", AttrValue::Int(i64::MIN)),
        kv("list", AttrValue::Json("[1,2]".into())),
        text("empty", ""),
        text(&"long.key.".repeat(20), &"v".repeat(5000)),
    ]);
    Arc::make_mut(&mut root.resource).push(kv("host.cpu.count", AttrValue::Int(2)));
    root.events = vec![
        SpanEvent {
            time_unix_nano: t0 + 5,
            name: "exception".into(),
            attributes: vec![text("exception.type", "E"), kv("x", AttrValue::Int(1))],
        },
        SpanEvent {
            time_unix_nano: t0 - 5,
            name: "before the span started".into(),
            attributes: vec![],
        },
    ];
    root.links = vec![SpanLink {
        trace_id: [9; 16],
        span_id: [8; 8],
        attributes: vec![text("link.kind", "follows")],
    }];
    root.scope_name = String::new();
    root.scope_version = String::new();
    let child = span(1, 2, Some(1), "api", "POST /x", t0 + 10, 500);
    let mut grandchild = span(1, 3, Some(2), "db", "SELECT", t0 + 20, 100);
    grandchild.kind = kind::INTERNAL;
    grandchild.start_unix_nano = u64::MAX - 7; // far future: exact, however odd
                                               // Three writes, out of order; other traces in between.
    store.write(std::slice::from_ref(&grandchild)).unwrap();
    store
        .write(&[span(2, 1, None, "web", "GET /", t0, 1)])
        .unwrap();
    store.write(std::slice::from_ref(&root)).unwrap();
    store.write(std::slice::from_ref(&child)).unwrap();
    let want = vec![root.clone(), child.clone(), grandchild.clone()];
    assert_eq!(store.trace(&[1; 16]).unwrap(), want);
    assert!(store.trace(&[9; 16]).unwrap().is_empty());
    assert_eq!(store.services().unwrap(), ["api", "db", "web"]);
    let ops = store.operations("web", None).unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!((ops[0].name.as_str(), ops[0].kind), ("GET /", kind::SERVER));
    assert_eq!((ops[1].name.as_str(), ops[1].kind), ("GET /", kind::CLIENT));
    assert_eq!(
        store.operations("web", Some(kind::CLIENT)).unwrap().len(),
        1
    );
    assert!(store.operations("nobody", None).unwrap().is_empty());

    // The same from the on-disk trace index, and after reopening.
    store.write_trace_index_run().unwrap();
    assert_eq!(store.trace(&[1; 16]).unwrap(), want);
    drop(store);
    let store = SqliteStore::open(&dir_keep("roundtrip")).unwrap();
    assert_eq!(store.trace(&[1; 16]).unwrap(), want);
    assert_eq!(store.trace(&[2; 16]).unwrap().len(), 1);
    assert_eq!(store.stats().unwrap().spans, 4);
}

/// Spans with events, links and several resources in one `write`, and the same through
/// `write_refs` (what OTLP protobuf ingest uses): both store exactly what was given.
#[test]
fn a_mixed_batch_round_trips_through_write_and_write_refs() {
    let store = SqliteStore::open(&dir("mixed")).unwrap();
    let t0 = now();
    let batch = |trace: u8| -> Vec<SpanRecord> {
        let other: Arc<Vec<KeyValue>> = Arc::new(vec![
            text("service.name", "db"),
            kv("host.ip", AttrValue::Json("[\"10.0.0.1\"]".into())),
        ]);
        (1..=6u8)
            .map(|i| {
                let mut s = span(
                    trace,
                    i,
                    (i > 1).then_some(1),
                    "web",
                    "GET /",
                    t0 + u64::from(i),
                    9,
                );
                if i % 2 == 0 {
                    s.resource = other.clone();
                    s.service = "db".into();
                }
                s.events = (0..i % 3)
                    .map(|e| SpanEvent {
                        time_unix_nano: t0 + u64::from(e),
                        name: format!("event {e}"),
                        attributes: vec![kv("n", AttrValue::Int(e.into()))],
                    })
                    .collect();
                s.links = (0..i % 2)
                    .map(|_| SpanLink {
                        trace_id: [i; 16],
                        span_id: [i; 8],
                        attributes: vec![text("why", "retry"), kv("ok", AttrValue::Bool(true))],
                    })
                    .collect();
                s
            })
            .collect()
    };
    let (a, b) = (batch(21), batch(22));
    store.write(&a).unwrap();
    tracer_store::with_span_refs(&b, |refs| store.write_refs(refs)).unwrap();
    assert_eq!(store.trace(&[21; 16]).unwrap(), a);
    assert_eq!(store.trace(&[22; 16]).unwrap(), b);
}

#[test]
fn a_batch_sent_twice_is_stored_once() {
    let store = SqliteStore::open(&dir("dup")).unwrap();
    let t0 = now();
    let batch: Vec<SpanRecord> = (1..=3)
        .map(|i| span(7, i, None, "s", "op", t0, 1))
        .collect();
    store.write(&batch).unwrap();
    store.write(&batch).unwrap();
    store
        .write(&[
            batch[0].clone(),
            batch[0].clone(),
            span(7, 4, None, "s", "op", t0, 1),
        ])
        .unwrap();
    assert_eq!(store.trace(&[7; 16]).unwrap().len(), 4);
    assert_eq!(store.stats().unwrap().spans, 4);
}

#[test]
fn searches_filter_by_service_operation_tags_duration_and_window() {
    let store = SqliteStore::open_with(&dir("search"), &small_runs()).unwrap();
    let t0 = now() - 60_000_000_000;
    let mut batch = Vec::new();
    for i in 0..50u8 {
        let mut s = span(
            i + 1,
            1,
            None,
            if i % 2 == 0 { "even" } else { "odd" },
            if i % 5 == 0 {
                "GET /five"
            } else {
                "GET /other"
            },
            t0 + u64::from(i) * 1_000_000,
            u64::from(i) * 1000,
        );
        s.attributes.push(text("url.path", &format!("/items/{i}")));
        if i == 7 {
            s.attributes[1] = kv("http.response.status_code", AttrValue::Int(503));
            s.status_code = status::ERROR;
        }
        if i == 8 {
            s.attributes[0] = text("http.request.method", "DELETE");
            s.kind = kind::CLIENT;
            Arc::make_mut(&mut s.resource).push(text("db.system", "postgresql"));
        }
        if i == 9 {
            Arc::make_mut(&mut s.resource)[1] = text("host.name", "h2");
        }
        batch.push(s);
    }
    // In several writes, some spans past the on-disk index, some in memory.
    for chunk in batch.chunks(7) {
        store.write(chunk).unwrap();
    }
    store.write_trace_index_run().unwrap();
    // A second span for trace 3 (i = 2), later and in another service: found once, whole.
    store
        .write(&[span(3, 2, Some(1), "odd", "child", t0 + 2_500_000, 10)])
        .unwrap();
    let q = |f: &dyn Fn(&mut TraceQuery)| {
        let mut q = TraceQuery {
            limit: 100,
            start_unix_nano: Some(t0),
            end_unix_nano: Some(now()),
            ..Default::default()
        };
        f(&mut q);
        store
            .find_traces(&q)
            .unwrap()
            .into_iter()
            .map(|t| t[0].trace_id[0] - 1)
            .collect::<Vec<u8>>()
    };
    assert_eq!(q(&|q| q.service = Some("odd".into())).len(), 26);
    // Most recent first, by the matching span.
    assert_eq!(q(&|q| q.service = Some("even".into()))[..3], [48, 46, 44]);
    assert_eq!(q(&|q| q.service = Some("odd".into()))[..3], [49, 47, 45]);
    let whole = store
        .find_traces(&TraceQuery {
            service: Some("odd".into()),
            operation: Some("child".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].len(), 2, "the whole trace, not just the match");
    assert_eq!(
        q(&|q| {
            q.service = Some("even".into());
            q.operation = Some("GET /five".into())
        }),
        [40, 30, 20, 10, 0]
    );
    // An operation without a service.
    assert_eq!(
        q(&|q| q.operation = Some("GET /five".into())),
        [45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
    );
    // Indexed tag, on span attributes, alone and with a service.
    let status = || vec![("http.response.status_code".to_owned(), "503".to_owned())];
    assert_eq!(q(&|q| q.tags = status()), [7]);
    assert_eq!(
        q(&|q| {
            q.tags = status();
            q.service = Some("odd".into())
        }),
        [7]
    );
    assert!(q(&|q| {
        q.tags = status();
        q.service = Some("even".into())
    })
    .is_empty());
    assert_eq!(
        q(&|q| q.tags = vec![("http.request.method".into(), "DELETE".into())]),
        [8]
    );
    // A common value (not in the index) still matches.
    assert_eq!(
        q(&|q| q.tags = vec![("http.response.status_code".into(), "200".into())]).len(),
        49
    );
    // Indexed tag on resource attributes.
    assert_eq!(
        q(&|q| q.tags = vec![("db.system".into(), "postgresql".into())]),
        [8]
    );
    // Not indexed, on span attributes and on resource attributes.
    assert_eq!(
        q(&|q| q.tags = vec![("url.path".into(), "/items/33".into())]),
        [33]
    );
    assert_eq!(
        q(&|q| q.tags = vec![("host.name".into(), "h2".into())]),
        [9]
    );
    assert_eq!(
        q(&|q| q.tags = vec![
            ("host.name".into(), "h1".into()),
            ("http.request.method".into(), "GET".into())
        ])
        .len(),
        48
    );
    assert!(q(&|q| q.tags = vec![("host.name".into(), "h3".into())]).is_empty());
    assert!(q(&|q| q.tags = vec![("no.such.key".into(), "x".into())]).is_empty());
    // What the query API shows as tags.
    assert_eq!(q(&|q| q.tags = vec![("error".into(), "true".into())]), [7]);
    assert_eq!(
        q(&|q| q.tags = vec![("otel.status_code".into(), "ERROR".into())]),
        [7]
    );
    assert_eq!(
        q(&|q| q.tags = vec![("span.kind".into(), "client".into())]),
        [8]
    );
    // Duration range and time window, inclusive.
    assert_eq!(
        q(&|q| {
            q.min_duration_nano = Some(45_000);
            q.max_duration_nano = Some(47_000)
        }),
        [47, 46, 45]
    );
    assert_eq!(
        q(&|q| {
            q.service = Some("odd".into());
            q.min_duration_nano = Some(45_000)
        }),
        [49, 47, 45]
    );
    assert_eq!(
        q(&|q| {
            q.start_unix_nano = Some(t0 + 10_000_000);
            q.end_unix_nano = Some(t0 + 12_000_000)
        }),
        [12, 11, 10]
    );
    assert!(q(&|q| {
        q.start_unix_nano = Some(t0 + 2);
        q.end_unix_nano = Some(t0 + 1)
    })
    .is_empty());
    assert_eq!(q(&|q| q.limit = 2), [49, 48]);
    assert!(q(&|q| q.service = Some("nobody".into())).is_empty());
    assert!(q(&|q| q.operation = Some("nothing".into())).is_empty());
}

#[test]
fn the_service_map_joins_parents_and_children_written_in_any_order() {
    let store = SqliteStore::open_with(&dir("deps"), &small_runs()).unwrap();
    let t0 = now() - 3_600_000_000_000;
    // Parent first, child in a later write.
    store
        .write(&[span(1, 1, None, "front", "GET /", t0, 50_000)])
        .unwrap();
    store
        .write(&[span(1, 2, Some(1), "back", "query", t0 + 10, 1_000)])
        .unwrap();
    // Child first, parent later; 20 children with durations 1..=20 µs, every fifth an error.
    let mut children: Vec<SpanRecord> = (1..=20u8)
        .map(|i| {
            let mut c = span(
                2,
                10 + i,
                Some(1),
                "back",
                "query",
                t0 + 100 + u64::from(i),
                u64::from(i) * 1_000,
            );
            if i % 5 == 0 {
                c.status_code = status::ERROR;
            }
            c
        })
        .collect();
    children.push(span(2, 99, Some(1), "front", "internal", t0 + 200, 5)); // same service
    children.push(span(2, 98, Some(77), "db", "orphan", t0 + 200, 5)); // parent never seen
    store.write(&children).unwrap();
    store.write_trace_index_run().unwrap();
    store
        .write(&[span(2, 1, None, "front", "GET /", t0 + 90, 90_000)])
        .unwrap();
    // A parent an hour before its child (beyond the scan's slack): found by trace id.
    store
        .write(&[span(
            3,
            1,
            None,
            "cron",
            "nightly",
            t0 - 3_600_000_000_000,
            1,
        )])
        .unwrap();
    store
        .write(&[span(3, 2, Some(1), "back", "query", t0 + 300, 1_000)])
        .unwrap();
    // A child whose parent starts 1 s after it (clock skew): still joined.
    store
        .write(&[span(4, 2, Some(1), "back", "query", t0 + 400, 7_000)])
        .unwrap();
    store
        .write(&[span(4, 1, None, "edge", "GET", t0 + 1_000_000_400, 1)])
        .unwrap();
    // A call the caller's span calls an error (a CLIENT span with a 4xx) and the callee's does
    // not: an error on the map too.
    let mut caller = span(6, 1, None, "edge", "GET /missing", t0 + 500, 2_000);
    caller.status_code = status::ERROR;
    store
        .write(&[
            caller,
            span(6, 2, Some(1), "front", "GET /missing", t0 + 510, 1_000),
        ])
        .unwrap();
    // Outside the window: not counted.
    store
        .write(&[span(
            5,
            1,
            None,
            "front",
            "GET /",
            t0 + 7_200_000_000_000,
            1,
        )])
        .unwrap();
    store
        .write(&[span(
            5,
            2,
            Some(1),
            "back",
            "query",
            t0 + 7_200_000_000_010,
            1,
        )])
        .unwrap();

    let deps = store
        .dependencies(t0 + 60_000_000_000, 61_000_000_000)
        .unwrap();
    let edges: Vec<(&str, &str, u64, u64)> = deps
        .iter()
        .map(|d| {
            (
                d.parent.as_str(),
                d.child.as_str(),
                d.call_count,
                d.error_count,
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            ("cron", "back", 1, 0),
            ("edge", "back", 1, 0),
            ("edge", "front", 1, 1),
            ("front", "back", 21, 4)
        ]
    );
    let fb = &deps[3];
    // Durations: 1 µs (first trace) and 1..=20 µs.
    assert_eq!(fb.avg_duration_nano, (1_000 + 210_000) / 21);
    // Nearest rank: the 20th of 21 sorted durations.
    assert_eq!(fb.p95_duration_nano, 19_000);
    assert!(store.dependencies(t0 - 10, 5).unwrap().is_empty());
}

#[test]
fn retention_deletes_by_age_and_shrinks_by_size() {
    let path = dir("retention");
    let store = SqliteStore::open_with(&path, &small_runs()).unwrap();
    let old = now() - 3 * 86_400_000_000_000;
    let fresh = now();
    let mut batch = Vec::new();
    for i in 0..200u8 {
        let mut s = span(
            i,
            1,
            None,
            "svc",
            "op",
            if i < 100 { old } else { fresh },
            10,
        );
        s.status_code = if i % 10 == 0 {
            status::ERROR
        } else {
            status::UNSET
        };
        batch.push(s);
    }
    store.write(&batch).unwrap();
    store.write_trace_index_run().unwrap();
    let r = store
        .enforce_retention(&Retention {
            max_age: Some(Duration::from_secs(86_400)),
            max_bytes: None,
        })
        .unwrap();
    assert_eq!(r.deleted_spans, 100);
    assert_eq!(store.stats().unwrap().spans, 100);
    assert!(store.trace(&[5; 16]).unwrap().is_empty());
    assert_eq!(store.trace(&[150; 16]).unwrap().len(), 1);
    // The tag index lost the deleted spans' entries with them.
    let errors = store
        .find_traces(&TraceQuery {
            tags: vec![("error".into(), "true".into())],
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(errors.len(), 10);

    // Size: fill with bigger spans, then cap well below.
    let mut big = Vec::new();
    for i in 0..5000u32 {
        let mut s = span(0, 0, None, "svc", "op", fresh + u64::from(i), 10);
        s.trace_id[..4].copy_from_slice(&i.to_be_bytes());
        s.trace_id[15] = 0xbb;
        s.span_id = [1; 8];
        s.attributes.push(text("pad", &"x".repeat(400)));
        big.push(s);
    }
    for chunk in big.chunks(1000) {
        store.write(chunk).unwrap();
    }
    // Nothing left for the background to add meanwhile.
    store.write_trace_index_run().unwrap();
    let before = store.stats().unwrap();
    // The background checkpointer runs at most once a second: fold the WAL in now, so that the
    // file holds all of the data before it is measured.
    rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let file_before = std::fs::metadata(path.join("spans.db")).unwrap().len();
    let cap = before.bytes / 3;
    let r = store
        .enforce_retention(&Retention {
            max_age: None,
            max_bytes: Some(cap),
        })
        .unwrap();
    let after = store.stats().unwrap();
    assert!(
        r.deleted_spans > 0 && after.bytes <= cap,
        "{before:?} -> {after:?} (cap {cap})"
    );
    assert_eq!(after.spans, before.spans - r.deleted_spans);
    let file = std::fs::metadata(path.join("spans.db")).unwrap().len();
    assert!(
        file <= cap + 65_536 && file < file_before,
        "the file shrinks too: {file_before} -> {file} bytes"
    );
    // The newest spans are the ones kept.
    let mut newest = [0u8; 16];
    newest[..4].copy_from_slice(&4999u32.to_be_bytes());
    newest[15] = 0xbb;
    assert_eq!(store.trace(&newest).unwrap().len(), 1);
    // Trace index runs whose spans are all gone went with them.
    let c = rusqlite::Connection::open(path.join("spans.db")).unwrap();
    let dead_runs: i64 = c
        .query_row(
            "SELECT count(*) FROM trace_runs r
             WHERE NOT EXISTS (SELECT 1 FROM spans WHERE id BETWEEN r.first_span AND r.last_span)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dead_runs, 0);
    // And the store keeps working.
    store
        .write(&[span(222, 1, None, "svc", "op", fresh, 1)])
        .unwrap();
    assert_eq!(store.trace(&[222; 16]).unwrap().len(), 1);
}

/// The first schema (version 1), exactly as that release created it.
const V1_SCHEMA: &str = "
    CREATE TABLE services(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
    CREATE TABLE operations(id INTEGER PRIMARY KEY, service_id INTEGER NOT NULL, name TEXT NOT NULL,
                            kind INTEGER NOT NULL, UNIQUE(service_id, name, kind));
    CREATE TABLE resources(id INTEGER PRIMARY KEY, hash INTEGER NOT NULL UNIQUE, attributes TEXT NOT NULL);
    CREATE TABLE spans(
       id INTEGER PRIMARY KEY, trace_id BLOB NOT NULL, span_id BLOB NOT NULL, parent_id BLOB,
       service_id INTEGER NOT NULL, operation_id INTEGER NOT NULL, start INTEGER NOT NULL,
       duration INTEGER NOT NULL, status INTEGER NOT NULL, resource_id INTEGER NOT NULL,
       body TEXT NOT NULL);
    CREATE INDEX spans_by_trace ON spans(trace_id);
    CREATE INDEX spans_by_service_start ON spans(service_id, start);
    CREATE INDEX spans_by_start ON spans(start);
    PRAGMA user_version = 1;";

#[test]
fn a_pre_release_store_is_refused_with_what_to_do() {
    let path = dir("pre-release");
    std::fs::create_dir_all(&path).unwrap();
    {
        let c = rusqlite::Connection::open(path.join("spans.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE resources(id INTEGER PRIMARY KEY, hash INTEGER NOT NULL UNIQUE, attrs TEXT NOT NULL);
             CREATE TABLE spans(id INTEGER PRIMARY KEY, trace_id BLOB NOT NULL, attrs TEXT NOT NULL,
                                extra TEXT NOT NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let err = SqliteStore::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains("pre-release build") && err.contains("Move the data directory aside"),
        "{err}"
    );
    // Nothing was changed: the file is still the old layout, for whoever wants it.
    let c = rusqlite::Connection::open(path.join("spans.db")).unwrap();
    let version: u32 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
}

#[test]
fn a_version_1_store_is_upgraded() {
    let path = dir("v1");
    std::fs::create_dir_all(&path).unwrap();
    let t0 = now();
    {
        let c = rusqlite::Connection::open(path.join("spans.db")).unwrap();
        c.execute_batch(V1_SCHEMA).unwrap();
        c.execute_batch(
            r#"INSERT INTO services VALUES (1, 'shop'), (2, 'db');
               INSERT INTO operations VALUES (1, 1, 'GET /cart', 2), (2, 2, 'SELECT', 3);
               INSERT INTO resources VALUES (1, 42, '[{"key":"service.name","value":{"Str":"shop"}},{"key":"host.name","value":{"Str":"h9"}}]');"#,
        )
        .unwrap();
        let body_root = r#"{"k":2,"m":"bad","a":[{"key":"http.response.status_code","value":{"Int":500}},{"key":"url.path","value":{"Str":"/cart"}}],"e":[{"time_unix_nano":5,"name":"exception","attributes":[]}],"s":"sdk","v":"1.0"}"#;
        let body_child = r#"{"k":3,"a":[]}"#;
        let mut ins = c
            .prepare("INSERT INTO spans VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10)")
            .unwrap();
        ins.execute(rusqlite::params![
            1,
            [4u8; 16],
            [1u8; 8],
            None::<Vec<u8>>,
            1,
            1,
            t0 as i64,
            900,
            2,
            body_root
        ])
        .unwrap();
        ins.execute(rusqlite::params![
            2,
            [4u8; 16],
            [2u8; 8],
            [1u8; 8],
            2,
            2,
            (t0 + 10) as i64,
            100,
            0,
            body_child
        ])
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let version: u32 = rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    let trace = store.trace(&[4; 16]).unwrap();
    assert_eq!(trace.len(), 2);
    let root = &trace[0];
    assert_eq!(
        (root.service.as_str(), root.operation.as_str()),
        ("shop", "GET /cart")
    );
    assert_eq!(
        (root.kind, root.status_code, root.status_message.as_str()),
        (2, 2, "bad")
    );
    assert_eq!(
        root.attributes[0],
        kv("http.response.status_code", AttrValue::Int(500))
    );
    assert_eq!(root.resource[1], text("host.name", "h9"));
    assert_eq!(root.events[0].time_unix_nano, 5);
    assert_eq!(
        (root.scope_name.as_str(), root.scope_version.as_str()),
        ("sdk", "1.0")
    );
    assert_eq!(trace[1].parent_span_id, Some([1; 8]));
    assert_eq!(store.services().unwrap(), ["db", "shop"]);
    assert_eq!(store.stats().unwrap().spans, 2);
    // Converted spans are in the tag index and the service map.
    let found = store
        .find_traces(&TraceQuery {
            tags: vec![("http.response.status_code".into(), "500".into())],
            limit: 5,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(found.len(), 1);
    let deps = store.dependencies(t0 + 1_000, 1_000_000).unwrap();
    assert_eq!(
        (deps[0].parent.as_str(), deps[0].child.as_str()),
        ("shop", "db")
    );
    // New writes go on after the converted ones, and everything survives a reopen.
    store
        .write(&[span(4, 3, Some(2), "shop", "GET /cart", t0 + 20, 1)])
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.trace(&[4; 16]).unwrap().len(), 3);
    // The operations' span counts (version 4) start from the converted spans.
    assert_eq!(operation_counts(&path), [(1, 2), (2, 1)]);
}

/// `(operation id, span count)` as stored, by id.
fn operation_counts(path: &Path) -> Vec<(i64, i64)> {
    rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .prepare("SELECT id, spans FROM operations ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_store_from_a_newer_version_is_refused() {
    let path = dir("newer");
    drop(SqliteStore::open(&path).unwrap());
    rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .execute_batch("PRAGMA user_version = 99;")
        .unwrap();
    match SqliteStore::open(&path) {
        Err(StoreError::NewerSchema {
            found: 99,
            known: 4,
        }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
}

#[test]
fn unusable_directories_and_files_are_refused_clearly() {
    // The directory is a file.
    let file = dir("notadir");
    std::fs::write(&file, b"x").unwrap();
    let err = SqliteStore::open(&file)
        .err()
        .expect("a file is not a directory");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    // The database is not a database.
    let garbage = dir("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("spans.db"), vec![0x5a; 8192]).unwrap();
    let err = SqliteStore::open(&garbage)
        .err()
        .expect("garbage is refused");
    assert!(
        matches!(&err, StoreError::Open { reason, .. } if reason.contains("not a usable SQLite database")),
        "{err}"
    );
    // Two stores on one directory: the second is refused while the first is open.
    let shared = dir("shared");
    let first = SqliteStore::open(&shared).unwrap();
    let err = SqliteStore::open(&shared).err().expect("in use");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    SqliteStore::open(&shared).unwrap();
}

#[test]
fn concurrent_writers_all_land_durably() {
    let path = dir("concurrent");
    let store = Arc::new(SqliteStore::open_with(&path, &small_runs()).unwrap());
    let t0 = now();
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for b in 0..25u8 {
                    let spans: Vec<SpanRecord> = (0..20u8)
                        .map(|i| {
                            let mut s = span(0, i + 1, None, &format!("svc{t}"), "op", t0, 1);
                            s.trace_id[0] = t;
                            s.trace_id[1] = b;
                            s.trace_id[15] = 1;
                            s
                        })
                        .collect();
                    store.write(&spans).unwrap();
                    // Each write is readable as soon as it returns.
                    let mut id = [0u8; 16];
                    (id[0], id[1], id[15]) = (t, b, 1);
                    assert_eq!(store.trace(&id).unwrap().len(), 20);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(store.stats().unwrap().spans, 4 * 25 * 20);
    assert_eq!(store.services().unwrap().len(), 4);
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.stats().unwrap().spans, 4 * 25 * 20);
    for t in 0..4u8 {
        for b in 0..25u8 {
            let mut id = [0u8; 16];
            (id[0], id[1], id[15]) = (t, b, 1);
            assert_eq!(store.trace(&id).unwrap().len(), 20);
        }
    }
}

const CRASH_CHILD: &str = "TRACER_STORE_CRASH_CHILD";

/// The trace ids of acknowledged batch `b` of writer `t` in the crash test.
fn crash_trace(t: u8, b: u32, k: u8) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = 0xc0 | t;
    id[1..5].copy_from_slice(&b.to_be_bytes());
    id[5] = k;
    id
}

/// Not a test of its own: the process `acknowledged_writes_survive_kill_9` starts and kills.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CRASH_CHILD) else {
        return;
    };
    // Small runs, so the kill also lands in the middle of writing the trace index.
    let options = StoreOptions {
        trace_run_spans: 500,
        ..Default::default()
    };
    let store = Arc::new(SqliteStore::open_with(Path::new(&path), &options).unwrap());
    let t0 = now();
    let writers: Vec<_> = (0..2u8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for b in 0u32.. {
                    // 10 traces of 5 spans.
                    let spans: Vec<SpanRecord> = (0..50u8)
                        .map(|i| {
                            let mut s =
                                span(0, i % 5 + 1, None, "crash", "op", t0 + u64::from(b), 1);
                            s.trace_id = crash_trace(t, b, i / 5);
                            s
                        })
                        .collect();
                    store.write(&spans).unwrap();
                    println!("acked {t} {b}");
                }
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let path = dir("crash");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: Vec<(u8, u32)> = Vec::new();
    let parse = |line: &str| -> Option<(u8, u32)> {
        // The first may follow the harness's "test crash_child ... ".
        let mut w = line[line.find("acked ")? + 6..].split(' ');
        Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
    };
    for line in lines.by_ref() {
        if let Some(a) = parse(&line.unwrap()) {
            acked.push(a);
            if acked.len() == 300 {
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
    }
    // Acknowledgements printed before the kill count too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(a) = parse(&line) {
            acked.push(a);
        }
    }
    child.wait().unwrap();
    assert!(acked.len() >= 300);
    let store = SqliteStore::open(&path).unwrap();
    for (t, b) in &acked {
        for k in 0..10 {
            assert_eq!(
                store.trace(&crash_trace(*t, *b, k)).unwrap().len(),
                5,
                "batch {b} of writer {t} was acknowledged"
            );
        }
    }
    assert!(store.stats().unwrap().spans >= acked.len() as u64 * 50);
    let found = store
        .find_traces(&TraceQuery {
            service: Some("crash".into()),
            limit: 1_000_000,
            ..Default::default()
        })
        .unwrap();
    assert!(found.len() >= acked.len() * 10);
}

/// Operation names come from whoever reaches a traced server: a service keeps at most 1,000
/// distinct ones, and later names share one overflow operation, counted, across a reopen.
#[test]
fn operation_names_per_service_are_capped() {
    let d = dir("op-cap");
    let t = now();
    let batch = |from: usize, to: usize| -> Vec<SpanRecord> {
        (from..to)
            .map(|i| {
                let mut s = span(1, 1, None, "web", &format!("GET /x/{i}/y"), t, 1000);
                s.trace_id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                s
            })
            .collect()
    };
    {
        let store = SqliteStore::open(&d).unwrap();
        store.write(&batch(0, 1100)).unwrap();
        let ops = store.operations("web", None).unwrap();
        assert_eq!(ops.len(), 1001, "1,000 names and the overflow");
        assert!(ops.iter().any(|o| o.name == "(other operations)"));
        assert_eq!(store.operations_overflowed(), 100);
        // Other services keep their own room.
        store
            .write(&[span(9, 9, None, "api", "GET /health", t, 10)])
            .unwrap();
        assert_eq!(store.operations("api", None).unwrap().len(), 1);
    }
    let store = SqliteStore::open(&d).unwrap();
    store.write(&batch(2000, 2010)).unwrap();
    assert_eq!(store.operations("web", None).unwrap().len(), 1001);
    assert_eq!(store.operations_overflowed(), 10);
}

/// `n` spans of 400-byte attributes starting at `start`, in traces numbered from `first`
/// (`[tag; 12] ++ number`).
fn padded(tag: u8, first: u32, n: u32, start: u64) -> Vec<SpanRecord> {
    (first..first + n)
        .map(|i| {
            let mut s = span(tag, 1, None, "svc", "op", start + u64::from(i), 10);
            s.trace_id[12..].copy_from_slice(&i.to_be_bytes());
            s.attributes.push(text("pad", &"x".repeat(400)));
            s
        })
        .collect()
}

fn padded_id(tag: u8, i: u32) -> [u8; 16] {
    let mut t = [tag; 16];
    t[12..].copy_from_slice(&i.to_be_bytes());
    t
}

/// The size limit deletes the spans that arrived first, whatever their start times say: a
/// client dating its spans ahead of the clock once kept them while everyone else's went.
#[test]
fn the_size_limit_evicts_by_arrival_not_by_start_time() {
    let path = dir("by-arrival");
    let store = SqliteStore::open_with(&path, &small_runs()).unwrap();
    let t = now();
    // First the "future" spans (20 h ahead, inside what the collector accepts), then as many
    // real ones.
    for chunk in padded(0xf0, 0, 3000, t + 20 * 3_600_000_000_000).chunks(1000) {
        store.write(chunk).unwrap();
    }
    for chunk in padded(0x0a, 0, 3000, t).chunks(1000) {
        store.write(chunk).unwrap();
    }
    store.write_trace_index_run().unwrap();
    let before = store.stats().unwrap();
    let r = store
        .enforce_retention(&Retention {
            max_age: None,
            max_bytes: Some(before.bytes * 2 / 3),
        })
        .unwrap();
    // Exactly the first to arrive went: every "future" span before any real one.
    let kept = |tag: u8| {
        (0..3000)
            .filter(|i| !store.trace(&padded_id(tag, *i)).unwrap().is_empty())
            .collect::<Vec<u32>>()
    };
    let (future, real) = (kept(0xf0), kept(0x0a));
    let gone = r.deleted_spans as u32;
    assert!(gone >= 2000, "{r:?}");
    if gone <= 3000 {
        assert_eq!(future, (gone..3000).collect::<Vec<_>>());
        assert_eq!(real.len(), 3000);
    } else {
        assert!(future.is_empty());
        assert_eq!(real, (gone - 3000..3000).collect::<Vec<_>>());
    }
}

/// The database file and its write-ahead log together stay within the size limit after a
/// retention pass, even when the spans alone fit and nothing is deleted.
#[test]
fn the_size_limit_counts_the_write_ahead_log() {
    let path = dir("wal-size");
    let store = SqliteStore::open(&path).unwrap();
    for chunk in padded(0x0b, 0, 4000, now()).chunks(500) {
        store.write(chunk).unwrap();
    }
    let on_disk = || {
        let len = |f: &str| std::fs::metadata(path.join(f)).map_or(0, |m| m.len());
        (len("spans.db"), len("spans.db-wal"))
    };
    let used = store.stats().unwrap().bytes;
    // Room for the spans with a tenth to spare, not for their copy in the log as well.
    let cap = used + used / 10;
    let (db, wal) = on_disk();
    assert!(
        db + wal > cap,
        "the test needs a log: {db} + {wal} vs {cap}"
    );
    let r = store
        .enforce_retention(&Retention {
            max_age: None,
            max_bytes: Some(cap),
        })
        .unwrap();
    assert_eq!(r.deleted_spans, 0, "the spans themselves fit");
    let (db, wal) = on_disk();
    assert!(db + wal <= cap, "{db} + {wal} bytes on disk, limit {cap}");
    assert_eq!(store.stats().unwrap().spans, 4000);
    assert_eq!(store.trace(&padded_id(0x0b, 3999)).unwrap().len(), 1);
}

/// Names whose spans retention deleted are dropped: from the list, after a reopen, and from
/// a full service's count, so new names get a place of their own again.
#[test]
fn operations_whose_spans_are_gone_are_pruned() {
    let d = dir("op-prune");
    let old = now() - 3 * 86_400_000_000_000;
    let t = now();
    let named = |from: usize, to: usize, start: u64| -> Vec<SpanRecord> {
        (from..to)
            .map(|i| {
                let mut s = span(2, 1, None, "web", &format!("GET /x/{i}/y"), start, 1000);
                s.trace_id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                s
            })
            .collect()
    };
    let age = Retention {
        max_age: Some(Duration::from_secs(86_400)),
        max_bytes: None,
    };
    {
        let store = SqliteStore::open(&d).unwrap();
        // One name kept fresh, then 999 names and the overflow, all dated three days ago.
        store
            .write(&[span(3, 1, None, "web", "GET /kept", t, 10)])
            .unwrap();
        store.write(&named(0, 1100, old)).unwrap();
        assert_eq!(store.operations("web", None).unwrap().len(), 1001);
        let r = store.enforce_retention(&age).unwrap();
        assert_eq!((r.deleted_spans, r.pruned_operations), (1100, 1000));
        let names: Vec<String> = store
            .operations("web", None)
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, ["GET /kept"]);
        // Room again: new names are names, not the overflow.
        store.write(&named(5000, 5010, t)).unwrap();
        assert_eq!(store.operations("web", None).unwrap().len(), 11);
        let found = store
            .find_traces(&TraceQuery {
                service: Some("web".into()),
                operation: Some("GET /x/5005/y".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(found.len(), 1);
        // A second pass has nothing more to drop.
        assert_eq!(store.enforce_retention(&age).unwrap().pruned_operations, 0);
    }
    let store = SqliteStore::open(&d).unwrap();
    assert_eq!(store.operations("web", None).unwrap().len(), 11);
    // A name seen again after being dropped is a new operation with a count of its own.
    store.write(&named(0, 1, t)).unwrap();
    assert_eq!(store.operations("web", None).unwrap().len(), 12);
    let counts = operation_counts(&d);
    assert_eq!(counts.len(), 12);
    assert!(counts.iter().all(|(_, n)| *n == 1), "{counts:?}");
}

/// Writers and retention at once: batches encoded while their operation is being dropped are
/// encoded again, never stored under a name that is gone.
#[test]
fn pruning_while_writing_loses_no_span_and_no_name() {
    let d = dir("op-prune-race");
    let store = Arc::new(SqliteStore::open(&d).unwrap());
    let old = now() - 3 * 86_400_000_000_000;
    let age = Retention {
        max_age: Some(Duration::from_secs(86_400)),
        max_bytes: None,
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruner = {
        let (store, stop, age) = (store.clone(), stop.clone(), age.clone());
        std::thread::spawn(move || {
            let mut pruned = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pruned += store.enforce_retention(&age).unwrap().pruned_operations;
                // A pass holds the writer for a few ms (checkpoint, fsync): let writes in.
                std::thread::sleep(Duration::from_millis(3));
            }
            pruned
        })
    };
    let writers: Vec<_> = (0..3u8)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                for round in 0..150u32 {
                    // A name first given only to old spans (the pruner drops it once they are
                    // deleted), then to a fresh one, which may have been encoded with the id
                    // being dropped.
                    let name = format!("op {w}/{round}");
                    let at = |k: u8, start: u64| {
                        let mut s = span(w, k, None, "svc", &name, start, 5);
                        s.trace_id[8..12].copy_from_slice(&round.to_be_bytes());
                        s
                    };
                    store
                        .write(&(1..4).map(|k| at(k, old)).collect::<Vec<_>>())
                        .unwrap();
                    let fresh = at(0, now());
                    store.write(std::slice::from_ref(&fresh)).unwrap();
                    kept.push((fresh.trace_id, name.clone()));
                }
                kept
            })
        })
        .collect();
    let kept: Vec<([u8; 16], String)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pruned = pruner.join().unwrap();
    assert!(pruned > 0, "names were dropped while the writers ran");
    // Every fresh span is there under its own name (a span whose operation row is gone would
    // not load at all). Old spans the pruner had not reached yet may share the trace.
    for (trace, name) in &kept {
        let spans = store.trace(trace).unwrap();
        let fresh: Vec<_> = spans.iter().filter(|s| s.span_id == [0; 8]).collect();
        assert_eq!(fresh.len(), 1, "{trace:?}");
        assert_eq!(&fresh[0].operation, name);
    }
    // The stored counts are exact: what the spans table says, for every operation left.
    let c = rusqlite::Connection::open(d.join("spans.db")).unwrap();
    let wrong: i64 = c
        .query_row(
            "SELECT count(*) FROM operations o
             WHERE o.spans != (SELECT count(*) FROM spans s WHERE s.operation_id = o.id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(wrong, 0);
    let orphans: i64 = c
        .query_row(
            "SELECT count(*) FROM spans WHERE operation_id NOT IN (SELECT id FROM operations)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0);
}
