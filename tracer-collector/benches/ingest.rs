//! `cargo bench -p tracer-collector`: CPU per span of the collector's OTLP/HTTP protobuf ingest,
//! the `prost` path (decode into `ExportTraceServiceRequest`, then `convert`) side by side with
//! the direct decoder (`decode.rs`) on the same bodies, then the whole path into a fresh
//! `SqliteStore`.
//!
//! Bodies are what the agent sends: 512 spans a request, grouped by process (one
//! `ResourceSpans` each, 14 resource attributes, `host.ip` an array), one scope; HTTP server
//! spans with 17 attributes and client spans with 16, as `tracer-user/src/spans.rs` makes
//! them. Figures are CPU time (the calling thread's for decoding; the whole process's, the
//! store's background thread included, for the store), median of the rounds, paths
//! alternating within a round so that noise from other work on the machine hits both.
//!
//! Environment: `BENCH_REQUESTS` (distinct bodies for decoding, default 40), `BENCH_ROUNDS`
//! (default 7), `BENCH_STORE_SPANS` (spans per store run, default 102,400; 0 skips it),
//! `BENCH_STORE_ROUNDS` (default 3).
//!
//! `cargo bench -p tracer-collector -- http` measures the collector as deployed instead: the
//! `tracer-collector` binary in a process of its own, sent the same bodies over one keep-alive
//! HTTP/1.1 connection the way the agent sends them (one request at a time), its CPU read from
//! `/proc/<pid>/stat`; see [`http`] for its settings.
//!
//! `cargo bench -p tracer-collector -- stitch` measures reading a trace stitched across hosts
//! against reading one stored trace; see [`stitching`].
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, AnyValue, ArrayValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prost::Message as _;
use tracer_collector::{convert, decode, stitch};
use tracer_store::{SpanRecord, SpanStore, SqliteStore, TraceQuery};
use tracer_test_support::Rng;

/// The collector's allocator, so allocation costs are the ones it pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SPANS_PER_REQUEST: usize = 512;
const PROCESSES: u64 = 20;
/// Processes one agent's request carries spans of (one host's nginx workers and upstreams).
const PROCESSES_PER_REQUEST: u64 = 4;
const T0: u64 = 1_795_000_000_000_000_000;

fn s(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        key_strindex: 0,
    }
}

fn i(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(v)),
        }),
        key_strindex: 0,
    }
}

/// 14 attributes, as `tracer-user/src/resource.rs` reports a process on a host.
fn resource(p: u64) -> Resource {
    let mut attrs = vec![
        s("service.name", &format!("svc-{}", p % 10)),
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
    ];
    attrs.push(KeyValue {
        key: "host.ip".into(),
        value: Some(AnyValue {
            value: Some(Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(Value::StringValue("192.0.2.2".into())),
                }],
            })),
        }),
        key_strindex: 0,
    });
    Resource {
        attributes: attrs,
        ..Default::default()
    }
}

const ROUTES: [(&str, &str); 5] = [
    ("GET", "/api/v1/items"),
    ("GET", "/api/v1/items/{id}"),
    ("POST", "/api/v1/items"),
    ("PUT", "/api/v1/items/{id}"),
    ("DELETE", "/api/v1/items/{id}"),
];

/// An HTTP span as the agent makes it: server spans 17 attributes, client spans 16.
fn span(rng: &mut Rng, k: u64, server: bool, trace_id: [u8; 16], parent: Option<[u8; 8]>) -> Span {
    let (method, route) = ROUTES[rng.below(ROUTES.len() as u64) as usize];
    let path = route.replace("{id}", &rng.below(100_000).to_string());
    let error = rng.below(50) == 0;
    let code = if error { 503 } else { 200 };
    let peer = format!("10.0.{}.{}", rng.below(8), rng.below(250));
    let start = T0 + k * 100_000;
    let spread = rng.below(16);
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
        i("network.peer.port", 32768 + rng.below(28000) as i64),
        s("network.local.address", "10.0.1.5"),
        i("network.local.port", 8080),
        i("http.request.size", rng.below(2000) as i64),
        i("http.response.size", 200 + rng.below(20_000) as i64),
    ];
    if server {
        attributes.push(s("client.address", &peer));
    }
    attributes.push(s(
        "user_agent.original",
        "Mozilla/5.0 (X11; Linux x86_64) curl/7.88.1",
    ));
    attributes.push(i("http.response.status_code", code));
    Span {
        trace_id: trace_id.to_vec(),
        span_id: rng.next().to_le_bytes().to_vec(),
        parent_span_id: parent.map_or_else(Vec::new, |p| p.to_vec()),
        name: format!("{method} {route}"),
        kind: if server {
            SpanKind::Server
        } else {
            SpanKind::Client
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 20_000 + rng.below(1 << spread) * 1_500,
        attributes,
        status: error.then(|| Status {
            message: String::new(),
            code: StatusCode::Error as i32,
        }),
        ..Default::default()
    }
}

/// `n` requests of 512 spans: server spans, a third with a client span as their parent.
fn requests(n: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    requests_from(n, rng, 0)
}

/// The same, the first span starting `first` span gaps after `T0`.
fn requests_from(n: usize, rng: &mut Rng, first: u64) -> Vec<Vec<u8>> {
    let mut k = first;
    (0..n)
        .map(|_| {
            let first_process = rng.below(PROCESSES);
            let mut groups: Vec<Vec<Span>> = vec![Vec::new(); PROCESSES_PER_REQUEST as usize];
            let mut count = 0;
            while count < SPANS_PER_REQUEST {
                let mut trace_id = [0u8; 16];
                trace_id[..8].copy_from_slice(&rng.next().to_le_bytes());
                trace_id[8..].copy_from_slice(&rng.next().to_le_bytes());
                let g = rng.below(PROCESSES_PER_REQUEST) as usize;
                if rng.below(3) == 0 && count + 2 <= SPANS_PER_REQUEST {
                    let client = span(rng, k, false, trace_id, None);
                    let parent: [u8; 8] = client.span_id.as_slice().try_into().unwrap();
                    groups[g].push(client);
                    let g2 = rng.below(PROCESSES_PER_REQUEST) as usize;
                    groups[g2].push(span(rng, k + 1, true, trace_id, Some(parent)));
                    count += 2;
                    k += 2;
                } else {
                    groups[g].push(span(rng, k, true, trace_id, None));
                    count += 1;
                    k += 1;
                }
            }
            ExportTraceServiceRequest {
                resource_spans: groups
                    .into_iter()
                    .enumerate()
                    .filter(|(_, spans)| !spans.is_empty())
                    .map(|(g, spans)| ResourceSpans {
                        resource: Some(resource((first_process + g as u64) % PROCESSES)),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "tracer".into(),
                                version: "0.1.0".into(),
                                ..Default::default()
                            }),
                            spans,
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    })
                    .collect(),
            }
            .encode_to_vec()
        })
        .collect()
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn median(mut v: Vec<f64>) -> f64 {
    // (The upper median for an even count.)
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

#[inline(never)]
fn via_prost(body: &[u8]) -> Vec<SpanRecord> {
    let req = ExportTraceServiceRequest::decode(body).expect("decode");
    convert::spans_from_request(req).expect("convert")
}

#[inline(never)]
fn direct(body: &[u8]) -> Vec<SpanRecord> {
    decode::spans_from_protobuf(body).expect("decode")
}

/// ns of CPU per span for `f` over every body (the records dropped inside, as ingest drops
/// them after the store write).
fn per_span(bodies: &[Vec<u8>], f: &mut dyn FnMut(&[u8]) -> usize) -> f64 {
    let t = thread_cpu();
    let spans: usize = bodies.iter().map(|b| f(b)).sum();
    (thread_cpu() - t).as_nanos() as f64 / spans as f64
}

fn decoding(rounds: usize, requests: usize) {
    let bodies = requests_for(requests, 1);
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "decode + convert: {requests} bodies of {SPANS_PER_REQUEST} spans ({:.0} bytes/span), \
         {rounds} rounds, CPU ns per span (median)",
        bytes as f64 / (requests * SPANS_PER_REQUEST) as f64
    );
    // Same output, checked once.
    for b in &bodies {
        assert_eq!(via_prost(b), direct(b), "the two paths disagree");
    }
    let mut prost_decode_only = Vec::new();
    let mut prost_full = Vec::new();
    let mut direct_full = Vec::new();
    let mut borrowed = Vec::new();
    for _ in 0..rounds {
        prost_decode_only.push(per_span(&bodies, &mut |b| {
            let r = ExportTraceServiceRequest::decode(b).expect("decode");
            r.resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum()
        }));
        prost_full.push(per_span(&bodies, &mut |b| via_prost(b).len()));
        direct_full.push(per_span(&bodies, &mut |b| direct(b).len()));
        borrowed.push(per_span(&bodies, &mut |b| {
            decode::decode(b)
                .expect("decode")
                .with_spans(|spans| spans.len())
        }));
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (pf, df) = (median(prost_full.clone()), median(direct_full.clone()));
    println!("                                          median      min");
    for (label, v) in [
        ("prost decode only (no convert)", &prost_decode_only),
        ("prost decode + convert (before)", &prost_full),
        ("direct decoder (decode.rs, after)", &direct_full),
        ("  borrowed spans (what ingest stores)", &borrowed),
    ] {
        println!(
            "  {label:<36} {:>8.0} ns {:>8.0} ns",
            median(v.clone()),
            min(v)
        );
    }
    println!(
        "  ratio before/after                   {:>8.2}x {:>8.2}x",
        pf / df,
        min(&prost_full) / min(&direct_full)
    );
}

fn requests_for(n: usize, seed: u64) -> Vec<Vec<u8>> {
    requests(n, &mut Rng(0x5eed_0000 + seed))
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bench-collector")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating the bench directory");
    d
}

/// How a body gets into the store.
#[derive(Clone, Copy)]
enum Route {
    /// Owned records from this decoder, then `SqliteStore::write`.
    Records(fn(&[u8]) -> Vec<SpanRecord>),
    /// What ingest does: spans borrowed from the body, `SpanStore::write_refs`.
    Borrowed,
}

/// Spans per CPU-second of decode + convert + `SqliteStore::write` (one writer thread, the
/// store's background thread counted), into a fresh store.
fn store_run(bodies: &[Vec<u8>], name: &str, path: Route) -> f64 {
    let d = fresh_dir(name);
    let store = SqliteStore::open(&d).expect("open");
    let t = process_cpu();
    let mut n = 0;
    for b in bodies {
        n += match path {
            Route::Records(decode) => {
                let spans = decode(b);
                store.write(&spans).expect("write");
                spans.len()
            }
            Route::Borrowed => {
                let d = decode::decode(b).expect("decode");
                d.with_spans(|spans| store.write_refs(spans))
                    .expect("write");
                d.len()
            }
        };
    }
    drop(store); // joins the background thread, so its work is counted
    let cpu = process_cpu() - t;
    assert_eq!(n, bodies.len() * SPANS_PER_REQUEST);
    let _ = std::fs::remove_dir_all(&d);
    n as f64 / cpu.as_secs_f64()
}

fn storing(rounds: usize, spans: usize) {
    let n = spans.div_ceil(SPANS_PER_REQUEST);
    let bodies = requests_for(n, 2);
    println!(
        "decode + convert + SqliteStore::write: {} spans in bodies of {SPANS_PER_REQUEST}, \
         1 writer thread, {rounds} rounds, spans per CPU-second (median)",
        n * SPANS_PER_REQUEST
    );
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut borrowed = Vec::new();
    for _ in 0..rounds {
        before.push(store_run(&bodies, "prost", Route::Records(via_prost)));
        after.push(store_run(&bodies, "direct", Route::Records(direct)));
        borrowed.push(store_run(&bodies, "borrowed", Route::Borrowed));
    }
    let (b, a, r) = (median(before), median(after), median(borrowed));
    println!(
        "  prost path (before)                   {b:>8.0} spans/CPU-s  {:>6.2} µs/span",
        1e6 / b
    );
    println!(
        "  direct decoder (after)                {a:>8.0} spans/CPU-s  {:>6.2} µs/span",
        1e6 / a
    );
    println!(
        "  borrowed spans, write_refs (ingest)   {r:>8.0} spans/CPU-s  {:>6.2} µs/span",
        1e6 / r
    );
    println!("  ratio after/before                    {:>8.2}x", a / b);
}

/// One path in a loop, for `perf record` or `valgrind --tool=callgrind
/// --toggle-collect='ingest::direct'` (filter argument `profile` or `profile-prost`).
fn profile(rounds: usize, requests: usize, f: fn(&[u8]) -> Vec<SpanRecord>) {
    let bodies = requests_for(requests, 1);
    let mut ns = Vec::new();
    for _ in 0..rounds {
        ns.push(per_span(&bodies, &mut |b| f(b).len()));
    }
    println!("{:.0} CPU ns per span (median)", median(ns));
}

/// Only `SqliteStore::write` (filter argument `profile-store`), for `valgrind --tool=callgrind
/// --toggle-collect='ingest::write_one' --toggle-collect='*maintenance_loop*'` or
/// `perf record`. `BENCH_TRACE_RUN_SPANS` sets how often the trace index is written out as a
/// run (default: the store's 262,144), so that short runs include that work too; `BENCH_BATCH`
/// the spans per `write` call (default 512).
fn profile_store(spans: usize) {
    let bodies = requests_for(spans.div_ceil(SPANS_PER_REQUEST), 2);
    let d = fresh_dir("profile-store");
    let options = tracer_store::StoreOptions {
        trace_run_spans: env_usize("BENCH_TRACE_RUN_SPANS", 262_144),
        ..Default::default()
    };
    let store = SqliteStore::open_with(&d, &options).expect("open");
    // `BENCH_BATCH`: spans per `write` (the agent sends up to 512; the live collector saw 2).
    let batch = env_usize("BENCH_BATCH", SPANS_PER_REQUEST).max(1);
    let mut cpu = Duration::ZERO;
    for b in &bodies {
        let spans = direct(b);
        let t = process_cpu();
        for chunk in spans.chunks(batch) {
            write_one(&store, chunk);
        }
        cpu += process_cpu() - t;
    }
    let t = process_cpu();
    drop(store);
    cpu += process_cpu() - t;
    let n = bodies.len() * SPANS_PER_REQUEST;
    println!(
        "SqliteStore::write: {:.0} spans/CPU-s ({:.2} µs/span, the background thread included)",
        n as f64 / cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[inline(never)]
fn write_one(store: &SqliteStore, spans: &[SpanRecord]) {
    store.write(spans).expect("write");
}

/// The collector binary under test, started on its own ports and data directory; killed (and
/// its directory removed) when dropped.
struct Server {
    child: Child,
    http_port: u16,
    dir: PathBuf,
}

impl Server {
    fn start(binary: &Path, dir: PathBuf, first_port: u16) -> Server {
        let _ = std::fs::remove_dir_all(&dir);
        let addr = |k: u16| format!("127.0.0.1:{}", first_port + k);
        let mut child = Command::new(binary)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--http-addr", &addr(0), "--grpc-addr", &addr(1)])
            .args(["--query-addr", &addr(2)])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        while !line.contains("tracer-collector: ready") {
            line.clear();
            let n = err.read_line(&mut line).expect("collector stderr");
            assert!(n > 0, "{} exited before it was ready", binary.display());
        }
        // Keep draining, so that a chatty collector never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Server {
            child,
            http_port: first_port,
            dir,
        }
    }

    /// utime + stime of the whole process (every thread), from `/proc/<pid>/stat`.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("reading the collector's /proc stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().expect("stat field"))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_nanos((f[0] + f[1]) * 1_000_000_000 / hz)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// POSTs each body on one keep-alive connection, one at a time, checking for a 200; with
/// `rate` > 0 (spans per second), paced to it the way an agent's 512-span batches arrive.
fn post_all(port: u16, bodies: &[Vec<u8>], rate: f64) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the collector");
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let start = Instant::now();
    for (k, body) in bodies.iter().enumerate() {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64((k * SPANS_PER_REQUEST) as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let head = format!(
            "POST /v1/traces HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             content-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        writer.write_all(head.as_bytes()).expect("sending");
        writer.write_all(body).expect("sending");
        let mut line = String::new();
        reader.read_line(&mut line).expect("reading the response");
        assert!(
            line.starts_with("HTTP/1.1 200"),
            "collector answered {line:?}"
        );
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("reading the response");
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().expect("content-length");
                }
            }
        }
        let mut rest = vec![0; length];
        reader.read_exact(&mut rest).expect("reading the response");
    }
}

/// Filter argument `http`: collector CPU per span, whole process (HTTP, decoding, store,
/// background threads), over `BENCH_HTTP_SPANS` spans (default 204,800) sent after
/// `BENCH_HTTP_WARMUP` others (default 512,000, not measured; earlier in time): a fresh store
/// spends much of its first ~450k spans growing SQLite's page cache (128 MiB), which a
/// collector that has run for a minute no longer does.
/// `BENCH_HTTP_RATE`: spans per second to send at (default 0, as fast as it answers; the
/// end-to-end bench's collector gets ~20-50k). `BENCH_COLLECTOR_BASE`: other collector
/// binaries (say main's; `:`-separated) run alternately with this one, `BENCH_HTTP_ROUNDS`
/// times each (default 3). `BENCH_PORT` (default: 35100): the first of the three ports each collector listens on.
/// `BENCH_DIR`: where the stores go (default: the target's tmp directory).
fn http() {
    let spans = env_usize("BENCH_HTTP_SPANS", 204_800);
    let rate = env_usize("BENCH_HTTP_RATE", 0) as f64;
    let rounds = env_usize("BENCH_HTTP_ROUNDS", 3);
    let port = env_usize("BENCH_PORT", 35_100) as u16;
    let dir = std::env::var_os("BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-collector"),
        PathBuf::from,
    );
    let this = PathBuf::from(env!("CARGO_BIN_EXE_tracer-collector"));
    let mut binaries: Vec<(String, PathBuf)> = std::env::var("BENCH_COLLECTOR_BASE")
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
        .map(|p| (p.to_owned(), PathBuf::from(p)))
        .collect();
    binaries.push(("this build".into(), this));
    let warmup = env_usize("BENCH_HTTP_WARMUP", 512_000).div_ceil(SPANS_PER_REQUEST);
    let bodies = requests_from(
        spans.div_ceil(SPANS_PER_REQUEST),
        &mut Rng(0x5eed_0003),
        (warmup * SPANS_PER_REQUEST) as u64,
    );
    let n = bodies.len() * SPANS_PER_REQUEST;
    println!(
        "tracer-collector over OTLP/HTTP: {n} spans in bodies of {SPANS_PER_REQUEST} after {} \
         others, one connection, {}, {rounds} rounds; collector CPU (all threads) per span",
        warmup * SPANS_PER_REQUEST,
        if rate > 0.0 {
            format!("{rate:.0} spans/s")
        } else {
            "as fast as it answers".into()
        }
    );
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); binaries.len()];
    for _ in 0..rounds {
        for (b, (_, binary)) in binaries.iter().enumerate() {
            let server = Server::start(binary, dir.join(format!("http-{b}")), port + 3 * b as u16);
            // Generated as they go (in this process), so they need no memory of their own.
            let mut rng = Rng(0x5eed_1000);
            for first in (0..warmup).step_by(16) {
                let chunk = requests_from(
                    16.min(warmup - first),
                    &mut rng,
                    (first * SPANS_PER_REQUEST) as u64,
                );
                post_all(server.http_port, &chunk, 0.0);
            }
            // Its last checkpoint done.
            std::thread::sleep(Duration::from_millis(1200));
            let (c0, t0) = (server.cpu(), Instant::now());
            post_all(server.http_port, &bodies, rate);
            let wall = t0.elapsed();
            // The last second's checkpoint belongs to this ingest too.
            std::thread::sleep(Duration::from_millis(1200));
            let cpu = server.cpu() - c0;
            results[b].push((
                cpu.as_secs_f64() * 1e6 / n as f64,
                n as f64 / wall.as_secs_f64(),
            ));
        }
    }
    for ((label, _), r) in binaries.iter().zip(&results) {
        let cpu: Vec<f64> = r.iter().map(|x| x.0).collect();
        let wall: Vec<f64> = r.iter().map(|x| x.1).collect();
        println!(
            "  {label:<32} {:>6.2} µs CPU/span (median; runs {})  {:>8.0} spans/s wall",
            median(cpu.clone()),
            cpu.iter()
                .map(|c| format!("{c:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(wall)
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument runs just that part.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (rounds, requests) = (
        env_usize("BENCH_ROUNDS", 7),
        env_usize("BENCH_REQUESTS", 40),
    );
    match only.as_deref() {
        Some("profile") => return profile(rounds * 10, requests, direct),
        Some("profile-prost") => return profile(rounds * 10, requests, via_prost),
        Some("profile-store") => return profile_store(env_usize("BENCH_STORE_SPANS", 102_400)),
        Some("http") => return http(),
        Some("stitch") => return stitching(env_usize("BENCH_STITCH_REQUESTS", 20_000)),
        _ => {}
    }
    if only.as_deref().is_none_or(|o| "decode".contains(o)) {
        decoding(rounds, requests);
    }
    let store_spans = env_usize("BENCH_STORE_SPANS", 102_400);
    if store_spans > 0 && only.as_deref().is_none_or(|o| "store".contains(o)) {
        storing(env_usize("BENCH_STORE_ROUNDS", 3), store_spans);
    }
}

/// One request's spans as three hosts' agents store them, each host's in its own trace: the
/// client (host a), a proxy's SERVER and CLIENT spans (host b), the service (host c).
fn chain(n: u64) -> Vec<SpanRecord> {
    let t = |h: u8| {
        let mut id = [h; 16];
        id[..8].copy_from_slice(&n.to_le_bytes());
        id
    };
    let id = |k: u8| {
        let mut id = [k; 8];
        id[..4].copy_from_slice(&(n as u32).to_le_bytes());
        id
    };
    let kv = |k: &str, v: tracer_store::AttrValue| tracer_store::KeyValue {
        key: k.into(),
        value: v,
    };
    let text = |k: &str, v: &str| kv(k, tracer_store::AttrValue::Str(v.into()));
    let res = |svc: &str, host: &str| {
        std::sync::Arc::new(vec![
            text("service.name", svc),
            text("host.name", host),
            text("host.id", host),
        ])
    };
    let start = T0 + n * 100_000;
    let e1 = format!("10.0.0.1:{}>10.0.0.2:80#{}", 30_000 + n % 30_000, n * 7919);
    let e2 = format!(
        "10.0.0.2:{}>10.0.0.3:80#{}",
        30_000 + n % 30_000,
        n * 104_729
    );
    let span = |trace: [u8; 16],
                sid: [u8; 8],
                parent: Option<[u8; 8]>,
                kind: i32,
                svc: &str,
                host: &str,
                at: u64,
                dur: u64,
                edge: &str| SpanRecord {
        trace_id: trace,
        span_id: sid,
        parent_span_id: parent,
        service: svc.into(),
        operation: "GET /api".into(),
        kind,
        start_unix_nano: start + at,
        duration_nano: dur,
        status_code: 0,
        status_message: String::new(),
        attributes: vec![
            text("http.request.method", "GET"),
            text("url.path", "/api"),
            text("tracer.tcp.edge", edge),
            kv(
                "tracer.tcp.seq",
                tracer_store::AttrValue::Int(edge.rsplit('#').next().unwrap().parse().unwrap()),
            ),
        ],
        resource: res(svc, host),
        events: vec![],
        links: vec![],
        scope_name: "tracer".into(),
        scope_version: String::new(),
    };
    use tracer_store::kind::{CLIENT, SERVER};
    vec![
        span(t(1), id(1), None, CLIENT, "client", "a", 0, 90_000, &e1),
        span(t(2), id(2), None, SERVER, "proxy", "b", 10_000, 70_000, &e1),
        span(
            t(2),
            id(3),
            Some(id(2)),
            CLIENT,
            "proxy",
            "b",
            20_000,
            50_000,
            &e2,
        ),
        span(
            t(3),
            id(4),
            None,
            SERVER,
            "service",
            "c",
            30_000,
            30_000,
            &e2,
        ),
    ]
}

/// Read latency of a trace, stored (`SpanStore::trace`) against stitched
/// (`stitch::trace`: three stored traces of four spans, two edge lookups and the assembly), on
/// a store of `requests` such requests, and of a 20-trace search both ways.
fn stitching(requests: usize) {
    let d = fresh_dir("stitch");
    let store = SqliteStore::open(&d).expect("open");
    for first in (0..requests as u64).step_by(128) {
        let spans: Vec<SpanRecord> = (first..(first + 128).min(requests as u64))
            .flat_map(chain)
            .collect();
        store.write(&spans).expect("write");
    }
    let mut rng = Rng(7);
    let ids: Vec<[u8; 16]> = (0..2_000)
        .map(|_| {
            let n = rng.below(requests as u64);
            let mut id = [1u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            id
        })
        .collect();
    let time = |f: &mut dyn FnMut(&[u8; 16])| {
        let mut v: Vec<f64> = ids
            .iter()
            .map(|id| {
                let t = Instant::now();
                f(id);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let plain = time(&mut |id| assert_eq!(store.trace(id).expect("trace").len(), 1));
    let stitched = time(&mut |id| {
        let t = stitch::trace(&store, id, stitch::Limits::default())
            .expect("stitch")
            .expect("found");
        assert_eq!(t.spans.len(), 4);
    });
    println!("stitch: {requests} requests of 4 spans in 3 stored traces (3 hosts)");
    println!(
        "  trace by id, stored:   p50 {:>7.1} us   p99 {:>7.1} us",
        plain.0, plain.1
    );
    println!(
        "  trace by id, stitched: p50 {:>7.1} us   p99 {:>7.1} us",
        stitched.0, stitched.1
    );
    let q = TraceQuery {
        service: Some("service".into()),
        limit: 20,
        ..Default::default()
    };
    let search = |f: &mut dyn FnMut() -> usize| {
        let mut v: Vec<f64> = (0..50)
            .map(|_| {
                let t = Instant::now();
                assert_eq!(f(), 20);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let plain = search(&mut || store.find_traces(&q).expect("search").len());
    let stitched = search(&mut || {
        stitch::search(&store, &q, stitch::Limits::default())
            .expect("search")
            .len()
    });
    println!("  search (20 traces), stored: p50 {plain:.2} ms, stitched: p50 {stitched:.2} ms");
}
