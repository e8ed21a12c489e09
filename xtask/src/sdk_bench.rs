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
//! to run than the agent adds, these are the figures that do not drown. Spans a request counts what reached the sink, warm-up included,
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

    /// The paced level: about a third of what the untraced service answers at saturation
    /// on the 2-core bench machine (Python ~900 req/s, Node ~2,500 req/s).
    fn paced_rate(self) -> u32 {
        match self {
            Runtime::Python => 300,
            Runtime::Node => 800,
        }
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
    rounds: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    install(root)?;
    let (sink_port, sink) = otlp_sink::start_counting_spans()?;
    let mut samples = Vec::new();
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
        for round in 0..rounds {
            for load in [Load::Saturated, Load::Paced(runtime.paced_rate())] {
                for tracing in Tracing::ALL {
                    eprintln!(
                        "bench: SDK comparison, {}, round {}/{rounds}, {}, {}",
                        runtime.name(),
                        round + 1,
                        load.name(),
                        tracing.name()
                    );
                    let setup = Setup {
                        root,
                        bin,
                        work,
                        sink_port,
                        sink: &sink,
                        data: &data,
                        data_port,
                    };
                    samples.push(setup.run(runtime, load, tracing, seconds)?);
                }
            }
        }
    }
    if sink.bad.load(Relaxed) > 0 {
        eprintln!(
            "warning: the sink could not read {} export requests",
            sink.bad.load(Relaxed)
        );
    }
    print_table(&samples, rounds);
    Ok(())
}

struct Setup<'a> {
    root: &'a Path,
    bin: &'a Path,
    work: &'a Path,
    sink_port: u16,
    sink: &'a Arc<SinkCounts>,
    data: &'a Killed,
    data_port: u16,
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
        let metrics_port = free_port();
        let agent = if tracing == Tracing::Agent {
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
            .env("RUST_LOG", "warn");
            Some(start_ready(cmd, "tracer: ready")?)
        } else {
            None
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
        if agent.is_some() {
            drain(metrics_port);
            let built = metric(metrics_port, "tracer_spans_total");
            if built == 0 {
                bail!("the agent built no spans: is it tracing port {port}?");
            }
        }
        drop(agent);
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

/// The realistic level's goals (issue 20): throughput with the agent at least 0.99 of
/// untraced, and at most 20 µs added to the median latency at the paced rate.
const RATIO_GOAL: f64 = 0.99;
const P50_ADDED_GOAL_US: f64 = 20.0;

/// Whether a goal is shown by a few rounds, each measured against its own untraced run: met or
/// missed only when every round agrees, and their spread (largest less smallest) is under
/// their median's distance from the goal. On this project's VM a paced run's median moves by
/// ~10% from one run to the next (~0.2 ms on 1.8 ms, the same service process or a fresh one),
/// and a saturated round can measure 1.2 against its untraced run: rounds that agree by such
/// margins say nothing about a goal nearer than their spread.
fn goal_verdict(rounds: &[f64], goal: f64, meets: impl Fn(f64) -> bool) -> String {
    if rounds.is_empty() {
        return "no rounds".into();
    }
    let met = rounds.iter().filter(|&&v| meets(v)).count();
    let (low, high) = rounds
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let spread = high - low;
    let distance = (median(rounds.to_vec()) - goal).abs();
    let agreed = match met {
        m if m == rounds.len() => "met in every round",
        0 => "missed in every round",
        m => {
            return format!(
                "met in {m} of {} rounds, not decided by this run",
                rounds.len()
            )
        }
    };
    if spread <= distance {
        agreed.into()
    } else {
        format!(
            "{agreed}, but the rounds spread by {} (their median is {} from the goal): not decided by this run",
            short(spread),
            short(distance)
        )
    }
}

/// A ratio to three decimals, a number of µs to none.
fn short(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.0}")
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

fn print_table(samples: &[Sample], rounds: usize) {
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
    for runtime in [Runtime::Python, Runtime::Node] {
        println!("-- {}", runtime.name());
        for load in [Load::Saturated, Load::Paced(runtime.paced_rate())] {
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
                let added_rounds =
                    rounds_against_untraced(Tracing::Agent, &|t, u| t.wrk.p50_us - u.wrk.p50_us);
                let goal =
                    goal_verdict(&added_rounds, P50_ADDED_GOAL_US, |v| v <= P50_ADDED_GOAL_US);
                let agent_rounds = listed(added_rounds, &|v| format!("{v:+.0}"));
                verdicts.push(format!(
                    "{}: at {}, the agent adds {agent:+.0} µs to p50 (rounds: {agent_rounds}; goal ≤ {P50_ADDED_GOAL_US:.0}: {goal}), the SDK {sdk:+.0} µs ({})",
                    runtime.name(),
                    load.name(),
                    if agent > 0.5 {
                        format!("{:.1}× the agent's", sdk / agent)
                    } else {
                        "the agent's is within noise".into()
                    },
                ));
            } else {
                let ratio = |t: Tracing| of(t, &|s| s.wrk.rps) / base_rps;
                let ratio_rounds =
                    rounds_against_untraced(Tracing::Agent, &|t, u| t.wrk.rps / u.wrk.rps);
                let goal = goal_verdict(&ratio_rounds, RATIO_GOAL, |v| v >= RATIO_GOAL);
                let agent_rounds = listed(ratio_rounds, &|v| format!("{v:.3}"));
                verdicts.push(format!(
                    "{}: saturated throughput ratio {:.3} with the agent (rounds: {agent_rounds}; goal ≥ {RATIO_GOAL}: {goal}), {:.3} with the SDK",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_goal_is_decided_only_when_every_round_agrees_by_more_than_their_spread() {
        let p50 = |rounds: &[f64]| goal_verdict(rounds, P50_ADDED_GOAL_US, |v| v <= 20.0);
        assert_eq!(p50(&[2.0, -5.0, 9.0]), "met in every round");
        assert_eq!(p50(&[40.0, 51.0]), "missed in every round");
        assert_eq!(
            p50(&[10.0, -560.0, 980.0, 400.0]),
            "met in 2 of 4 rounds, not decided by this run"
        );
        assert_eq!(
            p50(&[10.0, -5.0, 19.0]),
            "met in every round, but the rounds spread by 24 (their median is 10 from the goal): not decided by this run"
        );
        assert_eq!(p50(&[]), "no rounds");
        let ratio = |rounds: &[f64]| goal_verdict(rounds, RATIO_GOAL, |v| v >= RATIO_GOAL);
        assert_eq!(ratio(&[0.998, 1.003, 1.01]), "met in every round");
        // The 2026-12-06 run: one round at 1.220 is the untraced run's noise, not a result.
        assert_eq!(
            ratio(&[0.990, 1.220, 1.032]),
            "met in every round, but the rounds spread by 0.230 (their median is 0.042 from the goal): not decided by this run"
        );
        assert_eq!(ratio(&[0.953, 0.859, 0.864]), "missed in every round");
    }
}
