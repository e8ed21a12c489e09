//! `cargo xtask traces`: how whole the traces are. Four hosts (network namespaces), one agent
//! each, one collector; a load client → nginx → the service under test → a data service, for
//! each service architecture and number of concurrent clients; the traces read back from the
//! collector's Jaeger API are scored against the load client's ground truth (see
//! `tracer_test_support::topology`).
use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{bail, Context as _};
use tracer_test_support::topology::{self, Arch, Downstream, LoadSpec, Options, Score, Topology};

pub struct TracesArgs {
    pub seconds: f64,
    pub rate: f64,
    pub concurrency: Vec<usize>,
    pub archs: Vec<String>,
    pub clock_shift_ms: Option<i64>,
    pub pattern: String,
    pub downstream: Vec<String>,
    pub logs: bool,
    /// Passed to every host's agent.
    pub agent_args: Vec<String>,
}

struct Row {
    arch: Arch,
    downstream: Downstream,
    clients: usize,
    rate: f64,
    failed: usize,
    score: Score,
}

fn pct(n: usize, of: usize) -> String {
    if of == 0 {
        "-".into()
    } else {
        format!("{:.2}%", n as f64 * 100.0 / of as f64)
    }
}

fn by_provenance(m: &std::collections::BTreeMap<(String, String, String), usize>) -> String {
    m.iter()
        .map(|((source, conf, by), n)| format!("{source}/{conf}/{by}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| service | data call | clients | req/s | requests | complete | linked | wrong | wrong, high | orphans | spans missing | max child-before-parent µs |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let s = &r.score;
        let high: usize = s
            .wrong_by
            .iter()
            .filter(|((_, conf, _), _)| conf == "high")
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.arch.name(),
            r.downstream.name(),
            r.clients,
            r.rate,
            s.requests,
            pct(s.complete, s.requests),
            pct(s.linked, s.links_expected),
            s.wrong,
            high,
            s.orphans,
            s.missing,
            s.max_early_us,
        );
    }
    out
}

fn details(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        let s = &r.score;
        let _ = writeln!(
            out,
            "{} ({} data call) x{}: one trace {}, failed requests {}, duplicates {}, other spans {}, missing by hop {:?}, orphans by hop {:?}, largest end past parent {} µs",
            r.arch.name(),
            r.downstream.name(),
            r.clients,
            pct(s.one_trace, s.requests),
            r.failed,
            s.duplicates,
            s.other,
            s.missing_by_hop,
            s.orphans_by_hop,
            s.max_late_end_us,
        );
        if let Some((child, parent)) = &s.max_early_pair {
            let _ = writeln!(
                out,
                "    largest child-before-parent: {child} starts {} µs before {parent}",
                s.max_early_us
            );
        }
        if !s.right_by.is_empty() {
            let _ = writeln!(
                out,
                "    right links (source/confidence/by): {}",
                by_provenance(&s.right_by)
            );
        }
        if !s.wrong_by.is_empty() {
            let _ = writeln!(
                out,
                "    wrong links (source/confidence/by): {}",
                by_provenance(&s.wrong_by)
            );
        }
        if s.shifted > 0 {
            let shifts: Vec<String> = s
                .shift_by_host
                .iter()
                .map(|(h, (lo, hi))| format!("{h} {lo}..{hi} µs"))
                .collect();
            let _ = writeln!(
                out,
                "    clock corrected on {} spans: {}",
                s.shifted,
                shifts.join(", ")
            );
        }
    }
    out
}

pub fn traces(root: &Path, args: &TracesArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("xtask traces creates network namespaces and loads eBPF programs: run it as root");
    }
    let archs = args
        .archs
        .iter()
        .map(|a| Arch::parse(a).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency takes numbers of clients above 0, e.g. 1,8,64");
    }
    if args.seconds <= 0.0 || args.rate < 0.0 {
        bail!("--seconds must be above 0 and --rate 0 (as fast as possible) or more");
    }
    if args.pattern.is_empty() || !args.pattern.chars().all(|c| "res".contains(c)) {
        bail!("--pattern is made of r (normal), e (error) and s (slow) only");
    }
    let downstreams = args
        .downstream
        .iter()
        .map(|d| match d.as_str() {
            "same" => Ok(Downstream::SameId),
            "opaque" => Ok(Downstream::Opaque),
            other => bail!("--downstream {other:?}: use same, opaque or both (same,opaque)"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Ctrl-C reaches the whole process group: the load client, the agents and the collector
    // stop, and this process, instead of dying with them, gets an error or a panic from the
    // next step and unwinds, so the namespaces and the bridge are removed. A stop signal sent
    // to this process alone ends the run between two loads.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(
                sig,
                crate::note_stop_signal as *const () as libc::sighandler_t,
            )
        };
    }
    let stop = || crate::STOP_SIGNAL.load(std::sync::atomic::Ordering::Relaxed) != 0;
    let scratch = std::env::temp_dir().join(format!("tracer-test-traces-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let bin = root.join("target/release");
    let mut agent_args = Vec::new();
    if !args.agent_args.is_empty() {
        for host in topology::HOSTS {
            agent_args.push((host.to_owned(), args.agent_args.clone()));
        }
    }
    if let Some(ms) = args.clock_shift_ms {
        agent_args.push((
            "service".to_owned(),
            vec!["--clock-shift-ms".to_owned(), ms.to_string()],
        ));
    }
    let opts = Options {
        tracer: bin.join("tracer"),
        collector: bin.join("tracer-collector"),
        scratch: scratch.clone(),
        agent_args,
        echo_logs: args.logs,
    };
    eprintln!(
        "\x1b[1m[traces]\x1b[0m four hosts (client, proxy, service, data), one agent each{}, the collector; scratch in {}",
        args.clock_shift_ms
            .map(|ms| format!(" (the service host's clock shifted by {ms} ms)"))
            .unwrap_or_default(),
        scratch.display()
    );
    let mut topo = Topology::start(&opts);
    let margin_us = args.clock_shift_ms.map_or(0, |ms| ms.unsigned_abs() * 1000);
    let mut rows = Vec::new();
    // Numbered runs make the rids unique in the store, and look like the ids real paths carry
    // (`r` + run + `x` + client + `x` + n: mostly digits), which the agent's shared-id rule
    // needs; a made-up id such as `threaded8x3x57` is not one.
    let mut run = 0;
    for (arch, downstream) in archs
        .iter()
        .flat_map(|&a| downstreams.iter().map(move |&d| (a, d)))
    {
        eprintln!(
            "\x1b[1m[traces]\x1b[0m service architecture {} ({} data call): starting nginx, the service and the data service",
            arch.name(),
            downstream.name()
        );
        if stop() {
            break;
        }
        topo.downstream = downstream;
        topo.start_peers(arch);
        for &clients in &args.concurrency {
            if stop() {
                break;
            }
            let spec = LoadSpec {
                concurrency: clients,
                rate: args.rate,
                seconds: args.seconds,
                count: 0,
                pattern: args.pattern.clone(),
                tag: {
                    run += 1;
                    run.to_string()
                },
            };
            eprint!(
                "\x1b[1m[traces]\x1b[0m {} ({}) x{clients}: {} s at {} req/s ... ",
                arch.name(),
                downstream.name(),
                args.seconds,
                args.rate
            );
            let load = topo.run_load(&spec);
            let failed = load.requests.iter().filter(|r| r.status == 0).count();
            eprintln!(
                "{} requests ({:.0}/s), {failed} failed; waiting for spans",
                load.requests.len(),
                load.rate
            );
            let traces = topology::wait_for_traces(
                topo.query_port,
                &load,
                margin_us,
                Duration::from_secs(5),
                Duration::from_secs(90),
                &mut |have, want, took| {
                    eprintln!(
                        "\x1b[1m[traces]\x1b[0m   spans {have}/{want} (read back in {:.1} s)",
                        took.as_secs_f64()
                    );
                },
            );
            let score = topology::score(&load, &traces);
            eprintln!(
                "\x1b[1m[traces]\x1b[0m   complete {}, linked {}, wrong {}, orphans {}, missing {}, max child-before-parent {} µs",
                pct(score.complete, score.requests),
                pct(score.linked, score.links_expected),
                score.wrong,
                score.orphans,
                score.missing,
                score.max_early_us
            );
            rows.push(Row {
                arch,
                downstream,
                clients,
                rate: load.rate,
                failed,
                score,
            });
        }
    }
    drop(topo);
    // The store of a run is ~100 MB, of no use once its collector has stopped.
    let _ = std::fs::remove_dir_all(&scratch);
    println!();
    println!(
        "Whole traces, {} s a run at {} req/s asked{} (`cargo xtask traces`):",
        args.seconds,
        args.rate,
        args.clock_shift_ms
            .map(|ms| format!(", the service host's agent clock shifted by {ms} ms"))
            .unwrap_or_default()
    );
    println!();
    print!("{}", table(&rows));
    println!();
    print!("{}", details(&rows));
    println!(
        "hops: 0 client CLIENT, 1 proxy SERVER, 2 proxy CLIENT, 3 service SERVER, 4 service CLIENT, 5 data SERVER. \
         complete: the request's whole tree (client → proxy → service → data, 6 spans) is one trace with every parent right; \
         linked: share of the 5 non-root spans a request whose parent is the expected span; wrong: spans with another parent \
         (by the child's tracer.link.source/confidence/by above); orphans: no parent; max child-before-parent: the largest \
         start of a span before its parent's, as the API returns them (after clock correction)."
    );
    if stop() {
        bail!("stopped by a signal: the table holds the runs before it");
    }
    Ok(())
}
