//! `cargo bench -p tracer-store`: ingest throughput into the embedded store, next to a baseline
//! run in the same process (plain SQLite inserts of the same spans as JSON rows, no indexes), and
//! query latency over a store of `BENCH_SPANS` spans (default 1,000,000).
use std::time::{Duration, Instant};

use rusqlite::params;
use tracer_store::{kind, AttrValue, KeyValue, SpanRecord, SpanStore, SqliteStore, TraceQuery};

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

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

/// HTTP server spans as the agent makes them: 17 attributes, one of 20 processes' resources.
fn spans(n: usize, rng: &mut Rng, t0: u64) -> Vec<SpanRecord> {
    let resources: Vec<Vec<KeyValue>> = (0..20)
        .map(|p| {
            vec![
                s("service.name", &format!("svc-{}", p % 10)),
                i("process.pid", 1000 + p),
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
            ]
        })
        .collect();
    (0..n)
        .map(|k| {
            let r = rng.next();
            let p = (r % 20) as usize;
            let op = (r >> 8) % 5;
            let mut trace_id = [0u8; 16];
            trace_id[..8].copy_from_slice(&rng.next().to_le_bytes());
            trace_id[8..].copy_from_slice(&rng.next().to_le_bytes());
            SpanRecord {
                trace_id,
                span_id: rng.next().to_le_bytes(),
                parent_span_id: r.is_multiple_of(3).then(|| rng.next().to_le_bytes()),
                service: format!("svc-{}", p % 10),
                operation: format!("GET /api/v1/items/{op}"),
                kind: kind::SERVER,
                start_unix_nano: t0 + k as u64 * 1000,
                duration_nano: 20_000 + (r >> 20) % 5_000_000,
                status_code: if r.is_multiple_of(50) { 2 } else { 0 },
                status_message: String::new(),
                attributes: vec![
                    s("http.request.method", "GET"),
                    s("url.path", &format!("/api/v1/items/{}", r % 1000)),
                    s("url.scheme", "http"),
                    s("network.protocol.name", "http"),
                    s("network.protocol.version", "1.1"),
                    s("network.transport", "tcp"),
                    s("server.address", "shop.example.com"),
                    i("server.port", 8080),
                    s("network.peer.address", "10.0.3.17"),
                    i("network.peer.port", 40000 + (r % 20000) as i64),
                    s("network.local.address", "10.0.1.5"),
                    i("network.local.port", 8080),
                    i("http.request.size", 180),
                    i("http.response.size", 1400),
                    s("client.address", "10.0.3.17"),
                    s(
                        "user_agent.original",
                        "Mozilla/5.0 (X11; Linux x86_64) curl/7.88.1",
                    ),
                    i(
                        "http.response.status_code",
                        if r.is_multiple_of(50) { 503 } else { 200 },
                    ),
                ],
                resource: resources[p].clone(),
                events: vec![],
                links: vec![],
                scope_name: "tracer".into(),
                scope_version: "0.1.0".into(),
            }
        })
        .collect()
}

fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-store")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Returns (spans per wall second, spans per CPU second).
fn measure(n: usize, f: impl FnOnce()) -> (f64, f64) {
    let (w0, c0) = (Instant::now(), cpu_time());
    f();
    let (w, c) = (w0.elapsed(), cpu_time() - c0);
    (n as f64 / w.as_secs_f64(), n as f64 / c.as_secs_f64())
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn main() {
    let t0 = 1_795_000_000_000_000_000u64;
    let n = 200_000;
    let data = spans(n, &mut Rng(42), t0);

    // Baseline: the same spans as JSON rows in an unindexed table, 1000 per transaction.
    let base = dir("baseline");
    let conn = rusqlite::Connection::open(base.join("b.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE t(body TEXT);",
    )
    .unwrap();
    let mut conn = conn;
    let (base_wall, base_cpu) = measure(n, || {
        for chunk in data.chunks(1000) {
            let tx = conn.transaction().unwrap();
            {
                let mut st = tx
                    .prepare_cached("INSERT INTO t(body) VALUES (?1)")
                    .unwrap();
                for sp in chunk {
                    st.execute(params![serde_json::to_string(sp).unwrap()])
                        .unwrap();
                }
            }
            tx.commit().unwrap();
        }
    });

    let store = SqliteStore::open(&dir("ingest")).unwrap();
    let (wall, cpu) = measure(n, || {
        for chunk in data.chunks(512) {
            store.write(chunk).unwrap();
        }
    });
    println!("ingest, {n} realistic HTTP spans, batches of 512, 1 writer:");
    println!(
        "  baseline (JSON rows, no indexes)  {base_wall:>9.0} spans/s  {base_cpu:>9.0} spans/CPU-s"
    );
    println!("  tracer-store                      {wall:>9.0} spans/s  {cpu:>9.0} spans/CPU-s   ratio to baseline {:.2}", cpu / base_cpu);

    // Query latency over a large store.
    let total: usize = std::env::var("BENCH_SPANS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let qdir = dir("query");
    let store = SqliteStore::open(&qdir).unwrap();
    let mut rng = Rng(7);
    let mut written = 0;
    let mut probe_ids = Vec::new();
    let fill = Instant::now();
    while written < total {
        let batch = spans(
            50_000.min(total - written),
            &mut rng,
            t0 + written as u64 * 1000,
        );
        probe_ids.extend(batch.iter().step_by(5_000).map(|s| s.trace_id));
        for chunk in batch.chunks(512) {
            store.write(chunk).unwrap();
        }
        written += batch.len();
    }
    let stats = store.stats().unwrap();
    println!(
        "query store: {} spans, {:.0} MiB, filled in {:.0?}",
        stats.spans,
        stats.bytes as f64 / 1048576.0,
        fill.elapsed()
    );
    let mut by_id = Vec::new();
    for k in 0..100 {
        let id = probe_ids[k * 7919 % probe_ids.len()];
        let t = Instant::now();
        assert!(!store.trace(&id).unwrap().is_empty());
        by_id.push(t.elapsed());
    }
    let end = t0 + total as u64 * 1000;
    let mut search = Vec::new();
    for k in 0..100 {
        let q = TraceQuery {
            service: Some(format!("svc-{}", k % 10)),
            start_unix_nano: Some(end - 600_000_000_000 / 10),
            end_unix_nano: Some(end),
            limit: 20,
            ..Default::default()
        };
        let t = Instant::now();
        let found = store.find_traces(&q).unwrap();
        search.push(t.elapsed());
        assert_eq!(found.len(), 20);
    }
    let mut tagged = Vec::new();
    for k in 0..20 {
        let q = TraceQuery {
            service: Some(format!("svc-{}", k % 10)),
            tags: vec![("http.response.status_code".into(), "503".into())],
            start_unix_nano: Some(end - 600_000_000_000 / 10),
            end_unix_nano: Some(end),
            limit: 20,
            ..Default::default()
        };
        let t = Instant::now();
        store.find_traces(&q).unwrap();
        tagged.push(t.elapsed());
    }
    println!(
        "  trace by id                       median {:>8.2?}  p99 {:>8.2?}",
        pct(by_id.clone(), 0.5),
        pct(by_id, 0.99)
    );
    println!(
        "  service + last minute, limit 20   median {:>8.2?}  p99 {:>8.2?}",
        pct(search.clone(), 0.5),
        pct(search, 0.99)
    );
    println!(
        "  ... + tag status=503              median {:>8.2?}  p99 {:>8.2?}",
        pct(tagged.clone(), 0.5),
        pct(tagged, 0.99)
    );
}
