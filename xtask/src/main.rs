//! `cargo xtask ...`: set-up, build, test and run orchestration, so the README's commands work
//! on a fresh machine.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

mod bench;
mod breakdown;
mod kernels;
mod otlp_sink;
mod sdk_bench;
mod traces;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the tracer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything a fresh Debian 12 machine lacks (idempotent).
    Setup,
    /// Set up, then run every test: formatting, clippy, unit and integration tests (loads the
    /// probes into this kernel, so it needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure what tracing costs: nginx under wrk with the agent off and on, side by side, at
    /// saturation, at 10k and 20k req/s and on one connection, exporting to a collector on the
    /// same cores and (except at 20k) to a sink standing in for a collector elsewhere; the kernel
    /// cost per traced syscall; the collector's ingest rate into its store. Needs root. Prints
    /// the figures the README quotes.
    Bench {
        /// Alternating off/on rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Only the kernel-cost micro-benchmark (per traced and untraced syscall).
        #[arg(long)]
        kernel_only: bool,
        /// Only the comparison with the OpenTelemetry SDK's zero-code instrumentation (Python
        /// and Node.js services: untraced, traced by the agent, instrumented by the SDK).
        #[arg(long, conflicts_with = "kernel_only")]
        sdk_only: bool,
        /// Rounds of the three-way table against the OpenTelemetry SDK (untraced, agent, SDK; a
        /// fresh service process each run).
        #[arg(long, default_value_t = 3, conflicts_with_all = ["kernel_only", "breakdown_only"])]
        sdk_rounds: usize,
        /// Pairs of untraced and traced windows on one service process that decide the
        /// realistic level's goals (at 95% confidence; 6 at least, 12 leave out two outliers a
        /// side).
        #[arg(long, default_value_t = sdk_bench::DEFAULT_PAIRS, conflicts_with_all = ["kernel_only", "breakdown_only"])]
        sdk_pairs: usize,
        /// Seconds of load a run or window of the comparison with the SDK measures.
        #[arg(long, default_value_t = 5, conflicts_with_all = ["kernel_only", "breakdown_only"])]
        sdk_seconds: u64,
        /// Only the account of a traced request's time at saturation (untraced, probes
        /// ignoring every connection, records without export, every span exported).
        #[arg(long, conflicts_with_all = ["kernel_only", "sdk_only"])]
        breakdown_only: bool,
        /// The directory of another build of `tracer` to run in the breakdown as a fifth step
        /// (every span exported), alternated with the others in each round: an A/B of two
        /// builds on a machine whose speed drifts between separate runs.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel_only", "sdk_only"])]
        compare_bin: Option<PathBuf>,
        /// An extra argument for every traced agent, the SDK comparison's too (repeatable), e.g.
        /// `--agent-arg=--priority --agent-arg=adaptive`.
        #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// The collector under realistic exports and queries while every hostile-input attack runs
    /// at once (tracer-collector/tests/soak.rs, release build): prints its peak memory, the
    /// slowest legitimate export and query, and every acknowledged span counted in the store;
    /// fails if a documented bound is broken. The test suite runs the same soak for 20 s.
    Soak {
        /// How long the soak runs.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// The agent on other kernels: boots each kernel of the matrix (Debian's cloud kernels) in
    /// QEMU on a busybox initramfs, runs the agent against busybox httpd and wget there (and on
    /// the host's kernel in a network namespace), and prints kernel x (probes load, HTTP spans,
    /// counters, verifier instructions, run time a syscall). Needs root.
    Kernels {
        /// Only this kernel of the matrix (repeatable): 5.10, 6.1 or 6.12.
        #[arg(long = "only", value_name = "KERNEL")]
        only: Vec<String>,
        /// Skip the host's own kernel.
        #[arg(long)]
        no_host: bool,
        /// Test the `tracer` in this directory instead of a fresh release build.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Fuzz what parses untrusted input (cargo-fuzz, nightly): the collector's OTLP protobuf
    /// and JSON decoders, the query API's parameters and the agent's protocol parsers. Fails on any crash, leak of the RSS
    /// limit (2 GiB) or input slower than 10 s; the input is kept in fuzz/artifacts.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (repeatable): otlp_protobuf, otlp_json, query_params.
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
    },
    /// Build the Debian packages tracer-agent and tracer-collector (release build) into
    /// target/debian: `apt install ./target/debian/*.deb` installs and starts both services.
    Package,
    /// How whole the traces are: four hosts (network namespaces) with one agent each, a load
    /// client → nginx → a service → a data service, for each service architecture and number of
    /// concurrent clients; prints completeness, linkage, wrong links by provenance, orphans and
    /// the largest child-before-parent gap against the client's ground truth. Needs root.
    Traces {
        /// Seconds of load a run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Requests a second asked of the load client in total (0: as fast as it can).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Numbers of concurrent clients (keep-alive connections).
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Service architectures: threaded, pool, async (aiohttp), node.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "threaded,pool,async,node"
        )]
        arch: Vec<String>,
        /// Shift the service host's agent's clock by this many ms (shows the collector's
        /// correction).
        #[arg(long, allow_hyphen_values = true)]
        clock_shift_ms: Option<i64>,
        /// Each client's requests cycle through this: r normal, e a 500 from the data service,
        /// s a 50 ms slow data hop.
        #[arg(long, default_value_t = format!("{}se", "r".repeat(98)))]
        pattern: String,
        /// What the service's data call carries: `same` (its path has the request's id, as a
        /// REST service fetching what it was asked about), `opaque` (a token sharing nothing
        /// with the request: no id in the bytes names the request it serves). Both by default.
        #[arg(long, value_delimiter = ',', default_value = "same,opaque")]
        downstream: Vec<String>,
        /// Show the collector's and the agents' logs.
        #[arg(long)]
        logs: bool,
        /// One more argument for every host's agent (repeatable), e.g. `--agent-arg=--sample
        /// --agent-arg=0.5 --agent-arg=--sample-in-kernel`: the spans then scored are those
        /// the agents kept, and `wrong` must stay 0 however many are missing.
        #[arg(long = "agent-arg", allow_hyphen_values = true, value_name = "ARG")]
        agent_arg: Vec<String>,
    },
    /// Set up, build, and start the collector (store, API, UI on http://127.0.0.1:16686) and the
    /// agent tracing this host, exporting to it. Ctrl-C stops both.
    Run {
        /// Extra arguments for `tracer agent`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The agent (with its probes) and the collector, optimised.
fn build_release() -> anyhow::Result<()> {
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "tracer-user",
        "-p",
        "tracer-collector",
    ]))
}

/// The fuzz targets in fuzz/fuzz_targets.
const FUZZ_TARGETS: [&str; 4] = [
    "otlp_protobuf",
    "otlp_json",
    "query_params",
    "agent_protocols",
];

fn fuzz(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = only.iter().find(|t| !FUZZ_TARGETS.contains(&t.as_str())) {
        bail!(
            "no fuzz target {unknown:?}: the targets are {}",
            FUZZ_TARGETS.join(", ")
        );
    }
    let dir = root().join("fuzz");
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "-O", target])
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"])
            .current_dir(&dir))
        .with_context(|| {
            format!("fuzzing {target} found a failure: the input is in fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\x1b[1m[xtask]\x1b[0m {cmd:?}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Removes the scratch directories earlier test runs left in the temp dir (`tracer-test-*`,
/// `tracer-store-*`: stores, nginx prefixes; ~100 MB a run). The last run's stay until the
/// next one, to look at after a failure.
fn remove_scratch_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name.starts_with("tracer-test-") || name.starts_with("tracer-store-"))
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    if removed > 0 {
        eprintln!(
            "xtask: removed {removed} scratch directories of earlier test runs from {}",
            tmp.display()
        );
    }
}

fn setup() -> anyhow::Result<()> {
    run(Command::new("bash").arg("scripts/setup.sh"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
            run(Command::new("cargo").args([
                "clippy",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The probes build for bpfel-unknown-none with nightly: lint them there.
            run(Command::new("cargo")
                .args(["+nightly", "clippy", "--release", "--", "-D", "warnings"])
                .current_dir(root().join("tracer-ebpf")))?;
            remove_scratch_dirs();
            // One test binary at a time: each integration test loads its own probes and starts
            // real servers; running them in parallel on 2 cores makes timings noisy.
            run(Command::new("cargo")
                .args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "tracer-ebpf",
                    "--",
                    "--test-threads=1",
                ])
                .args(&args))?;
            if !args.is_empty() {
                // A filtered run (`cargo xtask test -- NAME`): only what was asked for.
                return Ok(());
            }
            // A short fuzzing pass over what parses untrusted input (`cargo xtask fuzz` runs
            // longer).
            fuzz(10, &[])?;
            // The probes on one more kernel than this one: Debian 12's, the oldest line the
            // matrix covers (a verifier that rejected them there once).
            kernels::kernels(
                &root(),
                &kernels::KernelsArgs {
                    only: vec!["6.1".into()],
                    no_host: true,
                    bin_dir: root().join("target/debug"),
                },
            )
        }
        Cmd::Soak { minutes } => {
            setup()?;
            run(Command::new("cargo")
                .args([
                    "test",
                    "--release",
                    "-p",
                    "tracer-collector",
                    "--test",
                    "soak",
                ])
                .args(["--", "--nocapture"])
                .env("TRACER_SOAK_SECONDS", (minutes * 60).to_string()))
        }
        Cmd::Bench {
            rounds,
            seconds,
            kernel_only,
            sdk_only,
            sdk_rounds,
            sdk_pairs,
            sdk_seconds,
            breakdown_only,
            compare_bin,
            agent_args,
        } => {
            setup()?;
            build_release()?;
            bench::bench(
                &root(),
                &bench::BenchArgs {
                    rounds,
                    seconds,
                    kernel_only,
                    agent_args,
                    sdk_only,
                    sdk: sdk_bench::SdkArgs {
                        rounds: sdk_rounds,
                        pairs: sdk_pairs,
                        seconds: sdk_seconds,
                    },
                    breakdown_only,
                    compare_bin,
                },
            )
        }
        Cmd::Traces {
            seconds,
            rate,
            concurrency,
            arch,
            clock_shift_ms,
            pattern,
            downstream,
            logs,
            agent_arg,
        } => {
            setup()?;
            build_release()?;
            traces::traces(
                &root(),
                &traces::TracesArgs {
                    seconds,
                    rate,
                    concurrency,
                    archs: arch,
                    clock_shift_ms,
                    pattern,
                    downstream,
                    logs,
                    agent_args: agent_arg,
                },
            )
        }
        Cmd::Kernels {
            only,
            no_host,
            bin_dir,
        } => {
            setup()?;
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => {
                    build_release()?;
                    root().join("target/release")
                }
            };
            kernels::kernels(
                &root(),
                &kernels::KernelsArgs {
                    only,
                    no_host,
                    bin_dir,
                },
            )
        }
        Cmd::Fuzz { seconds, targets } => {
            setup()?;
            fuzz(seconds, &targets)
        }
        Cmd::Package => {
            build_release()?;
            run(Command::new("bash")
                .arg(root().join("packaging/build-debs.sh"))
                .arg(root().join("target/release"))
                .arg(root().join("target/debian")))
        }
        Cmd::Run { args } => {
            setup()?;
            build_release()?;
            main_job(&args)
        }
    }
}

/// The README's main job: the collector with its embedded store and UI, plus the agent.
/// The last SIGINT/SIGTERM/SIGHUP this process received (0: none).
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn note_stop_signal(sig: libc::c_int) {
    // An atomic store is async-signal-safe.
    STOP_SIGNAL.store(sig, std::sync::atomic::Ordering::Relaxed);
}

/// Waits for `child`; if this process is told to stop, passes it on. Ctrl-C in a terminal
/// reaches the whole process group, but `kill <xtask pid>` or a service manager reaches only
/// xtask, and the collector and agent would be left running.
fn wait_or_stop(child: &mut std::process::Child) -> anyhow::Result<std::process::ExitStatus> {
    let mut told_at = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if STOP_SIGNAL.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            let since = *told_at.get_or_insert_with(std::time::Instant::now);
            // Give a child that got the signal itself (Ctrl-C) time to stop on its own; one
            // signal is a clean shutdown, a second one could cut its flush short.
            if since.elapsed() > std::time::Duration::from_secs(3) {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                return Ok(child.wait()?);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn main_job(agent_args: &[String]) -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, note_stop_signal as *const () as libc::sighandler_t) };
    }
    use std::io::{BufRead, BufReader};
    let bin = root().join("target/release");
    let data = root().join("tracer-data");
    eprintln!(
        "\x1b[1m[xtask]\x1b[0m starting the collector (store in {})",
        data.display()
    );
    // Its own process group: the terminal's Ctrl-C reaches the agent (and xtask), not the
    // collector, which is stopped once the agent has flushed its last spans into it. Stopped
    // together, the collector was often gone before the agent's final export (spans dropped).
    let mut collector = Command::new(bin.join("tracer-collector"))
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting tracer-collector")?;
    let stderr = collector.stderr.take().context("collector stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                eprintln!("{line}");
                if line.contains("tracer-collector: ready") {
                    break;
                }
            }
            _ => {
                let status = collector.wait()?;
                bail!("the collector exited before it was ready ({status})");
            }
        }
    }
    // Keep echoing the collector's log.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
    eprintln!(
        "\x1b[1m[xtask]\x1b[0m starting the agent; open http://127.0.0.1:16686 (Ctrl-C stops both)"
    );
    let mut agent = Command::new(bin.join("tracer"))
        .args(["agent", "--endpoint", "http://127.0.0.1:4318"])
        .args(agent_args)
        .spawn()
        .context("starting the agent")?;
    let status = wait_or_stop(&mut agent)?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(collector.id() as i32, libc::SIGTERM) };
    let _ = collector.wait();
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    Ok(())
}
