//! `cargo xtask bench`: what tracing costs, measured side by side in one run.
//!
//! nginx (apt) under wrk (apt) on loopback, alternating agent off / agent on (full pipeline:
//! probes, parsing, export to a running collector), at saturation and at a paced ~10k req/s;
//! a kernel micro-benchmark (cost per traced syscall); and the collector's ingest rate.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

pub struct BenchArgs {
    pub rounds: usize,
    pub seconds: u64,
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) -> anyhow::Result<()> {
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
fn start_ready(mut cmd: Command, ready: &str) -> anyhow::Result<Killed> {
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

fn nginx(dir: &Path, port: u16) -> anyhow::Result<Killed> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log error;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {d}/b; proxy_temp_path {d}/p;\n\
         fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         server {{ listen 127.0.0.1:{port}; location = /ok {{ return 200 \"ok\\n\"; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .spawn()?;
    wait_port(port)?;
    Ok(Killed(child))
}

#[derive(Default, Clone, Copy)]
struct Wrk {
    rps: f64,
    requests: u64,
    p50_us: f64,
    p99_us: f64,
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

fn wrk(port: u16, seconds: u64, paced: bool, dir: &Path) -> anyhow::Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "--latency", &format!("-d{seconds}s")]);
    if paced {
        // 10 connections, each waiting 1 ms between requests: ~10k req/s, well below saturation.
        let script = dir.join("pace.lua");
        std::fs::write(&script, "function delay() return 1 end\n")?;
        cmd.args(["-c10", "-s"]).arg(script);
    } else {
        cmd.arg("-c50");
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}/ok"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk::default();
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
        bail!("could not read wrk's output:\n{text}");
    }
    Ok(w)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn peak_rss_mib(pid: u32) -> f64 {
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
fn metric(port: u16, name: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

struct Run {
    wrk: Wrk,
    agent_cpu_us_per_req: f64,
    agent_peak_mib: f64,
    ringbuf_drops: u64,
    export_drops: u64,
    spans_built: u64,
    collector_spans: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn bench(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let bin = root.join("target/release");
    let work = std::env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let nginx_port = free_port();
    let _nginx = nginx(&work.join("nginx"), nginx_port)?;
    let (grpc, http, query) = (free_port(), free_port(), free_port());
    let mut collector_cmd = Command::new(bin.join("tracer-collector"));
    collector_cmd
        .arg("--data-dir")
        .arg(work.join("store"))
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .args(["--query-addr", &format!("127.0.0.1:{query}")]);
    let collector = start_ready(collector_cmd, "tracer-collector: ready")?;
    let metrics_port = free_port();

    let mut results: Vec<(bool, bool, Run)> = Vec::new();
    for round in 0..args.rounds {
        for paced in [false, true] {
            for traced in [false, true] {
                let agent = if traced {
                    let mut cmd = Command::new(bin.join("tracer"));
                    cmd.args(["agent", "--endpoint", &format!("http://127.0.0.1:{http}")])
                        .args(["--port", &nginx_port.to_string()])
                        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
                        .env("RUST_LOG", "warn");
                    Some(start_ready(cmd, "tracer: ready")?)
                } else {
                    None
                };
                let before_spans = metric(query, "tracer_collector_spans_accepted_total");
                let cpu0 = agent.as_ref().map_or(0.0, |a| cpu_seconds(a.0.id()));
                let w = wrk(nginx_port, args.seconds, paced, &work)?;
                let mut run = Run {
                    wrk: w,
                    agent_cpu_us_per_req: 0.0,
                    agent_peak_mib: 0.0,
                    ringbuf_drops: 0,
                    export_drops: 0,
                    spans_built: 0,
                    collector_spans: 0,
                };
                if let Some(a) = &agent {
                    // Let the last batches reach the collector before reading the counters.
                    std::thread::sleep(Duration::from_millis(1500));
                    let pid = a.0.id();
                    run.agent_cpu_us_per_req = (cpu_seconds(pid) - cpu0) * 1e6 / w.requests as f64;
                    run.agent_peak_mib = peak_rss_mib(pid);
                    run.ringbuf_drops = metric(metrics_port, "tracer_ringbuf_dropped_total");
                    run.export_drops =
                        metric(metrics_port, "tracer_export_dropped_queue_full_total")
                            + metric(metrics_port, "tracer_export_dropped_rejected_total");
                    run.spans_built = metric(metrics_port, "tracer_spans_total");
                    run.collector_spans =
                        metric(query, "tracer_collector_spans_accepted_total") - before_spans;
                }
                drop(agent);
                eprintln!(
                    "round {} {:<10} {:<8} {:>9.0} req/s  p50 {:>7.1} us  p99 {:>7.1} us{}",
                    round + 1,
                    if paced { "paced" } else { "saturated" },
                    if traced { "traced" } else { "untraced" },
                    w.rps,
                    w.p50_us,
                    w.p99_us,
                    if traced {
                        format!(
                            "  agent {:.2} us/req, peak {:.1} MiB, ringbuf drops {}, export drops {}, spans {} (collector got {}) for {} requests",
                            run.agent_cpu_us_per_req, run.agent_peak_mib, run.ringbuf_drops, run.export_drops, run.spans_built, run.collector_spans, w.requests
                        )
                    } else {
                        String::new()
                    }
                );
                results.push((paced, traced, run));
            }
        }
    }
    let pick = |paced: bool, traced: bool, f: &dyn Fn(&Run) -> f64| -> f64 {
        median(
            results
                .iter()
                .filter(|(p, t, _)| *p == paced && *t == traced)
                .map(|(_, _, r)| f(r))
                .collect(),
        )
    };
    let sat_ratio = pick(false, true, &|r| r.wrk.rps) / pick(false, false, &|r| r.wrk.rps);
    let p50_added = pick(true, true, &|r| r.wrk.p50_us) - pick(true, false, &|r| r.wrk.p50_us);
    let p99_added = pick(true, true, &|r| r.wrk.p99_us) - pick(true, false, &|r| r.wrk.p99_us);
    let syscall_ns = kernel_cost(&bin, &work)?;
    println!(
        "\n== tracer overhead (median of {} rounds, {} s each) ==",
        args.rounds, args.seconds
    );
    println!(
        "throughput at saturation, traced / untraced   {:.3}  ({:.0} vs {:.0} req/s)",
        sat_ratio,
        pick(false, true, &|r| r.wrk.rps),
        pick(false, false, &|r| r.wrk.rps)
    );
    println!(
        "p50 latency added at ~{:.0} req/s              {:+.1} us  (p99 {:+.1} us)",
        pick(true, false, &|r| r.wrk.rps),
        p50_added,
        p99_added
    );
    println!(
        "agent CPU per request (saturated / paced)     {:.2} us / {:.2} us",
        pick(false, true, &|r| r.agent_cpu_us_per_req),
        pick(true, true, &|r| r.agent_cpu_us_per_req)
    );
    println!(
        "agent peak memory                             {:.1} MiB",
        results
            .iter()
            .map(|(_, _, r)| r.agent_peak_mib)
            .fold(0.0, f64::max)
    );
    println!("kernel cost per traced syscall                {syscall_ns:.0} ns");
    for (paced, name) in [(false, "saturated"), (true, "paced")] {
        let rs: Vec<&Run> = results
            .iter()
            .filter(|(p, t, _)| *p == paced && *t)
            .map(|(_, _, r)| r)
            .collect();
        let req: u64 = rs.iter().map(|r| r.wrk.requests).sum();
        println!(
            "{name:<10} requests {req}, spans built {} (2 per request expected), at the collector {}, ringbuf drops {}, export drops {}",
            rs.iter().map(|r| r.spans_built).sum::<u64>(),
            rs.iter().map(|r| r.collector_spans).sum::<u64>(),
            rs.iter().map(|r| r.ringbuf_drops).sum::<u64>(),
            rs.iter().map(|r| r.export_drops).sum::<u64>()
        );
    }
    println!("(collector ingest and query figures: cargo bench -p tracer-store, cargo bench -p tracer-collector)");
    drop(collector);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Nanoseconds a traced read or write costs: a loopback ping-pong of 1-byte messages with the
/// probes detached, then attached (agent running, tracing only this port).
fn kernel_cost(bin: &Path, work: &Path) -> anyhow::Result<f64> {
    const N: u32 = 100_000;
    let ping = || -> anyhow::Result<(f64, u16)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut s, _) = listener.accept()?;
            let mut b = [0u8; 1];
            for _ in 0..N {
                s.read_exact(&mut b)?;
                s.write_all(&b)?;
            }
            Ok(())
        });
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_nodelay(true)?;
        let mut b = [7u8; 1];
        let start = Instant::now();
        for _ in 0..N {
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
        }
        let el = start.elapsed().as_nanos() as f64;
        server
            .join()
            .map_err(|_| anyhow::anyhow!("ping server panicked"))??;
        // 4 syscalls per round trip (write+read on each side).
        Ok((el / (4.0 * f64::from(N)), port))
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..3 {
        off.push(ping()?.0);
        let mut cmd = Command::new(bin.join("tracer"));
        // A filter that matches nothing in user space: the probes still do all their kernel work
        // for these TCP sockets (classify, copy, ring buffer); this isolates the kernel side.
        cmd.args(["agent", "--stdout", "--metrics-addr", "off", "--pid", "1"])
            .env("RUST_LOG", "warn");
        let agent = start_ready(cmd, "tracer: ready")?;
        on.push(ping()?.0);
        drop(agent);
    }
    let _ = work;
    Ok(median(on) - median(off))
}
