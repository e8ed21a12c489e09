//! `cargo xtask bench`: what tracing costs, measured side by side in one run.
//!
//! What runs, in order:
//!
//! 1. **nginx under wrk on loopback**, agent off then agent on (full pipeline: probes, parsing,
//!    export to a running collector), alternating untraced / traced at each load level, for
//!    `--rounds` rounds of `--seconds` each. Load levels: saturation (wrk as fast as it can, 50
//!    connections), saturation over TLS (the same nginx on a TLS port, wrk over `https://`, both
//!    on the system OpenSSL: the agent reads the plaintext through its uprobes on libssl, and
//!    mutes the ciphertext), paced at 10k and 20k req/s (the budget is zero drops at 20k req/s), and one
//!    connection in a closed loop (each request sent when the last response is in): with no
//!    schedule and no queueing, its latency difference is what tracing adds to one request's
//!    path, where the paced levels' medians move by tens of µs between runs of the same build.
//!    Last, paced at 1k req/s with the collector elsewhere only: the agent's CPU a request where
//!    its fixed costs (timers, wake-ups) weigh most.
//!    At saturation, 10k and one connection there is a third run: the agent exporting to a
//!    sink in the bench process that reads each request and discards it (`otlp_sink.rs`),
//!    standing in for a collector on another machine, as deployed. At saturation, two more
//!    such runs export 10% and 1% of traces (`--sample`): what leaving spans out saves, while
//!    the RED metrics still count every request (the count of nginx's requests they report is
//!    printed beside wrk's, which leaves out the few in flight when it stops); a third exports
//!    no spans and counts the requests in the kernel (`--metrics-only`); two more keep 10% and
//!    1% with the decision made in the kernel (`--sample-in-kernel`). The collector otherwise
//!    shares the 2 cores with nginx and wrk, and its CPU would be counted as the agent's cost.
//!    Per run: throughput, latency p50/p99, and for traced runs the agent's CPU time per request
//!    and peak memory, the collector's CPU time per request (it shares the same cores, so part
//!    of the throughput lost at saturation is the collector's, not the agent's), the kernel-side
//!    drops (ring buffer, in-flight and connection tables), export drops, spans built and spans
//!    the collector acknowledged. After each traced run the bench waits until the agent has
//!    exported or counted as dropped every span it built, so the counts add up.
//!    Then **where a traced request's time goes at saturation** (`breakdown.rs`, alone with
//!    `--breakdown-only`): untraced, probes ignoring every connection, records without export,
//!    every span exported, with the 2 CPUs' time a request split among nginx, wrk, the agent,
//!    the sink, the rest of the machine and idle.
//!    Then **the agent's pipeline alone**: 3 s at 10k req/s recorded with `tracer agent
//!    --record`, replayed 3 times by `tracer replay` (pairing, spans, OTLP encoding; no probes,
//!    ring buffer or export, warm caches), next to the live agent's CPU at 10k req/s. Then the
//!    agent with nothing to trace for `--seconds`: its CPU a second (timers, the priority
//!    watchdog), what each quiet host of a fleet pays.
//! 2. **Kernel micro-benchmark**: a loopback ping-pong inside the bench process, both threads
//!    pinned to one CPU, with the probes detached, then attached (the agent on CPU 0 tracing
//!    this process, spans to /dev/null). HTTP-shaped messages give the cost per traced syscall;
//!    single bytes (a connection the agent mutes as not HTTP) the cost on an ignored
//!    connection. The time inside the probe programs is read from the kernel's BPF run-time
//!    statistics (`kernel.bpf_stats_enabled`, `bpftool prog show`); the rest of the difference
//!    is the syscall tracepoint machinery around them. Each call of the ping-pong blocks and
//!    switches threads, so the programs run on cold caches; a second loop, in which one thread
//!    owns both ends of the connection (loopback delivers during the write, so nothing blocks),
//!    gives the same figures on warm caches.
//! 3. **Collector ingest rate**: a fresh collector (empty data dir) fed OTLP/HTTP protobuf
//!    `ExportTraceServiceRequest`s of 512 realistic HTTP server spans (17 attributes per span, as
//!    the agent sends them; 4 resources of 13 attributes) by a few client threads for
//!    `--seconds`. Reported: acknowledged spans per wall second, and per CPU-second of the
//!    collector process (utime + stime), i.e. spans/s per core. The bodies are encoded before
//!    the timed phase; each request only gets fresh ids and timestamps patched in place (the
//!    store drops duplicate ids, so every span id is unique), so the generator costs little.
//!
//! 4. **Against the OpenTelemetry SDK** (`sdk_bench.rs`, alone with `--sdk-only`): a Python and a
//!    Node.js service doing realistic work, untraced, traced by the agent and instrumented by the
//!    SDK's zero-code instrumentation, alternated in each round.
//!
//! **How the paced load works.** wrk (not wrk2) has no rate option: it is closed-loop, each
//! connection sends its next request when the previous response is in. Its lua `delay()` hook
//! makes a connection wait before a request, but wrk truncates the value to whole milliseconds
//! (0.5 means no delay at all) and its timers fire on millisecond ticks, so a fixed delay gives
//! a rate of connections / (delay + latency + timer slack): it depends on the latency being
//! measured (the traced run would get a lower rate than the untraced one) and on the machine
//! (a 1 ms delay with 10 connections gives ~6.6k req/s, not 10k). Instead the lua script keeps
//! a schedule, as wrk2 does: request k is due at start + k / rate. `delay()` reads the
//! monotonic clock (LuaJIT's ffi, `clock_gettime`) and returns the time to the next free slot,
//! rounded to the millisecond, or 0 when behind; lateness does not accumulate, so the mean rate
//! is the target whatever the latency, as long as enough connections are idle to take the
//! slots. One connection per 250 req/s of target (a 4 ms budget per request and connection)
//! covers a latency of ~3 ms; beyond that the system is past saturation and the achieved rate,
//! printed next to the target, falls short. The traced and untraced runs of a level use the same
//! connections and schedule, so their latencies compare. The requests leave on millisecond
//! ticks, a few at a time, so latency at a paced level includes a little queueing behind the
//! other requests of the tick (in both runs).
//!
//! Query latency of the store is measured by `cargo bench -p tracer-store`.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};

use crate::{breakdown, otlp_sink, sdk_bench};

pub struct BenchArgs {
    pub rounds: usize,
    pub seconds: u64,
    /// Run only the kernel-cost micro-benchmark (a minute instead of ten).
    pub kernel_only: bool,
    /// Extra arguments for the traced runs' agents (`--agent-arg`).
    pub agent_args: Vec<String>,
    /// Run only the comparison with the OpenTelemetry SDK (`sdk_bench.rs`).
    pub sdk_only: bool,
    /// The comparison with the SDK (`--sdk-rounds`, `--sdk-pairs`, `--sdk-seconds`).
    pub sdk: sdk_bench::SdkArgs,
    /// Run only the account of a traced request's time at saturation (`breakdown.rs`).
    pub breakdown_only: bool,
    /// A second agent build for the breakdown's A/B step (`--compare-bin`).
    pub compare_bin: Option<PathBuf>,
}

pub(crate) struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// The pid of nginx's one worker process (a child of the master the bench started).
pub(crate) fn nginx_worker(nginx: &Nginx) -> anyhow::Result<u32> {
    let master = nginx._process.0.id();
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .context("reading nginx's worker pid")?;
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .context("nginx has no worker process")
}

pub(crate) use tracer_test_support::free_port;

pub(crate) fn wait_port(port: u16) -> anyhow::Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("nothing listens on {port} after 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts a child and waits for `ready` on its stderr.
pub(crate) fn start_ready(mut cmd: Command, ready: &str) -> anyhow::Result<Killed> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let err = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(err).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(ready) => break,
            Some(Ok(_)) => {}
            _ => bail!("{cmd:?} exited before it was ready"),
        }
    }
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    Ok(Killed(child))
}

/// A collector with its store in `data`, on fresh ports: (process, OTLP/HTTP port, query port).
fn collector(bin: &Path, data: &Path) -> anyhow::Result<(Killed, u16, u16)> {
    let (grpc, http, query) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(bin.join("tracer-collector"));
    cmd.arg("--data-dir")
        .arg(data)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--query-addr", &format!("127.0.0.1:{query}")])
        .env("RUST_LOG", "warn");
    Ok((start_ready(cmd, "tracer-collector: ready")?, http, query))
}

/// The benchmarked nginx: one worker answering `/ok` on a plain port and on a TLS port (a
/// self-signed certificate made for the run; TLS 1.3, the default).
pub(crate) struct Nginx {
    _process: Killed,
    pub(crate) port: u16,
    tls_port: u16,
}

fn nginx(dir: &Path) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(dir)?;
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .context("running openssl (apt install openssl)")?;
    if !made.success() {
        bail!("openssl could not make the TLS level's certificate");
    }
    let (port, tls_port) = (free_port(), free_port());
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log error;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {d}/b; proxy_temp_path {d}/p;\n\
         fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         server {{ listen 127.0.0.1:{port}; location = /ok {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{tls_port} ssl; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
         location = /ok {{ return 200 \"ok\\n\"; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .spawn()?;
    let process = Killed(child);
    wait_port(port)?;
    wait_port(tls_port)?;
    Ok(Nginx {
        _process: process,
        port,
        tls_port,
    })
}

/// A load level of the nginx runs.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    /// wrk as fast as it goes.
    Saturated,
    /// wrk as fast as it goes, over TLS: the agent reads the plaintext through its uprobes on
    /// libssl, which both wrk and nginx use.
    SaturatedTls,
    /// A target rate in requests per second.
    Paced(u32),
    /// One connection, a request as soon as the last response is in.
    OneConnection,
}

impl Level {
    fn name(self) -> String {
        match self {
            Level::Saturated => "saturated".into(),
            Level::SaturatedTls => "sat. HTTPS".into(),
            Level::Paced(r) => format!("paced {}k", r / 1000),
            Level::OneConnection => "1 conn".into(),
        }
    }

    /// How wrk runs at this level, the same for the traced and the untraced runs.
    fn connections(self) -> u32 {
        match self {
            Level::Saturated | Level::SaturatedTls => 50,
            Level::Paced(rate) => rate.div_ceil(RATE_PER_CONNECTION).max(8),
            Level::OneConnection => 1,
        }
    }
}

/// Whether a run is traced, and where its agent sends the spans.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Untraced,
    /// The agent exports to the collector, on the same 2 cores as nginx and wrk.
    Traced,
    /// The agent exports to a sink that only reads the requests (`otlp_sink.rs`): the collector
    /// as deployed, on another machine, so the run shows what the traced machine pays.
    CollectorElsewhere,
    /// As `CollectorElsewhere`, exporting this percentage of traces (`--sample`); the RED
    /// metrics still count every request.
    Sampled(u8),
    /// `--metrics-only`: no spans, HTTP/1 exchanges counted in the kernel.
    MetricsOnly,
    /// As `Sampled`, decided in the kernel (`--sample-in-kernel`): the dropped requests are
    /// only counted there.
    SampledInKernel(u8),
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Traced => "traced",
            Mode::CollectorElsewhere => "traced, collector elsewhere",
            Mode::Sampled(10) => "10% of traces, elsewhere",
            Mode::Sampled(1) => "1% of traces, elsewhere",
            Mode::Sampled(_) => "sampled, elsewhere",
            Mode::MetricsOnly => "metrics only (--metrics-only)",
            Mode::SampledInKernel(10) => "10%, decided in the kernel",
            Mode::SampledInKernel(1) => "1%, decided in the kernel",
            Mode::SampledInKernel(_) => "sampled in the kernel",
        }
    }

    /// The mode's name in the table's collector column.
    fn column(self) -> &'static str {
        match self {
            Mode::Untraced => "-",
            Mode::Traced => "same cores",
            Mode::CollectorElsewhere => "elsewhere",
            Mode::Sampled(10) => "10%, elsew.",
            Mode::Sampled(1) => "1%, elsew.",
            Mode::Sampled(_) => "sampled",
            Mode::MetricsOnly => "metrics only",
            Mode::SampledInKernel(10) => "10%, kernel",
            Mode::SampledInKernel(1) => "1%, kernel",
            Mode::SampledInKernel(_) => "kernel-sampled",
        }
    }

    /// The modes each level runs in: the collector-elsewhere runs where they answer a budget
    /// line (throughput, latency), not at 20k, whose zero-drop check needs the collector.
    fn for_level(level: Level) -> &'static [Mode] {
        match level {
            Level::Paced(20_000) => &[Mode::Untraced, Mode::Traced],
            // What a lightly loaded host pays: the agent's fixed costs (timers, wake-ups).
            Level::Paced(1_000) => &[Mode::Untraced, Mode::CollectorElsewhere],
            // What exporting fewer spans saves where the agent works hardest.
            Level::Saturated => &[
                Mode::Untraced,
                Mode::Traced,
                Mode::CollectorElsewhere,
                Mode::Sampled(10),
                Mode::Sampled(1),
                Mode::MetricsOnly,
                Mode::SampledInKernel(10),
                Mode::SampledInKernel(1),
            ],
            _ => &[Mode::Untraced, Mode::Traced, Mode::CollectorElsewhere],
        }
    }
}

/// Paced levels use one connection per this many req/s of target: 4 ms per request and
/// connection, so latency up to ~3 ms does not lower the rate.
pub(crate) const RATE_PER_CONNECTION: u32 = 250;

/// wrk's lua: requests on a fixed schedule of `RATE` per second (see the module comment).
const PACE_LUA: &str = r#"local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e3 + tonumber(ts.tv_nsec) / 1e6
end
local interval = 1e3 / RATE -- ms between requests, over all connections of this thread
local due = nil
function delay()
  local now = now_ms()
  due = (due or now) + interval
  local wait = due - now
  if wait < 0.5 then return 0 end
  return math.floor(wait + 0.5)
end
"#;

#[derive(Default, Clone, Copy)]
pub(crate) struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// wrk's own CPU time (user + system), seconds.
    pub cpu_seconds: f64,
}

fn parse_latency(s: &str) -> f64 {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mul
}

fn wrk(nginx: &Nginx, seconds: u64, level: Level, dir: &Path) -> anyhow::Result<Wrk> {
    let rate = match level {
        Level::Paced(rate) => Some(rate),
        _ => None,
    };
    let url = match level {
        Level::SaturatedTls => format!("https://127.0.0.1:{}/ok", nginx.tls_port),
        _ => format!("http://127.0.0.1:{}/ok", nginx.port),
    };
    wrk_load(&url, seconds, level.connections(), rate, dir)
}

/// wrk on `url` with one thread and `connections` keep-alive connections, closed-loop or paced
/// at `rate` requests a second (the lua schedule above).
pub(crate) fn wrk_load(
    url: &str,
    seconds: u64,
    connections: u32,
    rate: Option<u32>,
    dir: &Path,
) -> anyhow::Result<Wrk> {
    let mut cmd = Command::new("wrk");
    // One wrk thread: one lua state, so one schedule for all connections.
    cmd.args(["-t1", "--latency", &format!("-d{seconds}s")])
        .arg(format!("-c{connections}"));
    if let Some(rate) = rate {
        let script = dir.join(format!("pace-{rate}.lua"));
        std::fs::write(&script, PACE_LUA.replace("RATE", &rate.to_string()))?;
        cmd.arg("-s").arg(script);
    }
    let (out, cpu_seconds) = output_and_cpu(cmd.arg(url)).context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk {
        cpu_seconds,
        ..Wrk::default()
    };
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_us = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_us = parse_latency(v);
        } else if t.contains("requests in") {
            w.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    if w.requests == 0 {
        bail!(
            "could not read wrk's output:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(w)
}

/// Runs `cmd` to its end like `Command::output`, and returns the CPU time (user + system) it
/// used, from `wait4`'s resource usage.
fn output_and_cpu(cmd: &mut Command) -> std::io::Result<(std::process::Output, f64)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    // wrk writes little, and only at its end: reading one pipe after the other cannot block it.
    child.stdout.take().map(|mut o| o.read_to_end(&mut stdout));
    child.stderr.take().map(|mut e| e.read_to_end(&mut stderr));
    let mut status = 0;
    // SAFETY: wait4 on our own child, writing into locals.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    use std::os::unix::process::ExitStatusExt as _;
    Ok((
        std::process::Output {
            status: std::process::ExitStatus::from_raw(status),
            stdout,
            stderr,
        },
        secs(ru.ru_utime) + secs(ru.ru_stime),
    ))
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// User + system CPU time of this process (all threads), in seconds.
pub(crate) fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

pub(crate) fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// GET a Prometheus endpoint and return one metric's value.
pub(crate) fn metric(port: u16, name: &str) -> u64 {
    metrics_text(port)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The sum of every series of `name` (`name{labels} value`).
fn metric_sum(port: u16, name: &str) -> u64 {
    metrics_text(port)
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| rest.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum()
}

fn metrics_text(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

struct Run {
    level: Level,
    mode: Mode,
    wrk: Wrk,
    agent_cpu_us_per_req: f64,
    collector_cpu_us_per_req: f64,
    agent_peak_mib: f64,
    ringbuf_drops: u64,
    /// In-flight and connection tables full: syscalls or connections not traced.
    table_drops: u64,
    export_drops: u64,
    spans_built: u64,
    spans_exported: u64,
    /// Left out by `--sample`.
    spans_unsampled: u64,
    /// Requests nginx served by the RED metrics (`http_server_request_duration_seconds_count`).
    red_server_requests: u64,
    collector_spans: u64,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Waits (up to 15 s) until the agent has exported or counted as dropped every span it built,
/// so the counters read afterwards cover the whole run.
pub(crate) fn drain(metrics_port: u16) {
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    if metric(metrics_port, "tracer_red_kernel_exchanges_total") > 0 {
        // `--metrics-only`: the agent reads the kernel's counts into its histograms once a
        // second.
        std::thread::sleep(Duration::from_millis(1200));
    }
    while start.elapsed() < Duration::from_secs(15) {
        let built = metric(metrics_port, "tracer_spans_total");
        let done = metric(metrics_port, "tracer_spans_exported_total")
            + metric(metrics_port, "tracer_spans_unsampled_total")
            + metric(metrics_port, "tracer_export_dropped_queue_full_total")
            + metric(metrics_port, "tracer_export_dropped_rejected_total");
        if done >= built {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("warning: the agent still had spans to export after 15 s");
}

pub fn bench(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let bin = root.join("target/release");
    check_no_syscall_probes()?;
    let work = std::env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = if args.breakdown_only {
        breakdown_only(&bin, &work, args)
    } else if args.sdk_only {
        sdk_bench::sdk_bench(root, &bin, &work, &args.sdk, &args.agent_args)
    } else if args.kernel_only {
        kernel_cost(&bin, &work).map(|k| {
            println!("\n== tracer kernel cost (medians of {KERNEL_ALTERNATIONS} alternations) ==");
            print_kernel_cost(&k);
        })
    } else {
        bench_in(&bin, &work, args)
            .and_then(|()| sdk_bench::sdk_bench(root, &bin, &work, &args.sdk, &args.agent_args))
    };
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn breakdown_only(bin: &Path, work: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let nginx = nginx(&work.join("nginx"))?;
    let (sink_port, sink) = otlp_sink::start()?;
    breakdown::measure(
        bin,
        args.compare_bin.as_deref(),
        work,
        &nginx,
        (sink_port, &sink),
        args.rounds,
        args.seconds,
    )?
    .print();
    Ok(())
}

fn bench_in(bin: &Path, work: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let nginx = nginx(&work.join("nginx"))?;
    let (collector, http, query) = collector(bin, &work.join("store"))?;
    let collector_pid = collector.0.id();
    let (sink_port, sink) = otlp_sink::start()?;
    let metrics_port = free_port();

    let levels = [
        Level::Saturated,
        Level::SaturatedTls,
        Level::Paced(10_000),
        Level::Paced(20_000),
        Level::OneConnection,
        Level::Paced(1_000),
    ];

    let mut results: Vec<Run> = Vec::new();
    for round in 0..args.rounds {
        for &level in &levels {
            for &mode in Mode::for_level(level) {
                let export_port = match mode {
                    Mode::CollectorElsewhere
                    | Mode::Sampled(_)
                    | Mode::MetricsOnly
                    | Mode::SampledInKernel(_) => sink_port,
                    _ => http,
                };
                let agent = if mode != Mode::Untraced {
                    let mut cmd = agent_command(bin, export_port, &nginx);
                    cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
                        .args(&args.agent_args);
                    if let Mode::Sampled(percent) | Mode::SampledInKernel(percent) = mode {
                        cmd.args(["--sample", &(f64::from(percent) / 100.0).to_string()]);
                    }
                    if let Mode::SampledInKernel(_) = mode {
                        cmd.arg("--sample-in-kernel");
                    }
                    if mode == Mode::MetricsOnly {
                        cmd.arg("--metrics-only");
                    }
                    Some(start_ready(cmd, "tracer: ready")?)
                } else {
                    None
                };
                let before_spans = metric(query, "tracer_collector_spans_accepted_total");
                let agent_cpu0 = agent
                    .as_ref()
                    .map_or(0.0, |a| threads_cpu_seconds(a.0.id()));
                let collector_cpu0 = cpu_seconds(collector_pid);
                let w = wrk(&nginx, args.seconds, level, work)?;
                let mut run = Run {
                    level,
                    mode,
                    wrk: w,
                    agent_cpu_us_per_req: 0.0,
                    collector_cpu_us_per_req: 0.0,
                    agent_peak_mib: 0.0,
                    ringbuf_drops: 0,
                    table_drops: 0,
                    export_drops: 0,
                    spans_built: 0,
                    spans_exported: 0,
                    spans_unsampled: 0,
                    red_server_requests: 0,
                    collector_spans: 0,
                };
                if let Some(a) = &agent {
                    drain(metrics_port);
                    let pid = a.0.id();
                    let per_req = |s: f64| s * 1e6 / w.requests as f64;
                    run.agent_cpu_us_per_req = per_req(threads_cpu_seconds(pid) - agent_cpu0);
                    if mode == Mode::Traced {
                        run.collector_cpu_us_per_req =
                            per_req(cpu_seconds(collector_pid) - collector_cpu0);
                    }
                    run.agent_peak_mib = peak_rss_mib(pid);
                    run.ringbuf_drops = metric(metrics_port, "tracer_ringbuf_dropped_total");
                    run.table_drops = metric(metrics_port, "tracer_conn_table_dropped_total");
                    run.export_drops =
                        metric(metrics_port, "tracer_export_dropped_queue_full_total")
                            + metric(metrics_port, "tracer_export_dropped_rejected_total");
                    run.spans_built = metric(metrics_port, "tracer_spans_total");
                    run.spans_exported = metric(metrics_port, "tracer_spans_exported_total");
                    run.spans_unsampled = metric(metrics_port, "tracer_spans_unsampled_total");
                    run.red_server_requests =
                        metric_sum(metrics_port, "http_server_request_duration_seconds_count");
                    if mode == Mode::Traced {
                        run.collector_spans =
                            metric(query, "tracer_collector_spans_accepted_total")
                                .saturating_sub(before_spans);
                    }
                }
                drop(agent);
                let target = match level {
                    Level::Paced(t) => format!(" (target {t})"),
                    Level::Saturated | Level::SaturatedTls | Level::OneConnection => String::new(),
                };
                eprintln!(
                    "round {} {:<10} {:<27} {:>7.0} req/s{target:<15} p50 {:>6.1} us  p99 {:>7.1} us{}",
                    round + 1,
                    level.name(),
                    mode.name(),
                    w.rps,
                    w.p50_us,
                    w.p99_us,
                    if mode == Mode::Untraced {
                        String::new()
                    } else {
                        let (collector_cpu, delivered) = match mode {
                            Mode::Traced => (
                                format!("collector {:.2} us/req; ", run.collector_cpu_us_per_req),
                                format!(", collector got {}", run.collector_spans),
                            ),
                            _ => (String::new(), " to the sink".to_owned()),
                        };
                        format!(
                            "  agent {:.2} us/req, peak {:.1} MiB; {collector_cpu}drops ringbuf \
                             {} tables {} export {}; {} requests, spans built {}, exported \
                             {}{delivered}",
                            run.agent_cpu_us_per_req,
                            run.agent_peak_mib,
                            run.ringbuf_drops,
                            run.table_drops,
                            run.export_drops,
                            w.requests,
                            run.spans_built,
                            run.spans_exported,
                        )
                    }
                );
                results.push(run);
            }
        }
    }
    let breakdown = breakdown::measure(
        bin,
        args.compare_bin.as_deref(),
        work,
        &nginx,
        (sink_port, &sink),
        args.rounds,
        args.seconds,
    )?;
    let replay = replay_cost(bin, work, &nginx, http, args.seconds)?;
    let idle_ms_per_s = idle_cost(bin, &nginx, http, args)?;
    drop(nginx);
    drop(collector);

    let syscall = kernel_cost(bin, work)?;
    let ingest = collector_ingest(bin, work, args.seconds)?;

    let pick = |level: Level, mode: Mode, f: &dyn Fn(&Run) -> f64| -> f64 {
        median(
            results
                .iter()
                .filter(|r| r.level == level && r.mode == mode)
                .map(f)
                .collect(),
        )
    };
    let rps = |level, mode| pick(level, mode, &|r| r.wrk.rps);
    let p50 = |level, mode| pick(level, mode, &|r| r.wrk.p50_us);
    let p99 = |level, mode| pick(level, mode, &|r| r.wrk.p99_us);
    let (untraced, traced, elsewhere) = (Mode::Untraced, Mode::Traced, Mode::CollectorElsewhere);

    println!(
        "\n== tracer overhead: median of {} round(s), {} s per run; traced = agent on, exporting to \
         the collector on the same 2 cores, or to a sink standing in for a collector elsewhere ==",
        args.rounds, args.seconds
    );
    if !args.agent_args.is_empty() {
        println!(
            "(the traced agents ran with: {})",
            args.agent_args.join(" ")
        );
    }
    println!(
        "{:<10} {:>6} {:>5} | {:>8} {:>8} {:>8} | {:<11} {:>8} {:>8} {:>8} | {:>13} {:>13}",
        "load",
        "target",
        "conns",
        "untraced",
        "p50 us",
        "p99 us",
        "collector",
        "traced",
        "p50 us",
        "p99 us",
        "agent CPU",
        "collector CPU"
    );
    for &level in &levels {
        for &mode in &Mode::for_level(level)[1..] {
            println!(
                "{:<10} {:>6} {:>5} | {:>8.0} {:>8.1} {:>8.1} | {:<11} {:>8.0} {:>8.1} {:>8.1} | {:>10.2} us {:>13}",
                level.name(),
                match level {
                    Level::Paced(t) => t.to_string(),
                    Level::Saturated | Level::SaturatedTls | Level::OneConnection => {
                        "-".to_owned()
                    }
                },
                level.connections(),
                rps(level, untraced),
                p50(level, untraced),
                p99(level, untraced),
                mode.column(),
                rps(level, mode),
                p50(level, mode),
                p99(level, mode),
                pick(level, mode, &|r| r.agent_cpu_us_per_req),
                if mode == traced {
                    format!("{:.2} us", pick(level, mode, &|r| r.collector_cpu_us_per_req))
                } else {
                    "-".to_owned()
                },
            );
        }
    }
    println!(
        "(req/s achieved; CPU = CPU time per request: the agent's threads' run time, the \
         collector's utime + stime; \"elsewhere\": the agent exports to a sink that reads and discards, as if the \
         collector ran on another machine)"
    );
    for (sat, over) in [(Level::Saturated, ""), (Level::SaturatedTls, " over TLS")] {
        for &mode in &Mode::for_level(sat)[1..] {
            println!(
                "{}{:.3}  ({:.0} vs {:.0} req/s; agent {:.2} us a request)",
                label(&format!(
                    "throughput at saturation{over}, traced / untraced{}",
                    match mode {
                        Mode::Traced => String::new(),
                        Mode::CollectorElsewhere => ", collector elsewhere".to_owned(),
                        _ => format!(", {}", mode.name()),
                    }
                )),
                rps(sat, mode) / rps(sat, untraced),
                rps(sat, mode),
                rps(sat, untraced),
                pick(sat, mode, &|r| r.agent_cpu_us_per_req),
            );
        }
    }
    for &level in &levels {
        let Level::Paced(target) = level else {
            continue;
        };
        for &mode in &Mode::for_level(level)[1..] {
            println!(
                "{}p50 {:+.1} us, p99 {:+.1} us",
                label(&format!(
                    "latency added at {target} req/s{}",
                    if mode == traced {
                        ""
                    } else {
                        ", collector elsewhere"
                    }
                )),
                p50(level, mode) - p50(level, untraced),
                p99(level, mode) - p99(level, untraced),
            );
        }
        for &mode in Mode::for_level(level) {
            let got = rps(level, mode);
            if (got / f64::from(target) - 1.0).abs() > 0.1 {
                println!(
                    "  note: {} {} reached {got:.0} req/s, not {target}: this machine is \
                     saturated there, so the latencies above include queueing",
                    level.name(),
                    mode.name(),
                );
            }
        }
    }
    let one = Level::OneConnection;
    for mode in [traced, elsewhere] {
        println!(
            "{}p50 {:+.1} us, p99 {:+.1} us  ({:.0} -> {:.0} req/s)",
            label(&format!(
                "latency added, one connection{}",
                if mode == traced {
                    ", closed loop"
                } else {
                    ", collector elsewhere"
                }
            )),
            p50(one, mode) - p50(one, untraced),
            p99(one, mode) - p99(one, untraced),
            rps(one, untraced),
            rps(one, mode),
        );
    }
    let sink_requests = sink.requests.load(Relaxed);
    println!(
        "  (the sink read {sink_requests} requests, {:.1} MiB{})",
        sink.bytes.load(Relaxed) as f64 / (1024.0 * 1024.0),
        match sink.bad.load(Relaxed) {
            0 => String::new(),
            bad => format!("; {bad} it could not read"),
        }
    );
    let live = pick(Level::Paced(10_000), traced, &|r| r.agent_cpu_us_per_req);
    let replayed = replay.ns_per_span * 2.0 / 1000.0;
    println!(
        "{}{:.2} us a request ({:.0} ns a record, {:.0} a span); live at 10k req/s {:.2} us, \
         {:.1}x",
        label("agent pipeline alone (tracer replay)"),
        replayed,
        replay.ns_per_record,
        replay.ns_per_span,
        live,
        live / replayed
    );
    println!(
        "  (the {} records of {} s at 10k req/s, replayed 3 times through pairing, spans and OTLP \
         encoding: no probes, no export, warm caches; the rest of the live figure is the export, \
         the runtime and the wake-ups: see the README)",
        replay.records, REPLAY_SECONDS
    );
    println!(
        "{}{:.2} ms of CPU a second ({:.3}% of a CPU; {} s, the agent as in the traced runs, \
         no requests)",
        label("agent CPU with no traffic"),
        idle_ms_per_s,
        idle_ms_per_s / 10.0,
        args.seconds
    );
    println!(
        "{}{:.1} MiB",
        label("agent peak memory (VmHWM)"),
        results.iter().map(|r| r.agent_peak_mib).fold(0.0, f64::max)
    );
    print_kernel_cost(&syscall);
    println!(
        "{}{:.0} spans/s wall, {:.0} spans per CPU-second",
        label("collector ingest (OTLP/HTTP protobuf -> store)"),
        ingest.spans as f64 / ingest.seconds,
        ingest.spans as f64 / ingest.collector_cpu_s
    );
    println!(
        "  ({} spans acknowledged, {} requests of {INGEST_BATCH} spans from {INGEST_CLIENTS} \
         clients in {:.1} s; collector {:.2} CPU-s, peak {:.0} MiB; generator {:.2} CPU-s{})",
        ingest.spans,
        ingest.requests,
        ingest.seconds,
        ingest.collector_cpu_s,
        ingest.collector_peak_mib,
        ingest.generator_cpu_s,
        if ingest.errors > 0 {
            format!("; {} requests refused", ingest.errors)
        } else {
            String::new()
        }
    );
    println!(
        "spans in the traced runs, all rounds (2 per request expected: wrk's client side, nginx's \
         server side)"
    );
    for &level in &levels {
        for &mode in &Mode::for_level(level)[1..] {
            let rs: Vec<&Run> = results
                .iter()
                .filter(|r| r.level == level && r.mode == mode)
                .collect();
            let sum = |f: &dyn Fn(&Run) -> u64| rs.iter().map(|r| f(r)).sum::<u64>();
            // Every span built is either delivered or counted as an export drop. The collector
            // counts what it accepted; the sink does not decode, so there the agent's count of
            // acknowledged spans stands for it.
            let (delivered, at) = match mode {
                Mode::CollectorElsewhere
                | Mode::Sampled(_)
                | Mode::MetricsOnly
                | Mode::SampledInKernel(_) => (sum(&|r| r.spans_exported), "at the sink"),
                _ => (sum(&|r| r.collector_spans), "at the collector"),
            };
            let unsampled = sum(&|r| r.spans_unsampled);
            let unaccounted = sum(&|r| r.spans_built) as i64
                - delivered as i64
                - unsampled as i64
                - sum(&|r| r.export_drops) as i64;
            println!(
                "  {:<10} {:<11} requests {} (RED metrics: nginx served {}), spans built {}, \
                 {at} {delivered}{} (unaccounted {unaccounted}); drops: ring buffer {}, \
                 connection table {}, export {}",
                level.name(),
                mode.column(),
                sum(&|r| r.wrk.requests),
                sum(&|r| r.red_server_requests),
                sum(&|r| r.spans_built),
                if unsampled > 0 {
                    format!(", unsampled {unsampled}")
                } else {
                    String::new()
                },
                sum(&|r| r.ringbuf_drops),
                sum(&|r| r.table_drops),
                sum(&|r| r.export_drops),
            );
        }
    }
    // The budget's zero-drop line is about the highest paced rate.
    let top_rate = levels
        .iter()
        .filter_map(|l| match l {
            Level::Paced(rate) => Some(*rate),
            _ => None,
        })
        .max();
    if let Some(target) = top_rate {
        let top = Level::Paced(target);
        let drops: u64 = results
            .iter()
            .filter(|r| r.level == top && r.mode == traced)
            .map(|r| r.ringbuf_drops + r.table_drops + r.export_drops)
            .sum();
        let got = rps(top, traced);
        let verdict = if drops > 0 {
            format!("NOT met: {drops} dropped at {got:.0} req/s traced")
        } else if got < 0.9 * f64::from(target) {
            format!(
                "not shown: 0 dropped, but the traced run reached only {got:.0} req/s on this \
                 machine"
            )
        } else {
            format!("met: 0 dropped at {got:.0} req/s traced")
        };
        println!(
            "{}{verdict}",
            label(&format!("budget: zero drops at {target} req/s"))
        );
    }
    println!("(store query latency: cargo bench -p tracer-store)");
    breakdown.print();
    Ok(())
}

/// The agent's own work on real records, without the probes, the ring buffer or the export.
struct Replay {
    records: u64,
    ns_per_record: f64,
    ns_per_span: f64,
}

const REPLAY_SECONDS: u64 = 3;

/// `tracer agent` tracing nginx's two ports and exporting to `export_port` on this host,
/// logging warnings only.
fn agent_command(bin: &Path, export_port: u16, nginx: &Nginx) -> Command {
    agent_tracing(bin, export_port, &[nginx.port, nginx.tls_port])
}

/// The agent tracing `ports`, exporting to `export_port` on this host.
pub(crate) fn agent_tracing(bin: &Path, export_port: u16, ports: &[u16]) -> Command {
    let mut cmd = Command::new(bin.join("tracer"));
    cmd.args([
        "agent",
        "--endpoint",
        &format!("http://127.0.0.1:{export_port}"),
    ])
    .env("RUST_LOG", "warn");
    for port in ports {
        cmd.args(["--port", &port.to_string()]);
    }
    cmd
}

/// The agent's CPU with nothing to trace, in ms a second: its timers and the priority
/// watchdog, what a quiet host of a fleet pays.
fn idle_cost(bin: &Path, nginx: &Nginx, http: u16, args: &BenchArgs) -> anyhow::Result<f64> {
    let mut cmd = agent_command(bin, http, nginx);
    cmd.args(["--metrics-addr", "off"]).args(&args.agent_args);
    let agent = start_ready(cmd, "tracer: ready")?;
    // Past the start-up work and the drain timer's back-off.
    std::thread::sleep(Duration::from_secs(3));
    let cpu0 = threads_cpu_seconds(agent.0.id());
    std::thread::sleep(Duration::from_secs(args.seconds));
    let cpu = threads_cpu_seconds(agent.0.id()) - cpu0;
    Ok(cpu * 1e3 / args.seconds as f64)
}

/// The time a process's live threads have run, from the scheduler's nanosecond counts
/// (`/proc/<pid>/task/*/schedstat`): `cpu_seconds`'s clock ticks are 10 ms, as much as an idle
/// agent uses in seconds, or a run at 1k req/s in a few. The agent's threads live as long as
/// it does (the drain and export thread, the priority watchdog).
pub(crate) fn threads_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// Records `REPLAY_SECONDS` of nginx at 10k req/s with `tracer agent --record`, then runs
/// `tracer replay` on them.
fn replay_cost(
    bin: &Path,
    work: &Path,
    nginx: &Nginx,
    collector_http: u16,
    seconds: u64,
) -> anyhow::Result<Replay> {
    let file = work.join("records.bin");
    // --record writes a new file only.
    let _ = std::fs::remove_file(&file);
    let mut cmd = agent_command(bin, collector_http, nginx);
    cmd.arg("--record").arg(&file);
    let agent = start_ready(cmd, "tracer: ready")?;
    wrk(
        nginx,
        REPLAY_SECONDS.min(seconds),
        Level::Paced(10_000),
        work,
    )?;
    // Stopping the agent flushes the recording.
    drop(agent);
    let out = Command::new(bin.join("tracer"))
        .arg("replay")
        .arg(&file)
        .args(["--port", &nginx.port.to_string(), "--repeat", "3"])
        .output()
        .context("running tracer replay")?;
    // The records hold payload prefixes of the traffic.
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "tracer replay failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "replayed N records x 3: ... CPU X ns per record, Y ns per span (...)"
    let number_before = |marker: &str| -> Option<f64> {
        let head = &text[..text.find(marker)?];
        head.rsplit(' ').next()?.parse().ok()
    };
    let parsed = (|| {
        Some(Replay {
            records: text
                .strip_prefix("replayed ")?
                .split(' ')
                .next()?
                .parse()
                .ok()?,
            ns_per_record: number_before(" ns per record")?,
            ns_per_span: number_before(" ns per span")?,
        })
    })();
    parsed.with_context(|| format!("unexpected output from tracer replay: {text}"))
}

/// What the probes cost per syscall, measured with a loopback ping-pong inside this process.
struct KernelCost {
    /// Per read or write on a connection the agent traces (HTTP-shaped messages).
    traced_ns: f64,
    /// Per read or write on a connection the agent ignores (muted after its first bytes are
    /// seen not to be HTTP): the price every other TCP connection on the host pays.
    ignored_ns: f64,
    /// Time inside the probe programs per traced syscall (entry + exit), from the kernel's
    /// own BPF run-time statistics; `None` if bpftool is missing.
    program_ns: Option<f64>,
    /// The same, in a loop where one thread owns both ends of the connection: no context
    /// switch between calls, so the programs run on warm caches.
    program_warm_ns: Option<f64>,
    /// Per traced syscall in that loop, on − off.
    traced_warm_ns: f64,
    /// What every other syscall of the host pays: `getppid` (the programs' first test) and a
    /// one-byte write to /dev/null (a write on a file: entry stamp, fd lookup, not a socket).
    getppid_ns: f64,
    file_write_ns: f64,
    /// Records the ring buffer dropped during the traced runs (should be 0: a drop makes the
    /// traced figure look cheaper than it is).
    ringbuf_drops: u64,
    /// Per `SSL_read` call (on a session that was never connected, so the call itself does
    /// almost nothing), on − off: the price of the TLS uprobes' entry and return traps, which
    /// every call of a process using libssl pays. `None` without libssl.so.3.
    ssl_call_ns: Option<f64>,
}

const SSL_CALLS: u32 = 100_000;

/// Nanoseconds per `SSL_read` on an unconnected session, on a thread pinned to `cpu`, calling
/// the system libssl (dlopen), or `None` if it is not there.
fn ssl_read_loop(cpu: usize) -> Option<f64> {
    std::thread::spawn(move || ssl_read_calls(cpu))
        .join()
        .ok()
        .flatten()
}

fn ssl_read_calls(cpu: usize) -> Option<f64> {
    type NoArg = unsafe extern "C" fn() -> *mut libc::c_void;
    type OneArg = unsafe extern "C" fn(*mut libc::c_void) -> *mut libc::c_void;
    type Read = unsafe extern "C" fn(*mut libc::c_void, *mut u8, i32) -> i32;
    // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to its C signature
    // (OpenSSL 3's public API); the session is used only for SSL_read, which fails at once on
    // a session with no connection.
    unsafe {
        let lib = libc::dlopen(c"libssl.so.3".as_ptr(), libc::RTLD_NOW);
        if lib.is_null() {
            return None;
        }
        let sym = |name: &std::ffi::CStr| libc::dlsym(lib, name.as_ptr());
        let (method, ctx_new, ssl_new, read) = (
            sym(c"TLS_client_method"),
            sym(c"SSL_CTX_new"),
            sym(c"SSL_new"),
            sym(c"SSL_read"),
        );
        if [method, ctx_new, ssl_new, read].iter().any(|p| p.is_null()) {
            return None;
        }
        let method: NoArg = std::mem::transmute(method);
        let ctx_new: OneArg = std::mem::transmute(ctx_new);
        let ssl_new: OneArg = std::mem::transmute(ssl_new);
        let read: Read = std::mem::transmute(read);
        let ssl = ssl_new(ctx_new(method()));
        if ssl.is_null() {
            return None;
        }
        pin_thread(cpu);
        let mut buf = [0u8; 64];
        let start = Instant::now();
        for _ in 0..SSL_CALLS {
            read(ssl, buf.as_mut_ptr(), buf.len() as i32);
        }
        Some(start.elapsed().as_nanos() as f64 / f64::from(SSL_CALLS))
    }
}

const UNTRACED_CALLS: u32 = 500_000;

/// Nanoseconds per call of `what` on `cpu`, over `UNTRACED_CALLS` calls.
fn syscall_loop(cpu: usize, file_write: bool) -> anyhow::Result<f64> {
    std::thread::spawn(move || -> anyhow::Result<f64> {
        pin_thread(cpu);
        let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        let start = Instant::now();
        for _ in 0..UNTRACED_CALLS {
            if file_write {
                null.write_all(b"x")?;
            } else {
                // SAFETY: getppid has no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
        }
        Ok(start.elapsed().as_nanos() as f64 / f64::from(UNTRACED_CALLS))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("syscall loop panicked"))?
}

const PING_ROUND_TRIPS: u32 = 50_000;
/// Probes off, then on, this many times: single runs in a VM vary by 20%, so many short
/// alternations give steadier medians than a few long ones.
const KERNEL_ALTERNATIONS: usize = 7;

/// Pins process `pid` (all its threads present now) to `cpu`.
fn pin_process(pid: u32, cpu: usize) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; affinity of this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The exchange the kernel-cost loops repeat on a traced connection.
const PING_REQUEST: &[u8] = b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n";
const PING_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// Nanoseconds per syscall of a loopback ping-pong: a request/response pair of HTTP-shaped
/// messages (or single bytes), 4 syscalls a round trip. Both threads run on `cpu`: a
/// cross-CPU wakeup per message would cost more than what is being measured, and vary more.
fn ping_pong(http: bool, cpu: usize) -> anyhow::Result<f64> {
    let (req, resp): (&[u8], &'static [u8]) = if http {
        (PING_REQUEST, PING_RESPONSE)
    } else {
        (b"p", b"q")
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let req_len = req.len();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        pin_thread(cpu);
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = vec![0u8; req_len];
        for _ in 0..PING_ROUND_TRIPS {
            s.read_exact(&mut b)?;
            s.write_all(resp)?;
        }
        Ok(())
    });
    let result = std::thread::spawn(move || -> anyhow::Result<f64> {
        pin_thread(cpu);
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_nodelay(true)?;
        let mut b = vec![0u8; resp.len()];
        let start = Instant::now();
        for _ in 0..PING_ROUND_TRIPS {
            c.write_all(req)?;
            c.read_exact(&mut b)?;
        }
        Ok(start.elapsed().as_nanos() as f64 / (4.0 * f64::from(PING_ROUND_TRIPS)))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("ping client panicked"))??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("ping server panicked"))??;
    Ok(result)
}

/// Nanoseconds per syscall of a loopback exchange in which one thread owns both ends: it writes
/// the request, reads it at the server end, writes the response, reads it at the client end.
/// Loopback delivers during the write, so no call blocks and no context switch comes between
/// them: the probes' cost on warm caches.
fn one_thread_exchange(cpu: usize) -> anyhow::Result<f64> {
    std::thread::spawn(move || -> anyhow::Result<f64> {
        pin_thread(cpu);
        let (req, resp) = (PING_REQUEST, PING_RESPONSE);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut client = TcpStream::connect(listener.local_addr()?)?;
        let (mut server, _) = listener.accept()?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let mut b = [0u8; 64];
        let start = Instant::now();
        for _ in 0..PING_ROUND_TRIPS {
            client.write_all(req)?;
            server.read_exact(&mut b[..req.len()])?;
            server.write_all(resp)?;
            client.read_exact(&mut b[..resp.len()])?;
        }
        Ok(start.elapsed().as_nanos() as f64 / (4.0 * f64::from(PING_ROUND_TRIPS)))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("one-thread exchange panicked"))?
}

fn label(s: &str) -> String {
    format!("{s:<58} ")
}

fn print_kernel_cost(syscall: &KernelCost) {
    println!(
        "{}{:.0} ns  (on an ignored connection {:.0} ns{}; ring-buffer drops {})",
        label("kernel cost per traced syscall"),
        syscall.traced_ns,
        syscall.ignored_ns,
        syscall.program_ns.map_or(String::new(), |p| format!(
            "; inside the probe programs {p:.0} ns"
        )),
        syscall.ringbuf_drops
    );
    println!(
        "{}{:.0} ns  (one thread owns both ends: no context switch{})",
        label("kernel cost per traced syscall, warm caches"),
        syscall.traced_warm_ns,
        syscall.program_warm_ns.map_or(String::new(), |p| format!(
            "; inside the probe programs {p:.0} ns"
        )),
    );
    println!(
        "{}getppid {:.0} ns, 1-byte write to /dev/null {:.0} ns",
        label("kernel cost per untraced syscall"),
        syscall.getppid_ns,
        syscall.file_write_ns
    );
    if let Some(ns) = syscall.ssl_call_ns {
        println!(
            "{}{ns:.0} ns  (an SSL_read that does nothing, with the uprobes on its entry and \
             return, minus without)",
            label("TLS uprobes per OpenSSL call")
        );
    }
}

/// Total run time of the agent's probe programs (`bpftool prog show`), nanoseconds.
pub(crate) fn program_time_ns() -> Option<f64> {
    Some(probe_programs()?.iter().map(|(_, ns)| ns).sum())
}

/// The agent's probe programs: those on syscall tracepoints (named `sys_enter_*` /
/// `sys_exit_*`) and `--sample-in-kernel`'s sock_ops carrier (`carry_decisions`, cut to the
/// kernel's 15 characters), each with its run time in nanoseconds; `None` if bpftool is
/// missing.
fn probe_programs() -> Option<Vec<(String, f64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // A dependency-free scan of the JSON array: each program is one object.
    let mut programs = Vec::new();
    for obj in text.split("},{") {
        let field = |key: &str| -> Option<&str> {
            let at = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
            let rest = obj[at..].trim_start_matches('"');
            let end = rest.find([',', '"', '}']).unwrap_or(rest.len());
            Some(&rest[..end])
        };
        let Some(name) = field("name") else { continue };
        if !["sys_enter_", "sys_exit_", "carry_decision"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let time = field("run_time_ns")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        programs.push((name.to_owned(), time));
    }
    Some(programs)
}

/// The kernel's run-time statistics of BPF programs (`kernel.bpf_stats_enabled`) while this
/// lives: they cost two clock reads a program run, so they are on only where read.
pub(crate) struct BpfStats;

impl BpfStats {
    const SYSCTL: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    /// `None` where the kernel does not let this process turn them on.
    pub(crate) fn enable() -> Option<BpfStats> {
        std::fs::write(Self::SYSCTL, "1").ok().map(|()| BpfStats)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, "0");
    }
}

/// Refuses to measure while programs are already attached to syscall tracepoints: an agent left
/// running (or another tracer) slows the untraced runs as well, and its programs would count in
/// the probes' time. A run made with an agent left running reported untraced nginx at 60.6k req/s
/// instead of 67.2k, and the probes at ~1,000 ns a syscall instead of ~770.
fn check_no_syscall_probes() -> anyhow::Result<()> {
    let Some(programs) = probe_programs() else {
        // bpftool is missing: the kernel figures say so where they need it.
        return Ok(());
    };
    if programs.is_empty() {
        return Ok(());
    }
    let mut names: Vec<&str> = programs.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    anyhow::bail!(
        "{} BPF programs are already attached to syscall tracepoints ({}{}): another `tracer \
         agent`, or another tracing tool, is running. The untraced runs would pay for its probes \
         and the probe figures would include them. Stop it (`pgrep -af agent` finds a tracer \
         agent) and run the bench again.",
        programs.len(),
        names[..names.len().min(4)].join(", "),
        if names.len() > 4 { ", ..." } else { "" }
    )
}

/// The kernel side's cost: ping-pong with the probes detached, then attached with the agent
/// tracing this process (its spans printed to /dev/null, the agent itself on another CPU).
/// Alternated `KERNEL_ALTERNATIONS` times; medians.
fn kernel_cost(bin: &Path, work: &Path) -> anyhow::Result<KernelCost> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ping_cpu = cpus - 1;
    let (mut off, mut traced, mut ignored_off, mut ignored) = (vec![], vec![], vec![], vec![]);
    let (mut program_ns, mut program_warm_ns) = (Vec::new(), Vec::new());
    let (mut warm_off, mut warm_on) = (vec![], vec![]);
    let (mut getppid_off, mut getppid_on, mut write_off, mut write_on) =
        (vec![], vec![], vec![], vec![]);
    let (mut ssl_off, mut ssl_on) = (vec![], vec![]);
    let mut ringbuf_drops = 0;
    // The agent exports to a collector, both on the other CPU: `--stdout` (JSON per span) could
    // not keep up with the ping-pong, and a dropped record makes a traced call look cheaper.
    let (collector, http, _) = collector(bin, &work.join("kernel-store"))?;
    pin_process(collector.0.id(), 0);
    for _ in 0..KERNEL_ALTERNATIONS {
        off.push(ping_pong(true, ping_cpu)?);
        ignored_off.push(ping_pong(false, ping_cpu)?);
        getppid_off.push(syscall_loop(ping_cpu, false)?);
        write_off.push(syscall_loop(ping_cpu, true)?);
        warm_off.push(one_thread_exchange(ping_cpu)?);
        ssl_off.extend(ssl_read_loop(ping_cpu));
        let metrics_port = free_port();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(bin.join("tracer"))
            .args(["agent", "--endpoint", &format!("http://127.0.0.1:{http}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--pid", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .env("RUST_LOG", "warn");
        let agent = start_ready(cmd, "tracer: ready")?;
        // Untraced and ignored first, while the agent is idle: its work on the other CPU
        // (possibly a hyperthread of the same core) would slow these runs and inflate them.
        getppid_on.push(syscall_loop(ping_cpu, false)?);
        write_on.push(syscall_loop(ping_cpu, true)?);
        ssl_on.extend(ssl_read_loop(ping_cpu));
        ignored.push(ping_pong(false, ping_cpu)?);
        traced.push(ping_pong(true, ping_cpu)?);
        warm_on.push(one_thread_exchange(ping_cpu)?);
        // Program time on its own run: the statistics add two clock reads per program run.
        if let Some(_stats) = BpfStats::enable() {
            // Per traced syscall; includes the programs' runs for the other processes' calls
            // of the traced syscalls in that time (the agent's own exit early).
            let before = program_time_ns();
            ping_pong(true, ping_cpu)?;
            let after = program_time_ns();
            if let (Some(t0), Some(t1)) = (before, after) {
                program_ns.push((t1 - t0) / (4.0 * f64::from(PING_ROUND_TRIPS)));
            }
            one_thread_exchange(ping_cpu)?;
            if let (Some(t0), Some(t1)) = (after, program_time_ns()) {
                program_warm_ns.push((t1 - t0) / (4.0 * f64::from(PING_ROUND_TRIPS)));
            }
        }
        // The probes count a drop when a reserve fails, so the counter is current; the agent
        // publishes it once a second.
        std::thread::sleep(Duration::from_millis(1500));
        ringbuf_drops += metric(metrics_port, "tracer_ringbuf_dropped_total");
        drop(agent);
    }
    Ok(KernelCost {
        traced_ns: median(traced) - median(off),
        ignored_ns: median(ignored) - median(ignored_off),
        program_ns: (!program_ns.is_empty()).then(|| median(program_ns)),
        program_warm_ns: (!program_warm_ns.is_empty()).then(|| median(program_warm_ns)),
        traced_warm_ns: median(warm_on) - median(warm_off),
        getppid_ns: median(getppid_on) - median(getppid_off),
        file_write_ns: median(write_on) - median(write_off),
        ringbuf_drops,
        ssl_call_ns: (!ssl_on.is_empty() && !ssl_off.is_empty())
            .then(|| median(ssl_on) - median(ssl_off)),
    })
}

// ---- Collector ingest: an OTLP/HTTP load generator -------------------------------------------

const INGEST_BATCH: usize = 512;
const INGEST_RESOURCES: usize = 4;
const INGEST_CLIENTS: usize = 3;
/// Distinct pre-encoded bodies per client, cycled through (ids and times are patched anyway).
const INGEST_TEMPLATES: usize = 4;

/// splitmix64's finalizer: a bijection on u64, so distinct inputs give distinct ids.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Where one span's ids and times sit in an encoded request.
struct SpanSlots {
    trace_id: usize,
    span_id: usize,
    start: usize,
    end: usize,
    duration_ns: u64,
}

/// One complete HTTP request (headers and protobuf body) and where to patch it.
struct Template {
    bytes: Vec<u8>,
    slots: Vec<SpanSlots>,
}

/// An `ExportTraceServiceRequest` shaped like the agent's: HTTP server spans with the
/// attributes it sets, grouped by process resource.
fn ingest_template(rng: &mut Rng, port: u16) -> anyhow::Result<Template> {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{any_value::Value, AnyValue, InstrumentationScope, KeyValue},
        resource::v1::Resource,
        trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
    };
    use prost::Message as _;

    let s = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..Default::default()
    };
    let i = |k: &str, v: i64| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(v)),
        }),
        ..Default::default()
    };
    let services = ["checkout", "catalog", "frontend", "accounts"];
    let exes = ["nginx", "python3", "node", "java"];
    let routes = [
        ("GET", "/api/v1/products/", true),
        ("GET", "/api/v1/users/", true),
        ("POST", "/api/v1/orders", false),
        ("GET", "/static/js/app.", true),
        ("GET", "/healthz", false),
        ("PUT", "/api/v1/carts/", true),
        ("GET", "/search", false),
    ];
    let agents = [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "curl/7.88.1",
        "python-requests/2.31.0",
        "Go-http-client/1.1",
    ];
    let now = now_unix_ns();
    // Template ids and times: random, so each can be found again in the encoded body.
    let mut resource_spans = Vec::new();
    for r in 0..INGEST_RESOURCES {
        let pid = 1000 + rng.below(60_000) as i64;
        let exe = exes[r % exes.len()];
        let resource = Resource {
            attributes: vec![
                s("service.name", services[r % services.len()]),
                s("service.instance.id", &format!("{:032x}", rng.next())),
                i("process.pid", pid),
                s("process.executable.name", exe),
                s("process.executable.path", &format!("/usr/bin/{exe}")),
                s(
                    "process.command_line",
                    &format!("/usr/bin/{exe} --config /etc/{exe}/{exe}.conf --workers 4"),
                ),
                s(
                    "process.linux.cgroup",
                    &format!("/system.slice/{}.service", services[r % services.len()]),
                ),
                s("host.name", "web-prod-eu-west-1a-07"),
                s("host.id", "4f2a9c1be3d84b7e9a0c5d6e7f8a9b0c"),
                s("host.arch", "amd64"),
                s("os.type", "linux"),
                s("os.version", "6.1.0-28-amd64"),
                i("host.cpu.count", 8),
            ],
            ..Default::default()
        };
        let mut spans = Vec::new();
        for _ in 0..INGEST_BATCH / INGEST_RESOURCES {
            let (method, route, with_id) = routes[rng.below(routes.len() as u64) as usize];
            let path = if with_id {
                format!("{route}{}", rng.below(100_000))
            } else {
                route.to_owned()
            };
            let template = if with_id {
                format!("{route}{{id}}")
            } else {
                route.to_owned()
            };
            let code = match rng.below(100) {
                0..=1 => 500,
                2..=5 => 404,
                6..=8 => 304,
                _ => 200,
            };
            let duration = 50_000 + rng.below(20_000_000);
            let start = now - rng.below(1_000_000_000) - duration;
            let peer = format!("10.0.{}.{}", rng.below(256), 1 + rng.below(254));
            let mut attributes = vec![
                s("http.request.method", method),
                s("url.path", &path),
                s("url.scheme", "http"),
                s("network.protocol.version", "1.1"),
                s("server.address", "shop.example.com"),
                i("server.port", 80),
                s("network.peer.address", &peer),
                i("network.peer.port", 32768 + rng.below(28_000) as i64),
                s("network.local.address", "10.0.0.7"),
                i("network.local.port", 80),
                i("http.request.size", 200 + rng.below(800) as i64),
                i("http.response.size", 100 + rng.below(20_000) as i64),
                s("client.address", &peer),
                s("user_agent.original", rng.pick(&agents)),
                i("http.response.status_code", code),
            ];
            let status = if code >= 500 {
                attributes.push(s("error.type", &code.to_string()));
                Status {
                    code: StatusCode::Error as i32,
                    message: String::new(),
                }
            } else {
                Status::default()
            };
            let mut trace_id = [0u8; 16];
            trace_id[..8].copy_from_slice(&rng.next().to_le_bytes());
            trace_id[8..].copy_from_slice(&rng.next().to_le_bytes());
            spans.push(Span {
                trace_id: trace_id.to_vec(),
                span_id: rng.next().to_le_bytes().to_vec(),
                name: format!("{method} {template}"),
                kind: SpanKind::Server as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: start + duration,
                attributes,
                status: Some(status),
                ..Default::default()
            });
        }
        resource_spans.push(ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tracer".into(),
                    version: "0.1.0".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    let req = ExportTraceServiceRequest { resource_spans };
    let body = req.encode_to_vec();
    let mut bytes = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    // Spans are encoded in order: find each one's fields after the previous one's.
    let mut slots = Vec::new();
    let mut at = 0;
    let find = |from: usize, needle: &[u8]| -> anyhow::Result<usize> {
        bytes[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| from + p)
            .context("a template field is missing from the encoded request")
    };
    for rs in &req.resource_spans {
        for sp in &rs.scope_spans[0].spans {
            let trace_id = find(at, &sp.trace_id)?;
            let span_id = find(trace_id, &sp.span_id)?;
            let start = find(span_id, &sp.start_time_unix_nano.to_le_bytes())?;
            let end = find(start, &sp.end_time_unix_nano.to_le_bytes())?;
            at = end + 8;
            slots.push(SpanSlots {
                trace_id,
                span_id,
                start,
                end,
                duration_ns: sp.end_time_unix_nano - sp.start_time_unix_nano,
            });
        }
    }
    Ok(Template { bytes, slots })
}

/// Gives every span of the template fresh unique ids (from `counter`) and recent times.
fn patch(t: &mut Template, counter: &mut u64, salt: u64) {
    let now = now_unix_ns();
    for (n, s) in t.slots.iter().enumerate() {
        let c = *counter;
        *counter += 1;
        let span_id = mix(c ^ salt).max(1);
        t.bytes[s.trace_id..s.trace_id + 8].copy_from_slice(&mix(c).to_le_bytes());
        t.bytes[s.trace_id + 8..s.trace_id + 16]
            .copy_from_slice(&mix(c.wrapping_add(salt)).to_le_bytes());
        t.bytes[s.span_id..s.span_id + 8].copy_from_slice(&span_id.to_le_bytes());
        let start = now - s.duration_ns - (n as u64) * 1000;
        t.bytes[s.start..s.start + 8].copy_from_slice(&start.to_le_bytes());
        t.bytes[s.end..s.end + 8].copy_from_slice(&(start + s.duration_ns).to_le_bytes());
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body: (status, body).
fn read_response(r: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("the collector closed the connection");
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("the collector closed the connection mid-response");
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length.context("a response without Content-Length")?];
    r.read_exact(&mut body)?;
    Ok((status, body))
}

#[derive(Default)]
struct ClientResult {
    spans: u64,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
}

fn ingest_client(
    port: u16,
    mut templates: Vec<Template>,
    id: u64,
    salt: u64,
    deadline: Instant,
) -> anyhow::Result<ClientResult> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut counter = id << 48;
    let mut res = ClientResult::default();
    let mut n = 0;
    while Instant::now() < deadline {
        let t = &mut templates[n % INGEST_TEMPLATES];
        n += 1;
        patch(t, &mut counter, salt);
        out.write_all(&t.bytes)?;
        let (status, body) = read_response(&mut reader)?;
        res.requests += 1;
        if status == 200 {
            res.spans += t.slots.len() as u64;
        } else {
            res.errors += 1;
            res.first_error
                .get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
    }
    Ok(res)
}

struct Ingest {
    spans: u64,
    requests: u64,
    errors: u64,
    seconds: f64,
    collector_cpu_s: f64,
    collector_peak_mib: f64,
    generator_cpu_s: f64,
}

/// A fresh collector's ingest rate under OTLP/HTTP protobuf load (see the module comment).
fn collector_ingest(bin: &Path, work: &Path, seconds: u64) -> anyhow::Result<Ingest> {
    let (collector, http, query) = collector(bin, &work.join("store-ingest"))?;
    let pid = collector.0.id();
    let mut rng = Rng(now_unix_ns() ^ u64::from(std::process::id()));
    let salt = rng.next();
    let mut per_client = Vec::new();
    for _ in 0..INGEST_CLIENTS {
        let ts = (0..INGEST_TEMPLATES)
            .map(|_| ingest_template(&mut rng, http))
            .collect::<anyhow::Result<Vec<_>>>()?;
        per_client.push(ts);
    }
    let body_kib = per_client[0][0].bytes.len() as f64 / 1024.0;
    let cpu0 = cpu_seconds(pid);
    let own0 = own_cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let handles: Vec<_> = per_client
        .into_iter()
        .enumerate()
        .map(|(n, ts)| {
            std::thread::spawn(move || ingest_client(http, ts, n as u64 + 1, salt, deadline))
        })
        .collect();
    let mut total = ClientResult::default();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("an ingest client panicked"))??;
        total.spans += r.spans;
        total.requests += r.requests;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let result = Ingest {
        spans: total.spans,
        requests: total.requests,
        errors: total.errors,
        seconds: elapsed,
        collector_cpu_s: cpu_seconds(pid) - cpu0,
        collector_peak_mib: peak_rss_mib(pid),
        generator_cpu_s: own_cpu_seconds() - own0,
    };
    let counted = metric(query, "tracer_collector_spans_accepted_total");
    eprintln!(
        "collector ingest: {} spans acknowledged ({} counted by the collector) in {} requests of {body_kib:.0} KiB, {:.1} s{}",
        result.spans,
        counted,
        result.requests,
        elapsed,
        total
            .first_error
            .map(|e| format!("; {} refused, first: {e}", result.errors))
            .unwrap_or_default()
    );
    if result.spans == 0 {
        bail!("the collector acknowledged no spans");
    }
    Ok(result)
}
