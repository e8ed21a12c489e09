//! The SQLite store against real database files: round trips, trace assembly across writes,
//! searches, the service map, retention, migrations and concurrent writers.
use std::{path::PathBuf, sync::Arc, time::Duration};

use tracer_store::{
    kind, status, AttrValue, KeyValue, Retention, SpanEvent, SpanRecord, SpanStore, SqliteStore,
    StoreError, TraceQuery,
};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tracer-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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
            kv("http.request.method", AttrValue::Str("GET".into())),
            kv("http.response.status_code", AttrValue::Int(200)),
        ],
        resource: vec![
            kv("service.name", AttrValue::Str(service.into())),
            kv("host.name", AttrValue::Str("h1".into())),
        ],
        events: vec![],
        links: vec![],
        scope_name: "scope".into(),
        scope_version: "1".into(),
    }
}

#[test]
fn every_field_round_trips_and_traces_assemble_across_writes() {
    let store = SqliteStore::open(&dir("roundtrip")).unwrap();
    let t0 = now();
    let mut root = span(1, 1, None, "web", "GET /", t0, 1000);
    root.status_code = status::ERROR;
    root.status_message = "boom".into();
    root.attributes.push(kv("ratio", AttrValue::Float(0.5)));
    root.attributes.push(kv("ok", AttrValue::Bool(false)));
    root.attributes
        .push(kv("list", AttrValue::Json("[1,2]".into())));
    root.events.push(SpanEvent {
        time_unix_nano: t0 + 5,
        name: "exception".into(),
        attributes: vec![kv("x", AttrValue::Int(1))],
    });
    let child = span(1, 2, Some(1), "api", "POST /x", t0 + 10, 500);
    let grandchild = span(1, 3, Some(2), "db", "SELECT", t0 + 20, 100);
    // Three writes, children first.
    store.write(std::slice::from_ref(&grandchild)).unwrap();
    store.write(std::slice::from_ref(&child)).unwrap();
    store.write(std::slice::from_ref(&root)).unwrap();
    let got = store.trace(&[1; 16]).unwrap();
    assert_eq!(got, vec![root.clone(), child.clone(), grandchild.clone()]);
    assert!(store.trace(&[9; 16]).unwrap().is_empty());
    assert_eq!(store.services().unwrap(), ["api", "db", "web"]);
    let ops = store.operations("web", None).unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!((ops[0].name.as_str(), ops[0].kind), ("GET /", kind::SERVER));
    assert!(store
        .operations("web", Some(kind::CLIENT))
        .unwrap()
        .is_empty());

    // The service map: web -> api (error-free child), api -> db.
    let deps = store.dependencies(t0 + 1_000_000, 10_000_000).unwrap();
    let edges: Vec<(&str, &str, u64)> = deps
        .iter()
        .map(|d| (d.parent.as_str(), d.child.as_str(), d.call_count))
        .collect();
    assert_eq!(edges, [("api", "db", 1), ("web", "api", 1)]);
    assert_eq!(deps[1].avg_duration_nano, 500);

    // Reopening keeps everything.
    drop(store);
    let store = SqliteStore::open(&dir_keep("roundtrip")).unwrap();
    assert_eq!(store.trace(&[1; 16]).unwrap().len(), 3);
}

/// The same directory as `dir(name)` without wiping it.
fn dir_keep(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tracer-store-{name}-{}", std::process::id()))
}

#[test]
fn searches_filter_by_service_operation_tags_duration_and_window() {
    let store = SqliteStore::open(&dir("search")).unwrap();
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
        if i == 7 {
            s.attributes[1] = kv("http.response.status_code", AttrValue::Int(503));
            s.status_code = status::ERROR;
        }
        batch.push(s);
    }
    store.write(&batch).unwrap();
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
    assert_eq!(q(&|q| q.service = Some("odd".into())).len(), 25);
    // Most recent first.
    assert_eq!(q(&|q| q.service = Some("even".into()))[..3], [48, 46, 44]);
    assert_eq!(
        q(&|q| {
            q.service = Some("even".into());
            q.operation = Some("GET /five".into())
        }),
        [40, 30, 20, 10, 0]
    );
    assert_eq!(
        q(&|q| q.tags = vec![("http.response.status_code".into(), "503".into())]),
        [7]
    );
    assert_eq!(q(&|q| q.tags = vec![("error".into(), "true".into())]), [7]);
    assert_eq!(
        q(&|q| q.tags = vec![
            ("host.name".into(), "h1".into()),
            ("http.request.method".into(), "GET".into())
        ])
        .len(),
        50
    );
    assert!(q(&|q| q.tags = vec![("host.name".into(), "h2".into())]).is_empty());
    assert_eq!(
        q(&|q| {
            q.min_duration_nano = Some(45_000);
            q.max_duration_nano = Some(47_000)
        }),
        [47, 46, 45]
    );
    assert_eq!(
        q(&|q| {
            q.start_unix_nano = Some(t0 + 10_000_000);
            q.end_unix_nano = Some(t0 + 12_000_000)
        }),
        [12, 11, 10]
    );
    assert_eq!(q(&|q| q.limit = 2), [49, 48]);
    assert!(q(&|q| q.service = Some("nobody".into())).is_empty());
}

#[test]
fn retention_deletes_by_age_and_shrinks_by_size() {
    let path = dir("retention");
    let store = SqliteStore::open(&path).unwrap();
    let old = now() - 3 * 86_400_000_000_000;
    let fresh = now();
    let mut batch = Vec::new();
    for i in 0..200u8 {
        batch.push(span(
            i,
            1,
            None,
            "svc",
            "op",
            if i < 100 { old } else { fresh },
            10,
        ));
    }
    store.write(&batch).unwrap();
    let r = store
        .enforce_retention(&Retention {
            max_age: Some(Duration::from_secs(86_400)),
            max_bytes: None,
        })
        .unwrap();
    assert_eq!(r.deleted_spans, 100);
    assert!(store.trace(&[5; 16]).unwrap().is_empty());
    assert_eq!(store.trace(&[150; 16]).unwrap().len(), 1);

    // Size: fill with bigger spans, then cap well below.
    let mut big = Vec::new();
    for i in 0..5000u32 {
        let mut s = span(0, 0, None, "svc", "op", fresh + u64::from(i), 10);
        s.trace_id[..4].copy_from_slice(&i.to_be_bytes());
        s.trace_id[15] = 0xbb;
        s.span_id = [1; 8];
        s.attributes
            .push(kv("pad", AttrValue::Str("x".repeat(400))));
        big.push(s);
    }
    store.write(&big).unwrap();
    let before = store.stats().unwrap();
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
    let file = std::fs::metadata(path.join("spans.db")).unwrap().len();
    assert!(file <= before.bytes, "the file shrinks too: {file} bytes");
}

#[test]
fn a_store_from_a_newer_version_is_refused() {
    let path = dir("newer");
    drop(SqliteStore::open(&path).unwrap());
    let status = std::process::Command::new("sqlite3")
        .arg(path.join("spans.db"))
        .arg("PRAGMA user_version = 99;")
        .status()
        .expect("sqlite3 CLI (scripts/setup.sh)");
    assert!(status.success());
    match SqliteStore::open(&path) {
        Err(StoreError::NewerSchema { found: 99, .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
}

#[test]
fn concurrent_writers_all_land() {
    let store = Arc::new(SqliteStore::open(&dir("concurrent")).unwrap());
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
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(store.stats().unwrap().spans, 4 * 25 * 20);
    assert_eq!(store.services().unwrap().len(), 4);
}
