//! The edge index against real database files: the two ends of a TCP request (`tracer.tcp.edge`,
//! `tracer.tcp.seq`) are found from either side across traces, writes and reopens; retention
//! removes their entries; a version-2 store gets its spans indexed on upgrade; the service map
//! counts stitched CLIENT -> SERVER pairs.
use std::{path::PathBuf, sync::Arc};

use tracer_store::{
    kind, status, AttrValue, EdgeKey, KeyValue, Retention, SpanRecord, SpanStore, SqliteStore,
    StoreOptions, EDGE_ATTR, SEQ_ATTR,
};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tracer-store-edges-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn text(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: AttrValue::Str(v.into()),
    }
}

/// An agent span of `kind` of `service` on `host`, carrying `edge` (and its seq).
fn end(
    trace: u8,
    id: u8,
    parent: Option<u8>,
    kind: i32,
    (service, host): (&str, &str),
    edge: Option<&str>,
    start: u64,
) -> SpanRecord {
    let mut attributes = vec![text("http.request.method", "GET"), text("url.path", "/x")];
    if let Some(e) = edge {
        attributes.push(text(EDGE_ATTR, e));
        let seq: i64 = e.rsplit('#').next().unwrap().parse().unwrap();
        attributes.push(KeyValue {
            key: SEQ_ATTR.into(),
            value: AttrValue::Int(seq),
        });
    }
    SpanRecord {
        trace_id: [trace; 16],
        span_id: [id; 8],
        parent_span_id: parent.map(|p| [p; 8]),
        service: service.into(),
        operation: "GET /x".into(),
        kind,
        start_unix_nano: start,
        duration_nano: 1_000_000,
        status_code: status::UNSET,
        status_message: String::new(),
        attributes,
        resource: Arc::new(vec![
            text("service.name", service),
            text("host.name", host),
            text("host.id", host),
        ]),
        events: vec![],
        links: vec![],
        scope_name: "tracer".into(),
        scope_version: String::new(),
    }
}

const E1: &str = "10.200.0.1:40312>10.200.0.2:8080#2718281828";
const E2: &str = "10.200.0.1:40312>10.200.0.2:8080#2718281906";

fn ids(spans: &[SpanRecord]) -> Vec<([u8; 16], [u8; 8])> {
    let mut v: Vec<_> = spans.iter().map(|s| (s.trace_id, s.span_id)).collect();
    v.sort();
    v
}

fn edge_rows(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM edge_index", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn both_ends_are_found_from_either_side_across_writes_and_reopens() {
    let path = dir("lookup");
    let t0 = now();
    {
        let store = SqliteStore::open_with(
            &path,
            &StoreOptions {
                trace_run_spans: 2,
                ..Default::default()
            },
        )
        .unwrap();
        // The server half first, in its own batch; the client's in a later one.
        store
            .write(&[end(
                2,
                20,
                None,
                kind::SERVER,
                ("api", "b"),
                Some(E1),
                t0 + 50_000_000,
            )])
            .unwrap();
        store.write_trace_index_run().unwrap();
        store
            .write(&[
                end(1, 10, None, kind::CLIENT, ("web", "a"), Some(E1), t0),
                // The next request on the same connection: another seq.
                end(
                    1,
                    11,
                    None,
                    kind::CLIENT,
                    ("web", "a"),
                    Some(E2),
                    t0 + 2_000_000,
                ),
                // An internal span never is an end, whatever it carries.
                end(1, 12, Some(10), kind::INTERNAL, ("web", "a"), Some(E1), t0),
            ])
            .unwrap();
        let from_client = store.edge_spans(EdgeKey::Exact(E1), t0).unwrap();
        let from_server = store
            .edge_spans(EdgeKey::Exact(E1), t0 + 50_000_000)
            .unwrap();
        assert_eq!(
            ids(&from_client),
            vec![([1; 16], [10; 8]), ([2; 16], [20; 8])]
        );
        assert_eq!(ids(&from_client), ids(&from_server));
        // Whole records, with their own trace ids.
        let server = from_client.iter().find(|s| s.kind == kind::SERVER).unwrap();
        assert_eq!((server.service.as_str(), server.trace_id), ("api", [2; 16]));
        assert_eq!(
            ids(&store.edge_spans(EdgeKey::Exact(E2), t0).unwrap()),
            vec![([1; 16], [11; 8])]
        );
        // The sequence number alone (the NAT fallback) finds the same two, and a span of
        // the same seq seen through other addresses, which the exact key does not.
        let natted = "10.9.9.9:1234>10.200.0.2:8080#2718281828";
        store
            .write(&[end(
                5,
                50,
                None,
                kind::SERVER,
                ("api", "b"),
                Some(natted),
                t0 + 1000,
            )])
            .unwrap();
        assert_eq!(
            ids(&store.edge_spans(EdgeKey::Seq(2_718_281_828), t0).unwrap()),
            vec![([1; 16], [10; 8]), ([2; 16], [20; 8]), ([5; 16], [50; 8])]
        );
        assert_eq!(
            ids(&store.edge_spans(EdgeKey::Exact(E1), t0).unwrap()),
            ids(&from_client)
        );
        // Far outside the clock tolerance, nothing.
        assert!(store
            .edge_spans(EdgeKey::Exact(E1), t0 + 60_000_000_000)
            .unwrap()
            .is_empty());
        assert!(store
            .edge_spans(EdgeKey::Exact("10.0.0.9:1>10.0.0.8:2#3"), t0)
            .unwrap()
            .is_empty());
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        ids(&store.edge_spans(EdgeKey::Exact(E1), t0).unwrap()),
        vec![([1; 16], [10; 8]), ([2; 16], [20; 8])]
    );
    // One entry for each of the four ends (the internal span is none).
    drop(store);
    assert_eq!(edge_rows(&path), 4);
}

#[test]
fn retention_removes_the_edge_entries_of_deleted_spans() {
    let path = dir("retention");
    let store = SqliteStore::open(&path).unwrap();
    let old = now() - 3_600_000_000_000;
    store
        .write(&[
            end(1, 10, None, kind::CLIENT, ("web", "a"), Some(E1), old),
            end(
                2,
                20,
                None,
                kind::SERVER,
                ("api", "b"),
                Some(E1),
                old + 1000,
            ),
        ])
        .unwrap();
    let fresh = now();
    store
        .write(&[end(
            3,
            30,
            None,
            kind::CLIENT,
            ("web", "a"),
            Some(E2),
            fresh,
        )])
        .unwrap();
    assert_eq!(edge_rows(&path), 3);
    let report = store
        .enforce_retention(&Retention {
            max_age: Some(std::time::Duration::from_secs(60)),
            max_bytes: None,
        })
        .unwrap();
    assert_eq!(report.deleted_spans, 2);
    assert_eq!(edge_rows(&path), 1);
    assert!(store
        .edge_spans(EdgeKey::Exact(E1), old)
        .unwrap()
        .is_empty());
    assert_eq!(
        store.edge_spans(EdgeKey::Exact(E2), fresh).unwrap().len(),
        1
    );
}

#[test]
fn a_version_2_store_gets_its_spans_edges_indexed() {
    let path = dir("v2");
    let t0 = now();
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .write(&[
                end(1, 10, None, kind::CLIENT, ("web", "a"), Some(E1), t0),
                end(2, 20, None, kind::SERVER, ("api", "b"), Some(E1), t0 + 1000),
                end(2, 21, Some(20), kind::CLIENT, ("api", "b"), None, t0 + 2000),
            ])
            .unwrap();
    }
    // Version 3 is version 2 plus the edge index, and version 4 adds the operations' span
    // counts: taking both away gives the exact layout a version-2 build wrote.
    rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .execute_batch(
            "DROP TABLE edge_index; ALTER TABLE operations DROP COLUMN spans;
             PRAGMA user_version = 2;",
        )
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let version: u32 = rusqlite::Connection::open(path.join("spans.db"))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    assert_eq!(
        ids(&store.edge_spans(EdgeKey::Exact(E1), t0).unwrap()),
        vec![([1; 16], [10; 8]), ([2; 16], [20; 8])]
    );
    assert_eq!(edge_rows(&path), 2);
    // New writes are indexed as before.
    store
        .write(&[end(3, 30, None, kind::CLIENT, ("web", "a"), Some(E2), t0)])
        .unwrap();
    assert_eq!(store.edge_spans(EdgeKey::Exact(E2), t0).unwrap().len(), 1);
}

#[test]
fn the_service_map_counts_stitched_pairs_and_not_forwarded_parents() {
    let path = dir("deps");
    let store = SqliteStore::open(&path).unwrap();
    let t0 = now() - 10_000_000_000;
    let e = |n: u32| format!("10.200.0.1:4000>10.200.0.2:80#{n}");
    store
        .write(&[
            // web (host a) calls api (host b): separate traces, no parent on the server.
            end(1, 10, None, kind::CLIENT, ("web", "a"), Some(&e(1)), t0),
            end(
                2,
                20,
                None,
                kind::SERVER,
                ("api", "b"),
                Some(&e(1)),
                t0 + 1000,
            ),
            // A caller's traceparent forwarded by web: api's SERVER span was stored as a
            // child of the caller's span, but its CLIENT span is web's.
            end(3, 30, None, kind::CLIENT, ("caller", "c"), None, t0),
            end(3, 31, Some(30), kind::SERVER, ("web", "a"), None, t0 + 10),
            end(
                3,
                32,
                Some(31),
                kind::CLIENT,
                ("web", "a"),
                Some(&e(2)),
                t0 + 20,
            ),
            end(
                3,
                33,
                Some(30),
                kind::SERVER,
                ("api", "b"),
                Some(&e(2)),
                t0 + 30,
            ),
            // A key carried by two SERVER spans: no edge from it.
            end(4, 40, None, kind::CLIENT, ("web", "a"), Some(&e(3)), t0),
            end(5, 50, None, kind::SERVER, ("db", "d"), Some(&e(3)), t0 + 5),
            end(6, 60, None, kind::SERVER, ("db", "e"), Some(&e(3)), t0 + 6),
        ])
        .unwrap();
    let deps = store.dependencies(now(), 60_000_000_000).unwrap();
    let got: Vec<(&str, &str, u64)> = deps
        .iter()
        .map(|d| (d.parent.as_str(), d.child.as_str(), d.call_count))
        .collect();
    assert_eq!(got, vec![("caller", "web", 1), ("web", "api", 2)]);
}
