//! `cargo bench -p tracer-store`: ingest throughput of the embedded store next to a baseline run
//! in the same process, then query latency over a store of `BENCH_SPANS` spans (default
//! 1,000,000; built once and reused from `<target>/tmp/bench-store`).
//!
//! The baseline is the simplest durable SQLite ingest: each span serialized as one JSON row into
//! a table without indexes, 1000 rows per transaction, same WAL and `synchronous` settings. The
//! store does more (encodes, interns, maintains five indexes and the trace index), so a ratio
//! above 1 means its layout more than pays for its indexes.
//!
//! Environment: `BENCH_SPANS` (query store size), `BENCH_INGEST_SPANS` (default 200,000),
//! `BENCH_EDGES=0` to leave out the `tracer.tcp.edge` / `tracer.tcp.seq` attributes agents put on
//! every span (indexed by the store for stitching traces across hosts).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tracer_store::{
    kind, status, AttrValue, Durability, KeyValue, SpanRecord, SpanStore, SqliteStore,
    StoreOptions, TraceId, TraceQuery,
};
use tracer_test_support::Rng;

fn s(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: AttrValue::Str(v.into()),
    }
}

fn i(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: AttrValue::Int(v),
    }
}

const SERVICES: u64 = 10;
/// Each service's operations: method, route, share of its spans (%).
const OPS: [(&str, &str, u64); 5] = [
    ("GET", "/api/v1/items", 40),
    ("GET", "/api/v1/items/{id}", 35),
    ("POST", "/api/v1/items", 15),
    ("PUT", "/api/v1/items/{id}", 7),
    ("DELETE", "/api/v1/items/{id}", 3),
];
const PROCESSES: u64 = 20;
/// Simulated arrival rate: 10,000 spans a second of span time.
const SPAN_GAP_NS: u64 = 100_000;
const T0: u64 = 1_795_000_000_000_000_000;

/// 14 resource attributes per process, two processes per service; one resource per process,
/// shared by its spans as ingest shares them.
fn resources() -> Vec<Arc<Vec<KeyValue>>> {
    (0..PROCESSES)
        .map(|p| {
            Arc::new(vec![
                s("service.name", &format!("svc-{}", p % SERVICES)),
                i("process.pid", 1000 + p as i64),
                s("process.executable.name", "nginx"),
                s("process.executable.path", "/usr/sbin/nginx"),
                s("process.command_line", "nginx: worker process"),
                s("process.linux.cgroup", "/system.slice/nginx.service"),
                s("host.name", &format!("host-{}", p % 4)),
                s("host.id", "3d1219c7c4c5404aaa1f6d2a48adfda4"),
                s("host.arch", "amd64"),
                s("os.type", "linux"),
                s("os.version", "6.18.44"),
                i("host.cpu.count", 2),
                i("host.memory.total", 25_276_063_744),
                s("host.ip", "[\"192.0.2.2\"]"),
            ])
        })
        .collect()
}

/// Whether spans carry the agent's edge attributes (`BENCH_EDGES`, default yes).
fn with_edges() -> bool {
    std::env::var("BENCH_EDGES").map_or(true, |v| v != "0")
}

/// HTTP server spans as the agent makes them, 17 attributes each (19 with the edge ones, see
/// [`with_edges`]); traces of 1 to 4 spans, the
/// children in other services (so the service map has edges). Span `k` of the whole sequence
/// starts at `T0 + k * SPAN_GAP_NS`.
fn spans(first: u64, n: usize, rng: &mut Rng, resources: &[Arc<Vec<KeyValue>>]) -> Vec<SpanRecord> {
    let mut out = Vec::with_capacity(n);
    let mut k = first;
    let edges = with_edges();
    while out.len() < n {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&rng.next().to_le_bytes());
        trace_id[8..].copy_from_slice(&rng.next().to_le_bytes());
        let size = match rng.below(10) {
            0..=5 => 1,
            6 | 7 => 2,
            8 => 3,
            _ => 4,
        }
        .min(n - out.len());
        let root_span = rng.next().to_le_bytes();
        let root_process = rng.below(PROCESSES);
        for j in 0..size {
            let process = if j == 0 {
                root_process
            } else {
                (root_process + 1 + rng.below(PROCESSES - 1)) % PROCESSES
            };
            let service = process % SERVICES;
            let mut pick = rng.below(100);
            let (method, route, _) = *OPS
                .iter()
                .find(|(_, _, share)| {
                    let hit = pick < *share;
                    pick = pick.saturating_sub(*share);
                    hit
                })
                .unwrap_or(&OPS[0]);
            let path = route.replace("{id}", &rng.below(100_000).to_string());
            let error = rng.below(50) == 0;
            let spread = rng.below(16);
            let start = T0 + k * SPAN_GAP_NS;
            k += 1;
            let peer = format!("10.0.{}.{}", rng.below(8), rng.below(250));
            let peer_port = 32768 + rng.below(28000) as i64;
            let mut attributes = vec![
                s("http.request.method", method),
                s("url.path", &path),
                s("url.scheme", "http"),
                s("network.protocol.name", "http"),
                s("network.protocol.version", "1.1"),
                s("network.transport", "tcp"),
                s("server.address", "shop.example.com"),
                i("server.port", 8080),
                s("network.peer.address", &peer),
                i("network.peer.port", peer_port),
                s("network.local.address", "10.0.1.5"),
                i("network.local.port", 8080),
                i("http.request.body.size", rng.below(2000) as i64),
                i("http.response.body.size", 200 + rng.below(20_000) as i64),
                s("client.address", "203.0.113.7"),
                s(
                    "user_agent.original",
                    "Mozilla/5.0 (X11; Linux x86_64) curl/7.88.1",
                ),
                i("http.response.status_code", if error { 503 } else { 200 }),
            ];
            if edges {
                let seq = rng.below(1 << 32);
                attributes.push(s(
                    "tracer.tcp.edge",
                    &format!("{peer}:{peer_port}>10.0.1.5:8080#{seq}"),
                ));
                attributes.push(i("tracer.tcp.seq", seq as i64));
            }
            out.push(SpanRecord {
                trace_id,
                span_id: if j == 0 {
                    root_span
                } else {
                    rng.next().to_le_bytes()
                },
                parent_span_id: (j > 0).then_some(root_span),
                service: format!("svc-{service}"),
                operation: format!("{method} {route}"),
                kind: kind::SERVER,
                start_unix_nano: start,
                // 20 µs to ~50 ms, skewed short.
                duration_nano: 20_000 + rng.below(1 << spread) * 1_500,
                status_code: if error { status::ERROR } else { status::UNSET },
                status_message: String::new(),
                attributes,
                resource: resources[process as usize].clone(),
                events: vec![],
                links: vec![],
                scope_name: "tracer".into(),
                scope_version: "0.1.0".into(),
            });
        }
    }
    out
}

fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-store")
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = bench_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating the bench directory");
    d
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Rate {
    wall: f64,
    cpu: f64,
}

/// Spans per wall second and per CPU second (all threads of the process, the store's
/// background thread included) of `f`.
fn measure(n: usize, f: impl FnOnce()) -> Rate {
    let (w0, c0) = (Instant::now(), cpu_time());
    f();
    let (w, c) = (w0.elapsed(), cpu_time() - c0);
    Rate {
        wall: n as f64 / w.as_secs_f64(),
        cpu: n as f64 / c.as_secs_f64(),
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Writes `data` in batches of 512 from `threads` threads, each taking every `threads`-th batch.
fn write_threads(store: &Arc<SqliteStore>, data: &Arc<Vec<SpanRecord>>, threads: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (store, data) = (store.clone(), data.clone());
            std::thread::spawn(move || {
                for chunk in data.chunks(512).skip(t).step_by(threads) {
                    store.write(chunk).expect("write");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
}

fn ingest() {
    let n = env_usize("BENCH_INGEST_SPANS", 200_000);
    let res = resources();
    let data = Arc::new(spans(0, n, &mut Rng(42), &res));
    println!(
        "ingest: {n} HTTP server spans ({} attributes, 14 resource attributes from {PROCESSES} \
         processes, {} service/operation pairs), batches of 512",
        if with_edges() {
            "19 with tracer.tcp.edge/seq"
        } else {
            "17"
        },
        SERVICES * OPS.len() as u64
    );

    // The baseline: one JSON row per span, no index, 1000 per transaction.
    let base_dir = fresh_dir("baseline");
    let mut conn = rusqlite::Connection::open(base_dir.join("b.db")).expect("baseline db");
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE spans(body BLOB);",
    )
    .expect("baseline schema");
    let base = measure(n, || {
        for chunk in data.chunks(1000) {
            let tx = conn.transaction().expect("begin");
            {
                let mut st = tx
                    .prepare_cached("INSERT INTO spans(body) VALUES (?1)")
                    .expect("prepare");
                for sp in chunk {
                    st.execute([serde_json::to_vec(sp).expect("json")])
                        .expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
    });
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    drop(conn);
    let base_bytes = dir_bytes(&base_dir) as f64 / n as f64;
    println!("                                      spans/s   spans/CPU-s   ratio to baseline (wall, CPU)");
    println!(
        "  baseline (JSON rows, no index)    {:>9.0}     {:>9.0}",
        base.wall, base.cpu
    );
    let run = |label: &str, threads: usize, durability: Durability| {
        let d = fresh_dir(&format!("ingest-{threads}-{durability:?}"));
        let store = Arc::new(
            SqliteStore::open_with(
                &d,
                &StoreOptions {
                    durability,
                    ..Default::default()
                },
            )
            .expect("open"),
        );
        let r = measure(n, || write_threads(&store, &data, threads));
        let bytes = store.stats().expect("stats").bytes as f64 / n as f64;
        println!(
            "  {label:<32} {:>9.0}     {:>9.0}        {:>5.2}  {:>5.2}",
            r.wall,
            r.cpu,
            r.wall / base.wall,
            r.cpu / base.cpu
        );
        bytes
    };
    let bytes = run("SqliteStore, 1 writer thread", 1, Durability::ProcessCrash);
    run("SqliteStore, 2 writer threads", 2, Durability::ProcessCrash);
    run("  ... 1 thread, fsync per commit", 1, Durability::PowerLoss);
    println!("  on disk: {bytes:.0} bytes/span (baseline {base_bytes:.0}, without any index)");
}

fn query() {
    let total = env_usize("BENCH_SPANS", 1_000_000);
    let d = bench_dir().join(format!("query-{total}"));
    let marker = d.join("complete");
    let res = resources();
    // Probe trace ids: every 997th span's.
    let probes: Vec<TraceId>;
    if marker.exists() {
        let store = SqliteStore::open(&d).expect("open");
        let stats = store.stats().expect("stats");
        probes = std::fs::read(d.join("probes"))
            .expect("probes")
            .chunks_exact(16)
            .map(|c| c.try_into().expect("16 bytes"))
            .collect();
        println!(
            "query: reusing the store of {} spans in {} ({:.0} MiB)",
            stats.spans,
            d.display(),
            stats.bytes as f64 / 1_048_576.0
        );
    } else {
        let d = fresh_dir(&format!("query-{total}"));
        let store = Arc::new(SqliteStore::open(&d).expect("open"));
        let mut rng = Rng(7);
        let mut written = 0usize;
        let mut ids = Vec::new();
        let (t, c0) = (Instant::now(), cpu_time());
        let mut gen = Duration::ZERO;
        let mut last_report = Instant::now();
        while written < total {
            let g = Instant::now();
            let batch = Arc::new(spans(
                written as u64,
                100_000.min(total - written),
                &mut rng,
                &res,
            ));
            gen += g.elapsed();
            ids.extend(batch.iter().step_by(997).flat_map(|s| s.trace_id));
            write_threads(&store, &batch, 2);
            written += batch.len();
            if last_report.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "  ... {written} spans, {:.0} spans/s",
                    written as f64 / (t.elapsed() - gen).as_secs_f64()
                );
                last_report = Instant::now();
            }
        }
        let wall = t.elapsed() - gen;
        let cpu = cpu_time() - c0;
        std::fs::write(d.join("probes"), &ids).expect("probes");
        std::fs::write(&marker, total.to_string()).expect("marker");
        let stats = store.stats().expect("stats");
        println!(
            "query: built a store of {} spans ({:.0} MiB, {:.0} bytes/span) at {:.0} spans/s, \
             {:.0} spans/CPU-s (2 writer threads, span generation excluded from wall time)",
            stats.spans,
            stats.bytes as f64 / 1_048_576.0,
            stats.bytes as f64 / stats.spans.max(1) as f64,
            written as f64 / wall.as_secs_f64(),
            written as f64 / cpu.as_secs_f64(),
        );
        probes = ids
            .chunks_exact(16)
            .map(|c| c.try_into().expect("16"))
            .collect();
    }
    let store = SqliteStore::open(&d).expect("open");
    let end = T0 + total as u64 * SPAN_GAP_NS;
    let minute = 60_000_000_000u64;
    let time = |f: &mut dyn FnMut(usize)| -> Vec<Duration> {
        (0..100)
            .map(|k| {
                let t = Instant::now();
                f(k);
                t.elapsed()
            })
            .collect()
    };
    let report = |label: &str, v: Vec<Duration>| {
        println!(
            "  {label:<44} median {:>9.1?}  p99 {:>9.1?}",
            pct(&v, 0.5),
            pct(&v, 0.99)
        );
    };
    println!("  (100 runs each; the page cache is warm from building or a previous run)");
    report(
        "trace by id",
        time(&mut |k| {
            let id = probes[k * 7919 % probes.len()];
            assert!(!store.trace(&id).expect("trace").is_empty());
        }),
    );
    let search = |k: usize, from: u64, to: u64, f: &dyn Fn(&mut TraceQuery)| {
        let mut q = TraceQuery {
            service: Some(format!("svc-{}", k as u64 % SERVICES)),
            start_unix_nano: Some(from),
            end_unix_nano: Some(to),
            limit: 20,
            ..Default::default()
        };
        f(&mut q);
        store.find_traces(&q).expect("search").len()
    };
    report(
        "service, last minute, limit 20",
        time(&mut |k| assert_eq!(search(k, end - minute, end, &|_| {}), 20)),
    );
    report(
        "service, oldest minute, limit 20",
        time(&mut |k| assert_eq!(search(k, T0, T0 + minute, &|_| {}), 20)),
    );
    report(
        "service + operation (3% of its spans), last hour",
        time(&mut |k| {
            search(k, end.saturating_sub(60 * minute), end, &|q| {
                q.operation = Some("DELETE /api/v1/items/{id}".into());
            });
        }),
    );
    report(
        "service + status=503 (tag index), last hour",
        time(&mut |k| {
            search(k, end.saturating_sub(60 * minute), end, &|q| {
                q.tags = vec![("http.response.status_code".into(), "503".into())];
            });
        }),
    );
    report(
        "service + duration > 40 ms, last hour",
        time(&mut |k| {
            search(k, end.saturating_sub(60 * minute), end, &|q| {
                q.min_duration_nano = Some(40_000_000);
            });
        }),
    );
    report(
        "service + peer address (decoded), last hour",
        time(&mut |k| {
            search(k, end.saturating_sub(60 * minute), end, &|q| {
                q.tags = vec![("network.peer.address".into(), format!("10.0.3.{}", k % 250))];
            });
        }),
    );
    let mut deps = Vec::new();
    let mut edges = 0;
    for _ in 0..10 {
        let t = Instant::now();
        edges = store.dependencies(end, minute).expect("dependencies").len();
        deps.push(t.elapsed());
    }
    println!(
        "  {:<44} median {:>9.1?}  ({edges} edges, 10 runs)",
        "service map, last minute (600,000 spans)",
        pct(&deps, 0.5)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument runs just that part.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if only.as_deref().is_none_or(|o| "ingest".contains(o)) {
        ingest();
    }
    if only.as_deref().is_none_or(|o| "query".contains(o)) {
        query();
    }
}
