//! `cargo xtask bench`'s comparison with what users would install instead: the OpenTelemetry
//! SDK's zero-code instrumentation, on a service that does realistic work.
//!
//! The same small service in two runtimes whose SDK auto-instrumentation is standard:
//! Python (Flask on its threaded server, `opentelemetry-instrument`) and Node.js (`http` with
//! `fetch`, `--require @opentelemetry/auto-instrumentations-node/register`). A request,
//! `GET /work`, calls a data service over a keep-alive connection, then builds, serialises and
//! re-reads a JSON document of 200 items: about half a millisecond of work
//! (`test-support/peers/sdk_service.py`, `sdk-node/service.cjs`). Each service runs three ways,
//! alternated within each round: untraced, traced by the agent, instrumented by the SDK. The
//! agent and the SDK export OTLP/HTTP protobuf to the same sink, which stands in for a
//! collector on another machine and counts the spans delivered (`otlp_sink.rs`).
//!
//! Two load levels per runtime: saturated (wrk closed-loop, 16 connections) for the throughput
//! ratio, and paced at a realistic rate well inside the untraced capacity for the latency
//! added. Each run starts a fresh service process (and, traced, a fresh agent), warms it up
//! for 2 s (imports, JIT, connection pools), then measures. CPU a request is the service's
//! and the data service's, plus the agent's in its runs; memory is the peak resident size of the
//! service and of the agent. In the agent's runs, what tracing costs is also read where it is
//! spent: the probe programs' run time (the kernel's BPF statistics, on during those runs only)
//! and the agent's own CPU, each a request; on a service whose latency moves by more from run
//! to run than the agent adds, these are the figures that do not drown.
//!
//! Then the issue's goals for the agent (throughput ≥ 0.99 of untraced at saturation, p50 added
//! ≤ 20 µs at the paced rate, 5x less than the SDK's) are decided on one service process a
//! runtime and level: untraced and traced windows alternated (`Setup::alternate`), a goal met or
//! missed only when the 95% interval of the pairs' median is on one side of it (`goal_verdict`).
//! Each window also accounts the machine's CPU a request (the services, wrk, the agent, idle),
//! so that a throughput lost is placed: in the traced processes, in the agent, or in CPU left
//! idle. Spans a request counts what reached the sink, warm-up included,
//! after the service was stopped (the SDK flushes on exit) or the agent had exported all it
//! built. The agent traces the service's port and the data service's port: its spans are the
//! load client's, the service's SERVER and CLIENT, and the data service's SERVER; the SDK's are
//! the service's SERVER and CLIENT.
use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    bench::{
        cpu_seconds, drain, free_port, median, metric, peak_rss_mib, program_time_ns, start_ready,
        threads_cpu_seconds, wait_port, wrk_load, BpfStats, Killed, Wrk, RATE_PER_CONNECTION,
    },
    breakdown::machine_cpu_seconds,
    otlp_sink::{self, SinkCounts},
    run,
};

/// wrk connections at saturation: enough to keep both cores busy through the downstream call.
const SATURATED_CONNECTIONS: u32 = 16;
const WARM_UP_SECONDS: u64 = 2;

#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    Python,
    Node,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Python => "Python (Flask, opentelemetry-instrument)",
            Runtime::Node => "Node.js (http + fetch, auto-instrumentations-node)",
        }
    }

    /// The paced level: a fifth to a quarter of what the untraced service answers at
    /// saturation on the 2-core bench machine (Python ~550 req/s, Node ~4,000 req/s). Well
    /// inside capacity, because queueing multiplies whatever a request costs more: at a
    /// utilisation u the median wait grows about 1/(1-u)² times a request's added service
    /// time, ~5x at Python's former 300 req/s (55%), which then measured tracing's 20 µs of
    /// CPU as +40 to +440 µs of p50 from one run to the next.
    fn paced_rate(self) -> u32 {
        match self {
            Runtime::Python => 130,
            Runtime::Node => 800,
        }
    }

    /// The two load levels: saturated, then paced.
    fn loads(self) -> [Load; 2] {
        [Load::Saturated, Load::Paced(self.paced_rate())]
    }

    /// The service on `port`, calling the data service at `data`; with the SDK when `sdk`,
    /// exporting to the sink on `sink_port`.
    fn command(self, root: &Path, port: u16, data: u16, sdk: bool, sink_port: u16) -> Command {
        let peers = root.join("test-support/peers");
        let args = [port.to_string(), format!("127.0.0.1:{data}")];
        let mut cmd = match self {
            Runtime::Python => {
                let venv = root.join(PYTHON_VENV);
                let mut cmd = if sdk {
                    let mut c = Command::new(venv.join("bin/opentelemetry-instrument"));
                    c.arg(venv.join("bin/python"));
                    c
                } else {
                    Command::new(venv.join("bin/python"))
                };
                cmd.arg(peers.join("sdk_service.py"));
                cmd
            }
            Runtime::Node => {
                let dir = peers.join("sdk-node");
                let mut cmd = Command::new("node");
                if sdk {
                    cmd.args([
                        "--require",
                        "@opentelemetry/auto-instrumentations-node/register",
                    ]);
                }
                cmd.arg(dir.join("service.cjs")).current_dir(dir);
                cmd
            }
        };
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        if sdk {
            cmd.env("OTEL_SERVICE_NAME", "sdk-service")
                .env("OTEL_TRACES_EXPORTER", "otlp")
                .env("OTEL_METRICS_EXPORTER", "none")
                .env("OTEL_LOGS_EXPORTER", "none")
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
                .env(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    format!("http://127.0.0.1:{sink_port}/v1/traces"),
                )
                // The default detectors include cloud metadata lookups that time out here.
                .env("OTEL_NODE_RESOURCE_DETECTORS", "env,host,os,process");
        }
        cmd
    }

    /// How the service is stopped so that the SDK exports its last spans: Python runs its
    /// exit handlers on the KeyboardInterrupt of SIGINT, the Node SDK flushes on SIGTERM.
    fn stop_signal(self) -> i32 {
        match self {
            Runtime::Python => libc::SIGINT,
            Runtime::Node => libc::SIGTERM,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Tracing {
    Untraced,
    Agent,
    Sdk,
}

impl Tracing {
    const ALL: [Tracing; 3] = [Tracing::Untraced, Tracing::Agent, Tracing::Sdk];

    fn name(self) -> &'static str {
        match self {
            Tracing::Untraced => "untraced",
            Tracing::Agent => "tracer agent",
            Tracing::Sdk => "OTel SDK",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Saturated,
    Paced(u32),
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Saturated => "saturated".into(),
            Load::Paced(rate) => format!("paced {rate}/s"),
        }
    }

    fn connections(self) -> u32 {
        match self {
            Load::Saturated => SATURATED_CONNECTIONS,
            Load::Paced(rate) => rate.div_ceil(RATE_PER_CONNECTION).max(8),
        }
    }

    fn rate(self) -> Option<u32> {
        match self {
            Load::Saturated => None,
            Load::Paced(rate) => Some(rate),
        }
    }
}

struct Sample {
    runtime: Runtime,
    load: Load,
    tracing: Tracing,
    wrk: Wrk,
    /// The service's and the data service's CPU, and the agent's in its runs, µs a request.
    cpu_us_per_req: f64,
    /// The agent's runs: its own CPU, and the probe programs' run time in every traced
    /// process (the load client's side too), µs a request, each read where it is spent.
    agent_us_per_req: Option<f64>,
    probes_us_per_req: Option<f64>,
    service_mib: f64,
    agent_mib: f64,
    spans_per_req: f64,
}

const PYTHON_VENV: &str = ".venv-sdk";

/// Installs what the comparison runs that the test set-up does not: Flask and the Python SDK's
/// instrumentation in `.venv-sdk`, the Node SDK in `test-support/peers/sdk-node/node_modules`.
fn install(root: &Path) -> anyhow::Result<()> {
    let venv = root.join(PYTHON_VENV);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args([
            "-c",
            "import flask, requests, opentelemetry.distro, opentelemetry.instrumentation.flask",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        eprintln!("bench: installing Flask and the OpenTelemetry Python instrumentation into {PYTHON_VENV}");
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(root.join("test-support/peers/sdk-requirements.txt")))?;
    }
    let node = root.join("test-support/peers/sdk-node");
    if !node
        .join("node_modules/@opentelemetry/auto-instrumentations-node")
        .exists()
    {
        eprintln!(
            "bench: installing the OpenTelemetry Node.js SDK (npm ci in {})",
            node.display()
        );
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&node))?;
    }
    Ok(())
}

/// Runs the comparison and prints its table.
pub fn sdk_bench(
    root: &Path,
    bin: &Path,
    work: &Path,
    args: &SdkArgs,
    agent_args: &[String],
) -> anyhow::Result<()> {
    let SdkArgs {
        rounds,
        pairs,
        seconds,
    } = *args;
    install(root)?;
    let (sink_port, sink) = otlp_sink::start_counting_spans()?;
    let mut samples = Vec::new();
    let mut decisions = Vec::new();
    for runtime in [Runtime::Python, Runtime::Node] {
        let data_port = free_port();
        let mut data_cmd = Command::new("python3");
        data_cmd
            .arg(root.join("test-support/peers/data.py"))
            .args(["127.0.0.1", &data_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let data = Killed(data_cmd.spawn().context("starting the data service")?);
        wait_port(data_port)?;
        let setup = Setup {
            root,
            bin,
            work,
            sink_port,
            sink: &sink,
            data: &data,
            data_port,
            agent_args,
        };
        for round in 0..rounds {
            for load in runtime.loads() {
                for tracing in Tracing::ALL {
                    eprintln!(
                        "bench: SDK comparison, {}, round {}/{rounds}, {}, {}",
                        runtime.name(),
                        round + 1,
                        load.name(),
                        tracing.name()
                    );
                    samples.push(setup.run(runtime, load, tracing, seconds)?);
                }
            }
        }
        for load in runtime.loads() {
            let windows = setup.alternate(runtime, load, pairs, seconds)?;
            decisions.push((runtime, load, windows));
        }
    }
    if sink.bad.load(Relaxed) > 0 {
        eprintln!(
            "warning: the sink could not read {} export requests",
            sink.bad.load(Relaxed)
        );
    }
    if !agent_args.is_empty() {
        println!(
            "\n(the agent ran with: {}; the SDK with its defaults)",
            agent_args.join(" ")
        );
    }
    let sdk_p50_added = print_table(&samples, rounds);
    print_decisions(&decisions, &sdk_p50_added);
    Ok(())
}

/// `cargo xtask bench`'s settings for this part (`--sdk-rounds`, `--sdk-pairs`, `--sdk-seconds`).
#[derive(Clone, Copy)]
pub struct SdkArgs {
    /// Rounds of the three-way table (untraced, agent, SDK; a fresh service each run).
    pub rounds: usize,
    /// Untraced and traced windows of the goals' decision, on one service process.
    pub pairs: usize,
    /// Seconds of load a run or window measures.
    pub seconds: u64,
}

struct Setup<'a> {
    root: &'a Path,
    bin: &'a Path,
    work: &'a Path,
    sink_port: u16,
    sink: &'a Arc<SinkCounts>,
    data: &'a Killed,
    data_port: u16,
    /// `--agent-arg`s, for every agent started.
    agent_args: &'a [String],
}

impl Setup<'_> {
    fn run(
        &self,
        runtime: Runtime,
        load: Load,
        tracing: Tracing,
        seconds: u64,
    ) -> anyhow::Result<Sample> {
        let port = free_port();
        let (agent, metrics_port) = if tracing == Tracing::Agent {
            let (agent, metrics_port) = self.start_agent(port)?;
            (Some(agent), metrics_port)
        } else {
            (None, 0)
        };
        let spans_before = self.sink.spans.load(Relaxed);
        let mut service = Killed(
            runtime
                .command(
                    self.root,
                    port,
                    self.data_port,
                    tracing == Tracing::Sdk,
                    self.sink_port,
                )
                .spawn()
                .context("starting the service")?,
        );
        wait_port(port)?;
        let url = format!("http://127.0.0.1:{port}/work");
        let (connections, rate) = (load.connections(), load.rate());
        let warm = wrk_load(&url, WARM_UP_SECONDS, connections, rate, self.work)?;
        let pids = [service.0.id(), self.data.0.id()];
        let cpu = || -> f64 {
            pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>()
                + agent
                    .as_ref()
                    .map_or(0.0, |a| threads_cpu_seconds(a.0.id()))
        };
        let agent_cpu = || agent.as_ref().map(|a| threads_cpu_seconds(a.0.id()));
        // The kernel's statistics cost two clock reads a program run (~8 runs a request: a
        // few hundredths of a percent of these requests), so only the agent's runs pay them.
        let stats = agent.as_ref().and_then(|_| BpfStats::enable());
        let probes0 = stats.as_ref().and_then(|_| program_time_ns());
        let (cpu0, agent0) = (cpu(), agent_cpu());
        let w = wrk_load(&url, seconds, connections, rate, self.work)?;
        let (cpu_used, agent_used) = (cpu() - cpu0, agent_cpu().zip(agent0).map(|(b, a)| b - a));
        let probes_ns = probes0.zip(program_time_ns()).map(|(a, b)| b - a);
        drop(stats);
        let per_req = |x: f64| x / w.requests as f64;
        let service_mib = peak_rss_mib(service.0.id());
        let agent_mib = agent.as_ref().map_or(0.0, |a| peak_rss_mib(a.0.id()));
        stop(&mut service, runtime.stop_signal())?;
        if let Some(agent) = agent {
            stop_agent(agent, metrics_port, port)?;
        }
        let requests = (warm.requests + w.requests) as f64;
        Ok(Sample {
            runtime,
            load,
            tracing,
            cpu_us_per_req: per_req(cpu_used * 1e6),
            agent_us_per_req: agent_used.map(|s| per_req(s * 1e6)),
            probes_us_per_req: probes_ns.map(|ns| per_req(ns / 1e3)),
            service_mib,
            agent_mib,
            spans_per_req: (self.sink.spans.load(Relaxed) - spans_before) as f64 / requests,
            wrk: w,
        })
    }
}

impl Setup<'_> {
    /// The agent tracing the service on `port` and the data service, exporting to the sink;
    /// with the port of its metrics.
    fn start_agent(&self, port: u16) -> anyhow::Result<(Killed, u16)> {
        let metrics_port = free_port();
        let mut cmd = Command::new(self.bin.join("tracer"));
        cmd.args([
            "agent",
            "--endpoint",
            &format!("http://127.0.0.1:{}", self.sink_port),
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args([
            "--port",
            &port.to_string(),
            "--port",
            &self.data_port.to_string(),
        ])
        .args(self.agent_args)
        .env("RUST_LOG", "warn");
        Ok((start_ready(cmd, "tracer: ready")?, metrics_port))
    }

    /// The goals' decision: one untraced service process, measured in windows without and
    /// with the agent in turn (the agent started before its window and stopped after it), in
    /// ABBA order so that a steady drift of the machine's speed cancels. Each window is one
    /// second of load, whose figures are dropped, then `seconds` measured. On one process and
    /// seconds apart, a pair of windows shares what separate runs of fresh processes do not:
    /// the process's memory layout and the machine's speed of the moment.
    fn alternate(
        &self,
        runtime: Runtime,
        load: Load,
        pairs: usize,
        seconds: u64,
    ) -> anyhow::Result<Vec<Window>> {
        let port = free_port();
        let mut service = Killed(
            runtime
                .command(self.root, port, self.data_port, false, self.sink_port)
                .spawn()
                .context("starting the service")?,
        );
        wait_port(port)?;
        let url = format!("http://127.0.0.1:{port}/work");
        let (connections, rate) = (load.connections(), load.rate());
        wrk_load(&url, WARM_UP_SECONDS, connections, rate, self.work)?;
        let mut windows = Vec::with_capacity(pairs);
        for pair in 0..pairs {
            eprintln!(
                "bench: the goals' decision, {}, {}, pair {}/{pairs}",
                runtime.name(),
                load.name(),
                pair + 1
            );
            let traced_first = pair % 2 == 1;
            let (mut untraced, mut traced) = (None, None);
            for tracing in [traced_first, !traced_first] {
                let agent = if tracing {
                    Some(self.start_agent(port)?)
                } else {
                    None
                };
                wrk_load(&url, 1, connections, rate, self.work)?;
                let pids = [service.0.id(), self.data.0.id()];
                let services = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
                let agent_cpu = || {
                    agent
                        .as_ref()
                        .map_or(0.0, |(a, _)| threads_cpu_seconds(a.0.id()))
                };
                let (services0, agent0, idle0) = (services(), agent_cpu(), machine_cpu_seconds().1);
                let wrk = wrk_load(&url, seconds, connections, rate, self.work)?;
                let per_req = |s: f64| s * 1e6 / wrk.requests as f64;
                let w = Measured {
                    services_us: per_req(services() - services0),
                    wrk_us: per_req(wrk.cpu_seconds),
                    agent_us: per_req(agent_cpu() - agent0),
                    idle_us: per_req(machine_cpu_seconds().1 - idle0),
                    wrk,
                };
                if let Some((agent, metrics_port)) = agent {
                    stop_agent(agent, metrics_port, port)?;
                    traced = Some(w);
                } else {
                    untraced = Some(w);
                }
            }
            windows.push(Window {
                untraced: untraced.expect("an untraced window"),
                traced: traced.expect("a traced window"),
            });
        }
        stop(&mut service, runtime.stop_signal())?;
        Ok(windows)
    }
}

/// A pair of the goals' decision: the same service process without and with the agent.
struct Window {
    untraced: Measured,
    traced: Measured,
}

/// One window: the load client's figures and where the machine's CPU went, µs a request.
struct Measured {
    wrk: Wrk,
    /// The service's and the data service's CPU (the probes' time in their syscalls included).
    services_us: f64,
    /// The load client's CPU (its side's probes included: the agent traces its connections).
    wrk_us: f64,
    agent_us: f64,
    /// CPU nobody used (both CPUs' idle time).
    idle_us: f64,
}

/// Waits for the agent to export what it built, checks it built spans at all, and stops it.
fn stop_agent(agent: Killed, metrics_port: u16, port: u16) -> anyhow::Result<()> {
    drain(metrics_port);
    if metric(metrics_port, "tracer_spans_total") == 0 {
        bail!("the agent built no spans: is it tracing port {port}?");
    }
    drop(agent);
    Ok(())
}

/// The realistic level's goals (issue 20): throughput with the agent at least 0.99 of
/// untraced, and at most 20 µs added to the median latency at the paced rate.
const RATIO_GOAL: f64 = 0.99;
const P50_ADDED_GOAL_US: f64 = 20.0;

/// Pairs of windows the goals' decision takes by default: the 95% interval of 12 pairs' median
/// leaves out the two highest and the two lowest (`median_interval`), so a pair or two caught
/// by a change of this VM's speed cannot decide a goal.
pub(crate) const DEFAULT_PAIRS: usize = 12;

/// A distribution-free 95% confidence interval for the median of `values`: the k-th smallest
/// and k-th largest, with k the largest for which the chance that k or more values fall on one
/// side of the true median is at most 2.5% on each side (the sign test: each pair is above or
/// below the median with even odds). `None` under 6 values, where even the whole range covers
/// the median with less than 95%.
fn median_interval(values: &[f64]) -> Option<(f64, f64)> {
    let n = values.len();
    // P(Binomial(n, 1/2) < k), accumulated until it passes 2.5%.
    let mut below = 0.0;
    let mut choose = 1.0; // C(n, i)
    let mut k = 0;
    let outcomes = 2f64.powi(n as i32);
    for i in 0..n {
        below += choose / outcomes;
        if below > 0.025 {
            break;
        }
        k = i + 1;
        choose = choose * (n - i) as f64 / (i + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Some((sorted[k - 1], sorted[n - k]))
}

/// Whether the pairs show a goal met or missed: each traced window is measured against the
/// untraced window beside it, and the goal is decided only when the 95% interval of their
/// median lies on one side of it. On this project's VM a paced run's median moves by ~10% from
/// one run to the next, and a saturated run once measured 1.220 against its untraced run: a
/// verdict from a median alone, or from three rounds that happen to agree (a one-in-four
/// chance when the true value sits on the goal), would say more than the run shows.
fn goal_verdict(pairs: &[f64], goal: f64, higher_is_better: bool) -> String {
    let Some((low, high)) = median_interval(pairs) else {
        return format!(
            "not decided: {} pairs cannot place their median at 95% confidence (6 needed, --sdk-pairs)",
            pairs.len()
        );
    };
    let value = |v: f64| {
        if higher_is_better {
            format!("{v:.3}")
        } else {
            format!("{v:+.0} µs")
        }
    };
    let interval = format!(
        "the median pair is in [{}, {}] at 95%",
        value(low),
        value(high)
    );
    let (met, missed) = if higher_is_better {
        (low >= goal, high < goal)
    } else {
        (high <= goal, low > goal)
    };
    if met {
        format!("met, {interval}")
    } else if missed {
        format!("missed, {interval}")
    } else {
        format!("not decided, {interval}")
    }
}

/// Signals the service and waits (up to 15 s) for it to exit, exports flushed.
fn stop(service: &mut Killed, signal: i32) -> anyhow::Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(service.0.id() as i32, signal) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if service.0.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above; SIGKILL so that `Killed`'s drop does not wait for ever.
    unsafe { libc::kill(service.0.id() as i32, libc::SIGKILL) };
    bail!("the service did not exit within 15 s of its stop signal")
}

/// The three-way table, each run a fresh service process; returns the SDK's p50 added at the
/// paced level of each runtime (medians), which the agent's is held against.
fn print_table(samples: &[Sample], rounds: usize) -> Vec<(Runtime, f64)> {
    println!(
        "\n== tracer vs the OpenTelemetry SDK: GET /work (a downstream call + ~0.5 ms of JSON), medians of {rounds} rounds =="
    );
    println!(
        "{:<12} {:<13} {:>8} {:>6} {:>16} {:>16} {:>15} {:>10} {:>9} {:>11} {:>9} {:>9}",
        "level",
        "tracing",
        "req/s",
        "ratio",
        "p50 µs (added)",
        "p99 µs (added)",
        "CPU µs/req (+)",
        "probes µs",
        "agent µs",
        "service MiB",
        "agent MiB",
        "spans/req"
    );
    let mut verdicts = Vec::new();
    let mut sdk_p50_added = Vec::new();
    for runtime in [Runtime::Python, Runtime::Node] {
        println!("-- {}", runtime.name());
        for load in runtime.loads() {
            let of = |tracing: Tracing, f: &dyn Fn(&Sample) -> f64| {
                median(
                    samples
                        .iter()
                        .filter(|s| s.runtime == runtime && s.load == load && s.tracing == tracing)
                        .map(f)
                        .collect(),
                )
            };
            // Each round's value against the same round's untraced run: the spread a reader
            // needs to judge a median of a few rounds on a machine whose speed drifts.
            let rounds_against_untraced =
                |tracing: Tracing, f: &dyn Fn(&Sample, &Sample) -> f64| {
                    let runs = |t: Tracing| {
                        samples.iter().filter(move |s| {
                            s.runtime == runtime && s.load == load && s.tracing == t
                        })
                    };
                    runs(tracing)
                        .zip(runs(Tracing::Untraced))
                        .map(|(traced, untraced)| f(traced, untraced))
                        .collect::<Vec<f64>>()
                };
            let listed = |values: Vec<f64>, format: &dyn Fn(f64) -> String| {
                values
                    .into_iter()
                    .map(format)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let base_rps = of(Tracing::Untraced, &|s| s.wrk.rps);
            let base_p50 = of(Tracing::Untraced, &|s| s.wrk.p50_us);
            let base_p99 = of(Tracing::Untraced, &|s| s.wrk.p99_us);
            let base_cpu = of(Tracing::Untraced, &|s| s.cpu_us_per_req);
            // Medians over the runs that have the figure (the agent's).
            let of_some = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let values: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.runtime == runtime && s.load == load)
                    .filter_map(f)
                    .collect();
                (!values.is_empty()).then(|| median(values))
            };
            let probes = of_some(&|s| s.probes_us_per_req);
            let agent_own = of_some(&|s| s.agent_us_per_req);
            let shown = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            for tracing in Tracing::ALL {
                let rps = of(tracing, &|s| s.wrk.rps);
                let p50 = of(tracing, &|s| s.wrk.p50_us);
                let p99 = of(tracing, &|s| s.wrk.p99_us);
                let cpu = of(tracing, &|s| s.cpu_us_per_req);
                let added = |v: f64, base: f64| {
                    if tracing == Tracing::Untraced {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.0} ({:+.0})", v - base)
                    }
                };
                let agent_only = |v: Option<f64>| {
                    if tracing == Tracing::Agent {
                        shown(v)
                    } else {
                        "-".into()
                    }
                };
                println!(
                    "{:<12} {:<13} {:>8.0} {:>6.3} {:>16} {:>16} {:>15} {:>10} {:>9} {:>11.1} {:>9} {:>9.2}",
                    load.name(),
                    tracing.name(),
                    rps,
                    rps / base_rps,
                    added(p50, base_p50),
                    added(p99, base_p99),
                    added(cpu, base_cpu),
                    agent_only(probes),
                    agent_only(agent_own),
                    of(tracing, &|s| s.service_mib),
                    if tracing == Tracing::Agent {
                        format!("{:.1}", of(tracing, &|s| s.agent_mib))
                    } else {
                        "-".into()
                    },
                    of(tracing, &|s| s.spans_per_req),
                );
            }
            // What tracing costs, read where it is spent rather than as a difference of two
            // noisy totals: the probes in every traced process and the agent's own CPU.
            if let (Some(p), Some(a)) = (probes, agent_own) {
                verdicts.push(format!(
                    "{}: {}, tracing's own CPU a request: probes {p:.1} µs (the load client's side included) + agent {a:.1} µs = {:.1}% of the untraced services' {base_cpu:.0} µs",
                    runtime.name(),
                    load.name(),
                    100.0 * (p + a) / base_cpu,
                ));
            }
            if let Load::Paced(_) = load {
                let agent = of(Tracing::Agent, &|s| s.wrk.p50_us) - base_p50;
                let sdk = of(Tracing::Sdk, &|s| s.wrk.p50_us) - base_p50;
                sdk_p50_added.push((runtime, sdk));
                let agent_rounds = listed(
                    rounds_against_untraced(Tracing::Agent, &|t, u| t.wrk.p50_us - u.wrk.p50_us),
                    &|v| format!("{v:+.0}"),
                );
                verdicts.push(format!(
                    "{}: at {}, fresh processes a run, p50 added: the agent {agent:+.0} µs (rounds: {agent_rounds}), the SDK {sdk:+.0} µs",
                    runtime.name(),
                    load.name(),
                ));
            } else {
                let ratio = |t: Tracing| of(t, &|s| s.wrk.rps) / base_rps;
                let agent_rounds = listed(
                    rounds_against_untraced(Tracing::Agent, &|t, u| t.wrk.rps / u.wrk.rps),
                    &|v| format!("{v:.3}"),
                );
                verdicts.push(format!(
                    "{}: saturated, fresh processes a run, throughput ratio: the agent {:.3} (rounds: {agent_rounds}), the SDK {:.3}",
                    runtime.name(),
                    ratio(Tracing::Agent),
                    ratio(Tracing::Sdk),
                ));
            }
        }
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
    sdk_p50_added
}

/// The agent's goals at the realistic level, decided on the alternated windows (`alternate`):
/// throughput at saturation ≥ 0.99 of untraced, p50 added at the paced rate ≤ 20 µs, and at
/// least 5x less p50 added than the SDK's (the three-way table's median).
fn print_decisions(decisions: &[(Runtime, Load, Vec<Window>)], sdk_p50_added: &[(Runtime, f64)]) {
    println!(
        "\n== the realistic level's goals: one service process, untraced and traced windows alternated (ABBA) =="
    );
    println!(
        "{:<12} {:<10} {:>6} {:>14} {:>14} {:>12}  each pair, traced against untraced",
        "service", "level", "pairs", "untraced req/s", "untraced p50", "median pair"
    );
    let mut verdicts = Vec::new();
    let mut cpu_lines = Vec::new();
    for (runtime, load, windows) in decisions {
        let short_name = match runtime {
            Runtime::Python => "Python",
            Runtime::Node => "Node.js",
        };
        let untraced_rps = median(windows.iter().map(|w| w.untraced.wrk.rps).collect());
        let untraced_p50 = median(windows.iter().map(|w| w.untraced.wrk.p50_us).collect());
        let (pairs, shown): (Vec<f64>, Vec<String>) = match load {
            Load::Saturated => windows
                .iter()
                .map(|w| w.traced.wrk.rps / w.untraced.wrk.rps)
                .map(|r| (r, format!("{r:.3}")))
                .unzip(),
            Load::Paced(_) => windows
                .iter()
                .map(|w| w.traced.wrk.p50_us - w.untraced.wrk.p50_us)
                .map(|d| (d, format!("{d:+.0}")))
                .unzip(),
        };
        let middle = median(pairs.clone());
        println!(
            "{:<12} {:<10} {:>6} {:>14.0} {:>11.0} µs {:>12}  {}",
            short_name,
            load.name(),
            windows.len(),
            untraced_rps,
            untraced_p50,
            match load {
                Load::Saturated => format!("{middle:.3}"),
                Load::Paced(_) => format!("{middle:+.0} µs"),
            },
            shown.join(" ")
        );
        let added = |f: &dyn Fn(&Measured) -> f64| {
            median(
                windows
                    .iter()
                    .map(|w| f(&w.traced) - f(&w.untraced))
                    .collect(),
            )
        };
        cpu_lines.push(format!(
            "{short_name} {}: the services {:+.1}, wrk {:+.1}, the agent {:.1}, idle {:+.1} (untraced: the services {:.0}, wrk {:.1}, idle {:.0})",
            load.name(),
            added(&|m| m.services_us),
            added(&|m| m.wrk_us),
            median(windows.iter().map(|w| w.traced.agent_us).collect()),
            added(&|m| m.idle_us),
            median(windows.iter().map(|w| w.untraced.services_us).collect()),
            median(windows.iter().map(|w| w.untraced.wrk_us).collect()),
            median(windows.iter().map(|w| w.untraced.idle_us).collect()),
        ));
        match load {
            Load::Saturated => verdicts.push(format!(
                "{}: saturated throughput with the agent ≥ {RATIO_GOAL} of untraced: {}",
                runtime.name(),
                goal_verdict(&pairs, RATIO_GOAL, true)
            )),
            Load::Paced(_) => {
                verdicts.push(format!(
                    "{}: at {}, p50 added by the agent ≤ {P50_ADDED_GOAL_US:.0} µs: {}",
                    runtime.name(),
                    load.name(),
                    goal_verdict(&pairs, P50_ADDED_GOAL_US, false)
                ));
                if let Some((_, sdk)) = sdk_p50_added.iter().find(|(r, _)| r == runtime) {
                    verdicts.push(format!(
                        "{}: at {}, at least 5x less p50 added than the SDK's {sdk:+.0} µs: {}",
                        runtime.name(),
                        load.name(),
                        goal_verdict(&pairs, sdk / 5.0, false)
                    ));
                }
            }
        }
    }
    println!("\nCPU µs a request, traced window less untraced (medians of the pairs):");
    for line in cpu_lines {
        println!("{line}");
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_is_the_sign_tests() {
        let n = |k: usize| (1..=k).map(|v| v as f64).collect::<Vec<f64>>();
        // Under 6 rounds no interval reaches 95%: all of 5 on one side happens 1 time in 16.
        assert_eq!(median_interval(&n(5)), None);
        // 6 to 8 rounds: the whole range (a chance of 2/64 to 2/256 of missing the median).
        assert_eq!(median_interval(&n(6)), Some((1.0, 6.0)));
        assert_eq!(median_interval(&n(8)), Some((1.0, 8.0)));
        // 9 rounds: the highest and the lowest left out (P(at most 1 of 9 below) = 10/512).
        assert_eq!(median_interval(&n(9)), Some((2.0, 8.0)));
        // 17 rounds: P(at most 4 of 17 below) = 2.45%, so the 5th from each end.
        assert_eq!(median_interval(&n(17)), Some((5.0, 13.0)));
        let shuffled = [7.0, 1.0, 9.0, 3.0, 5.0, 2.0, 8.0, 4.0, 6.0];
        assert_eq!(median_interval(&shuffled), Some((2.0, 8.0)));
    }

    #[test]
    fn a_goal_is_decided_only_when_the_medians_interval_is_on_one_side() {
        let p50 = |rounds: &[f64]| goal_verdict(rounds, P50_ADDED_GOAL_US, false);
        // Three rounds that agree are not enough (a one-in-four chance).
        assert_eq!(
            p50(&[2.0, -5.0, 9.0]),
            "not decided: 3 pairs cannot place their median at 95% confidence (6 needed, --sdk-pairs)"
        );
        assert_eq!(
            p50(&[2.0, -5.0, 9.0, 14.0, 1.0, 6.0, 900.0, 3.0, -2.0]),
            "met, the median pair is in [-2 µs, +14 µs] at 95%"
        );
        assert_eq!(
            p50(&[40.0, 51.0, 22.0, 35.0, -300.0, 60.0, 44.0, 38.0, 29.0]),
            "missed, the median pair is in [+22 µs, +51 µs] at 95%"
        );
        assert_eq!(
            p50(&[10.0, -560.0, 980.0, 400.0, 12.0, 30.0]),
            "not decided, the median pair is in [-560 µs, +980 µs] at 95%"
        );
        let ratio = |rounds: &[f64]| goal_verdict(rounds, RATIO_GOAL, true);
        // The 2026-12-06 run's three rounds, one of them the untraced run's noise.
        assert!(ratio(&[0.990, 1.220, 1.032]).starts_with("not decided: 3 pairs"));
        assert_eq!(
            ratio(&[0.995, 1.003, 1.01, 0.998, 0.992, 1.02, 0.97, 1.0, 0.999]),
            "met, the median pair is in [0.992, 1.010] at 95%"
        );
        assert_eq!(
            ratio(&[0.953, 0.859, 0.864, 0.91, 0.97, 0.93, 0.95]),
            "missed, the median pair is in [0.859, 0.970] at 95%"
        );
    }
}
