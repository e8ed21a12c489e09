//! `cargo xtask bench`'s account of a traced request at saturation: where the throughput goes.
//!
//! nginx under wrk as at the saturated level (one nginx worker, one wrk thread, 50 connections),
//! run seven ways, alternated within each round:
//!
//! 1. untraced;
//! 2. the probes attached, every connection ignored: the agent traces a port nobody uses, so
//!    each of nginx's and wrk's syscalls pays the tracepoints and one connection lookup, and no
//!    record is written (the floor of syscall-tracepoint tracing);
//! 3. RED metrics only, every exchange framed and counted in the kernel, no record written
//!    (`--metrics-only`); then the same with one request in ten kept by the probes and
//!    recorded, parsed and exported (`--sample 0.1 --sample-in-kernel`);
//! 4. every message recorded, parsed and paired, spans built and RED metrics counted, no span
//!    exported (`--sample 0`);
//! 5. the whole agent, exporting every span to the sink that stands in for a collector
//!    elsewhere;
//! 6. the same with wrk's connections ignored (`--exe nginx`): the host of a service whose
//!    clients run elsewhere, where the agent sees each request once, not at both ends.
//!
//! Each run accounts for the machine's 2 CPUs a request: nginx's worker, wrk, the agent, the
//! sink (this process, which does nothing else while wrk runs), what the rest of the machine
//! used (kernel threads, the softirqs they run) and what stayed idle. The CPU a request adds
//! from one way to the next is what that step costs; idle time is throughput lost without
//! CPU spent: on 2 cores, nginx and wrk each keep one busy, and whatever the agent runs takes
//! it from one of them while the other waits for it.
use std::{path::Path, sync::atomic::Ordering::Relaxed, sync::Arc, time::Instant};

use crate::{
    bench::{
        agent_tracing, drain, free_port, median, metric, nginx_worker, own_cpu_seconds,
        start_ready, threads_cpu_seconds, wrk_load, Nginx,
    },
    otlp_sink::SinkCounts,
};

/// wrk's connections, as at the bench's saturated level.
const CONNECTIONS: u32 = 50;

#[derive(Clone, Copy, PartialEq)]
enum Step {
    Untraced,
    ProbesIgnoring,
    CountedInKernel,
    /// `--sample 0.1 --sample-in-kernel`: as `CountedInKernel`, one request in ten also
    /// recorded, parsed and exported.
    SampledInKernel,
    Unexported,
    Exported,
    /// As `Exported`, nginx's connections only: wrk's are ignored as at step 2.
    ServerSideOnly,
    /// As `Exported`, with the build given to `--compare-bin`.
    ExportedByOtherBuild,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Untraced => "untraced",
            Step::ProbesIgnoring => "probes, every connection ignored",
            Step::CountedInKernel => "RED in the kernel (--metrics-only)",
            Step::SampledInKernel => "kernel keeps 10% (--sample-in-kernel)",
            Step::Unexported => "records parsed, no span exported",
            Step::Exported => "every span exported (to the sink)",
            Step::ServerSideOnly => "the same, nginx's side only (--exe)",
            Step::ExportedByOtherBuild => "the same, by the --compare-bin build",
        }
    }
}

/// One run: requests a second and CPU microseconds a request, by where they went.
#[derive(Clone, Copy, Default)]
struct Account {
    rps: f64,
    nginx: f64,
    wrk: f64,
    agent: f64,
    sink: f64,
    other: f64,
    idle: f64,
    /// Records the probes could not put in the ring (full), when the agent serves metrics.
    ring_drops: u64,
    /// Times the agent left idle-only priority because records piled up (`priority.rs`).
    boosts: u64,
}

impl Account {
    /// The machine's CPU time a request: every CPU, busy or not, divided among the requests.
    fn total(&self) -> f64 {
        self.nginx + self.wrk + self.agent + self.sink + self.other + self.idle
    }
}

/// The `cpu` line of /proc/stat: (busy, idle) seconds of all CPUs together.
pub(crate) fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap_or("");
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / hz;
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, idle)
}

/// The runs of `measure`, printed by `print`.
pub(crate) struct Breakdown {
    steps: Vec<Step>,
    runs: Vec<(Step, Account)>,
    rounds: usize,
    seconds: u64,
}

/// `other`: a second agent build to run as a fifth step, for an A/B of two builds under the
/// same alternation (this VM's speed drifts too much for two separate runs to compare).
pub(crate) fn measure(
    bin: &Path,
    other: Option<&Path>,
    work: &Path,
    nginx: &Nginx,
    (sink_port, sink): (u16, &Arc<SinkCounts>),
    rounds: usize,
    seconds: u64,
) -> anyhow::Result<Breakdown> {
    let worker = nginx_worker(nginx)?;
    let url = format!("http://127.0.0.1:{}/ok", nginx.port);
    let mut steps = vec![
        Step::Untraced,
        Step::ProbesIgnoring,
        Step::CountedInKernel,
        Step::SampledInKernel,
        Step::Unexported,
        Step::Exported,
        Step::ServerSideOnly,
    ];
    if other.is_some() {
        steps.push(Step::ExportedByOtherBuild);
    }
    let mut runs: Vec<(Step, Account)> = Vec::new();
    for round in 0..rounds {
        for &step in &steps {
            // The agent, and its metrics port to wait on for the export to finish.
            let (agent, metrics) = match step {
                Step::Untraced => (None, None),
                Step::ProbesIgnoring => {
                    // A port nothing listens on: the probes see each connection once and
                    // ignore it from then on.
                    let mut cmd = agent_tracing(bin, sink_port, &[1]);
                    cmd.args(["--metrics-addr", "off"]);
                    (Some(start_ready(cmd, "tracer: ready")?), None)
                }
                Step::CountedInKernel
                | Step::SampledInKernel
                | Step::Unexported
                | Step::Exported
                | Step::ServerSideOnly
                | Step::ExportedByOtherBuild => {
                    let build = match (step, other) {
                        (Step::ExportedByOtherBuild, Some(other)) => other,
                        _ => bin,
                    };
                    let mut cmd = agent_tracing(build, sink_port, &[nginx.port]);
                    let metrics = free_port();
                    cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
                    if step == Step::Unexported {
                        cmd.args(["--sample", "0"]);
                    }
                    if step == Step::CountedInKernel {
                        cmd.arg("--metrics-only");
                    }
                    if step == Step::SampledInKernel {
                        cmd.args(["--sample", "0.1", "--sample-in-kernel"]);
                    }
                    if step == Step::ServerSideOnly {
                        cmd.args(["--exe", "nginx"]);
                    }
                    (Some(start_ready(cmd, "tracer: ready")?), Some(metrics))
                }
            };
            let agent_pid = agent.as_ref().map(|a| a.0.id());
            let agent0 = agent_pid.map_or(0.0, threads_cpu_seconds);
            let nginx0 = threads_cpu_seconds(worker);
            let sink0 = own_cpu_seconds();
            let (busy0, idle0) = machine_cpu_seconds();
            let sink_bytes0 = sink.bytes.load(Relaxed);
            let started = Instant::now();
            let w = wrk_load(&url, seconds, CONNECTIONS, None, work)?;
            let wall = started.elapsed().as_secs_f64();
            let (busy1, idle1) = machine_cpu_seconds();
            let per_req = |s: f64| s * 1e6 / w.requests as f64;
            let mut a = Account {
                rps: w.rps,
                nginx: per_req(threads_cpu_seconds(worker) - nginx0),
                wrk: per_req(w.cpu_seconds),
                agent: agent_pid.map_or(0.0, |p| per_req(threads_cpu_seconds(p) - agent0)),
                sink: per_req(own_cpu_seconds() - sink0),
                other: 0.0,
                idle: per_req(idle1 - idle0),
                ring_drops: 0,
                boosts: 0,
            };
            // What the processes above do not account for: kernel threads and their softirqs,
            // other daemons. Busy time from /proc/stat, minus theirs.
            a.other = (per_req(busy1 - busy0) - a.nginx - a.wrk - a.agent - a.sink).max(0.0);
            if let Some(metrics) = metrics {
                drain(metrics);
                // A throughput bought by dropping records would not be one.
                a.ring_drops = metric(metrics, "tracer_ringbuf_dropped_total");
                a.boosts = metric(metrics, "tracer_agent_priority_boosts_total");
            }
            let sink_mib = (sink.bytes.load(Relaxed) - sink_bytes0) as f64 / (1 << 20) as f64;
            eprintln!(
                "breakdown round {} {:<36} {:>7.0} req/s  CPU us a request: nginx {:.2} wrk {:.2} \
                 agent {:.2} sink {:.2} other {:.2} idle {:.2}; {sink_mib:.0} MiB to the sink in \
                 {wall:.1} s; {} priority boosts{}",
                round + 1,
                step.name(),
                a.rps,
                a.nginx,
                a.wrk,
                a.agent,
                a.sink,
                a.other,
                a.idle,
                a.boosts,
                if a.ring_drops > 0 {
                    format!("; {} records DROPPED by the ring", a.ring_drops)
                } else {
                    String::new()
                }
            );
            drop(agent);
            runs.push((step, a));
        }
    }
    Ok(Breakdown {
        steps,
        runs,
        rounds,
        seconds,
    })
}

impl Breakdown {
    pub(crate) fn print(&self) {
        let (runs, rounds, seconds) = (&self.runs, self.rounds, self.seconds);

        let pick = |step: Step, f: &dyn Fn(&Account) -> f64| -> f64 {
            median(
                runs.iter()
                    .filter(|(s, _)| *s == step)
                    .map(|(_, a)| f(a))
                    .collect(),
            )
        };
        // Each run's throughput against the untraced run of its round: this VM's speed changes by
        // up to a quarter from one minute to the next (untraced nginx 113k-140k req/s), and a
        // round's runs are minutes apart at most.
        let ratio = |step: Step| -> f64 {
            let untraced: Vec<f64> = runs
                .iter()
                .filter(|(s, _)| *s == Step::Untraced)
                .map(|(_, a)| a.rps)
                .collect();
            let traced = runs.iter().filter(|(s, _)| *s == step).map(|(_, a)| a.rps);
            median(traced.zip(untraced).map(|(t, u)| t / u).collect())
        };
        println!(
            "\n== where a traced request's time goes at saturation: nginx (1 worker) under wrk (1 \
         thread, {CONNECTIONS} connections), medians of {rounds} round(s), {seconds} s per run \
         (ratio: to the untraced run of the same round); the 2 CPUs' time divided among the \
         requests =="
        );
        println!(
            "{:<36} {:>9} {:>6} | {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} | {:>6} | {:>10} {:>8}",
            "",
            "req/s",
            "ratio",
            "nginx",
            "wrk",
            "agent",
            "sink",
            "other",
            "idle",
            "total",
            "ring drops",
            "boosts/s"
        );
        for &step in &self.steps {
            let rps = pick(step, &|a| a.rps);
            println!(
            "{:<36} {:>9.0} {:>6.3} | {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} | {:>6.2} | {:>10} {:>8.1}",
            step.name(),
            rps,
            ratio(step),
            pick(step, &|a| a.nginx),
            pick(step, &|a| a.wrk),
            pick(step, &|a| a.agent),
            pick(step, &|a| a.sink),
            pick(step, &|a| a.other),
            pick(step, &|a| a.idle),
            pick(step, &|a| a.total()),
            runs.iter()
                .filter(|(s, _)| *s == step)
                .map(|(_, a)| a.ring_drops)
                .sum::<u64>(),
            pick(step, &|a| a.boosts as f64) / seconds as f64,
        );
        }
        println!(
            "(CPU microseconds a request. nginx and wrk include the probe programs their syscalls \
         run; \"other\" is the rest of the machine (kernel threads, softirqs); \"idle\" is CPU \
         time nobody used: throughput lost while one process waits for the other, not CPU \
             spent. Ring drops: records lost in all rounds, which would make a throughput \
             look better than it is. Boosts: times a second the agent left idle-only priority because \
             records piled up, see tracer-user/src/priority.rs.)"
        );
    }
}
