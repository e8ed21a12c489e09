//! The agent's main loop: drain the ring buffer, pair requests with responses, build spans with
//! resource facts, hand them to the exporter (or stdout), and keep the counters.
use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    btf,
    context::Trust,
    export,
    loss::LossWatch,
    metrics,
    pipeline::{Filters, Pipeline, Sampler, Sink},
    priority,
    probes::{self, Counters, LoadOptions, Probes},
    recording, resource,
    ring::{self, Ring},
    settings::{parse_service_rule, AgentArgs},
    stats::{summary, Stats},
};
/// How often the kernel's counters are read for the metrics.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the ring buffer is drained when the probes did not wake us. Each drain starts with
/// the agent's working set (connections, pairing state, code) evicted by the traced processes
/// while it slept; fewer, larger drains pay that less often. Measured at 10k requests/s
/// (3 alternated runs): 10 ms 8.2 µs of agent CPU a request, 25 ms 6.5, 50 ms 6.0, 100 ms 5.8.
/// At saturation 100 ms raised wrk's p99 by 1-3 ms (the agent's longer bursts on a shared
/// CPU); 50 ms stayed within noise of 10 ms.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// The longest wait between drains while records trickle in (spans wait up to the export batch
/// timeout, 500 ms, anyway), and when there are none: the wait doubles from `DRAIN_INTERVAL`
/// at each drain that finds nothing. A wake-up is ~40 µs of CPU on a VM whose idle CPUs halt
/// (measured on this project's machine): 20 a second were most of an idle agent's CPU, and a
/// microsecond a request at 1k requests/s.
const TRICKLE_DRAIN_INTERVAL: Duration = Duration::from_millis(200);
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// The wait before the next timer drain, after one that found `bytes` of records written in
/// `elapsed`: long enough for a quarter of what the probes' wake-up asks for (the drains stay
/// large at low rates), within `DRAIN_INTERVAL` and `TRICKLE_DRAIN_INTERVAL`; after a drain that
/// found nothing, twice the last wait, up to `IDLE_DRAIN_INTERVAL`.
fn next_drain_wait(last: Duration, bytes: u64, elapsed: Duration) -> Duration {
    if bytes == 0 {
        return (last * 2).clamp(DRAIN_INTERVAL, IDLE_DRAIN_INTERVAL);
    }
    ring::quarter_wakeup_time(bytes, elapsed).clamp(DRAIN_INTERVAL, TRICKLE_DRAIN_INTERVAL)
}

fn filters(args: &AgentArgs, export_addrs: Vec<SocketAddr>) -> Filters {
    Filters {
        pids: args.pids.clone(),
        executables: args.executables.clone(),
        cgroups: args.cgroups.clone(),
        ports: args.ports.clone(),
        export_addrs,
    }
}

fn drain(ring: &mut Ring, pipeline: &mut Pipeline) {
    ring.drain(|record| pipeline.handle(record));
    pipeline.flush_outbox();
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let args = args.with_config_file()?;
    let rules = args
        .service_rules
        .iter()
        .map(|r| parse_service_rule(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let export_config = args.export_config()?;
    let metrics_addr = args.metrics_addr()?;
    if args.metrics_only && metrics_addr.is_none() {
        anyhow::bail!("--metrics-only needs the metrics endpoint: --metrics-addr must not be off");
    }
    let adaptive_priority = args.adaptive_priority()?;
    let trust = match &args.trust_context {
        Some(t) => Trust::parse(t)?,
        None => Trust::All,
    };
    let protocols = args.protocols()?;

    // The agent's memory is many small short-lived allocations: transparent huge pages would
    // make each touched 2 MiB of heap resident (measured: +32 MiB of RSS, no speed-up).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    raise_file_limit();
    probes::preflight()?;
    let netns = match &args.netns {
        Some(path) => netns_inode(path)?,
        None => 0,
    };
    let inject = if args.inject_context {
        Some(inject_options(args.netns.as_deref(), &trust)?)
    } else {
        None
    };
    let sample_in_kernel = args.kernel_sample_share()?;
    let carry_decisions = match (&sample_in_kernel, args.tcp_option_networks()?) {
        (Some(_), Some(networks)) => Some(probes::CarryOptions {
            netns_cookie: netns_cookie(args.netns.as_deref())?,
            networks: match networks {
                Trust::Networks(nets) => Some(nets),
                _ => None,
            },
        }),
        _ => None,
    };
    let offsets = btf::kernel_offsets().context("reading kernel structure offsets from BTF")?;
    let mut probes = Probes::load(
        &offsets,
        &LoadOptions {
            ring_buffer_bytes: args.ring_buffer_bytes()?,
            max_connections: 65536,
            netns,
            inject,
            tls: !args.no_tls,
            metrics_only: args.metrics_only,
            sample_in_kernel,
            carry_decisions,
        },
    )?;
    let ring = probes.take_ring_buffer()?;
    let counters: Counters = probes.take_counters()?;
    let kernel_conns = probes.take_connections()?;

    let also_configs = args.also_export_configs(&export_config)?;
    let also_urls: Vec<String> = also_configs.iter().map(|c| c.url.clone()).collect();
    let mut stats = Stats::default();
    let mut exporters = Vec::new();
    let sink = if args.stdout {
        Sink::Stdout
    } else {
        let (tx, handle) = export::spawn(export_config.clone(), stats.export.clone())?;
        exporters.push(handle);
        let mut also = Vec::new();
        for config in also_configs {
            let endpoint_stats = Arc::new(export::ExportStats::default());
            stats
                .also_exports
                .push((export::endpoint_label(&config.url), endpoint_stats.clone()));
            log::info!("also exporting to {}", export::endpoint_label(&config.url));
            let (other, handle) = export::spawn(config, endpoint_stats)?;
            exporters.push(handle);
            also.push(other);
        }
        Sink::Otlp(tx, also)
    };
    let stats = Arc::new(stats);
    // Every endpoint's traffic is left out, or a receiver on this host (a relay taking
    // --also-export) would trace each export as a request, whose span is exported in turn.
    let mut export_addrs = Vec::new();
    if !args.stdout {
        for url in std::iter::once(&export_config.url).chain(&also_urls) {
            export_addrs.extend(resolve_endpoint(url).await);
        }
    }
    if let Some(addr) = metrics_addr {
        metrics::serve(addr, stats.clone()).await?;
    }

    let mut pipeline = Pipeline::new(rules, filters(&args, export_addrs), sink, stats.clone());
    pipeline.configure(&args, trust, protocols);
    pipeline.sample = args.sample_share()?.map(Sampler::new);
    if let (Some(_), Some(sampler)) = (sample_in_kernel, pipeline.sample) {
        // A trace a kept exchange starts gets an id the sampler keeps.
        pipeline.linker.keep_below = Some(sampler.bound());
    }
    if let Some(path) = &args.netns {
        pipeline.host.ips = resource::host_ips_in(path)?;
    }
    pipeline.kernel_conns = Some(kernel_conns);
    if args.metrics_only || sample_in_kernel.is_some() {
        pipeline.kernel_red = Some(probes.take_kernel_red()?);
    }
    if let Some(path) = &args.record {
        pipeline.recording = Some(recording::create_recording(path)?);
    }
    log::info!(
        "tracing TCP and DNS on {}{} (kernel {}): {} probes attached; {}",
        pipeline.host.name,
        match &args.netns {
            Some(path) => format!(" (network namespace {}, inode {netns})", path.display()),
            None => String::new(),
        },
        probes::kernel_release(),
        probes.attached,
        if args.stdout {
            "printing spans to stdout".to_string()
        } else {
            format!("exporting to {}", export_config.url)
        }
    );
    eprintln!("tracer: ready");

    let priority_watchdog = if adaptive_priority {
        let stats = stats.clone();
        let on_boost = move || {
            stats.agent.priority_boosts.fetch_add(1, Relaxed);
        };
        let watched = priority::RingWakeups::new(ring.as_fd())
            .map_err(|e| format!("cannot wait on the ring buffer: {e}"))
            .and_then(|wakeups| priority::watch(ring.fill(), wakeups, on_boost));
        match watched {
            Ok(watchdog) => Some(watchdog),
            Err(why) => {
                log::info!("the agent runs at normal priority throughout: {why}");
                None
            }
        }
    } else {
        None
    };

    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    // The next drain the probes did not ask for. Every drain pushes it back: with traffic, the
    // probes' wake-ups (one per 256 KiB of records) do the draining, and the timer only catches
    // what stays below that.
    let mut drain_every = DRAIN_INTERVAL;
    let drain_timer = tokio::time::sleep(drain_every);
    tokio::pin!(drain_timer);
    let fill = ring.get_ref().fill();
    let (mut produced, mut last_drain) = (fill.produced(), Instant::now());
    let mut last_tick = Instant::now();
    // Both streams are made once, before the loop. `tokio::signal::ctrl_c()` inside the
    // `select!` made a new listener each iteration, and a listener only hears signals sent
    // after it exists: a Ctrl-C that arrived while the loop was draining (most of its time
    // under load) was lost, and the agent ignored it (1 in 4 under wrk in a review).
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_housekeeping = Instant::now();
    let mut last_counters = Instant::now();
    let mut losses = LossWatch::new(pipeline.unix_now(), 1 + also_urls.len());
    let mut last_stats = Instant::now();
    loop {
        let woken = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut pipeline);
                guard.clear_ready();
                true
            }
            _ = &mut drain_timer => {
                drain(ring.get_mut(), &mut pipeline);
                false
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let now_produced = fill.produced();
        drain_every = if woken {
            DRAIN_INTERVAL
        } else {
            next_drain_wait(drain_every, now_produced - produced, last_drain.elapsed())
        };
        (produced, last_drain) = (now_produced, Instant::now());
        drain_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + drain_every);
        // The periodic work (timeouts, held spans, counters) at the drain interval, whichever
        // kind of drain comes first.
        if last_tick.elapsed() >= DRAIN_INTERVAL {
            last_tick = Instant::now();
            pipeline.tick();
            // A syscall per counter: once a second is plenty for metrics, and every drain
            // it was a measurable share of the agent's CPU at 10k requests/s.
            if last_counters.elapsed() >= COUNTERS_INTERVAL {
                let kernel = counters.read();
                *stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = kernel;
                pipeline.report_losses(&mut losses, &kernel);
                last_counters = Instant::now();
            }
            if last_housekeeping.elapsed() > Duration::from_secs(30) {
                pipeline.housekeeping();
                probes.rescan_tls();
                last_housekeeping = Instant::now();
            }
            if args.stats && last_stats.elapsed() > Duration::from_secs(10) {
                log::info!("{}", summary(&stats));
                last_stats = Instant::now();
            }
        }
    }

    log::info!("stopping: detaching probes and flushing spans");
    // Back to normal priority first: the last drain and the flush must not wait for idle CPU.
    drop(priority_watchdog);
    drain(ring.get_mut(), &mut pipeline);
    pipeline.flush_outbox();
    *stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = counters.read();
    // Detach before flushing: nothing new comes in while we wait on the collector.
    drop(ring);
    drop(probes);
    let sink = pipeline.take_sink();
    drop(pipeline);
    drop(sink);
    for handle in exporters {
        let _ = handle.await;
    }
    log::info!("{}", summary(&stats));
    Ok(())
}

/// Raises the open-file soft limit to the hard limit: the usual soft 1024 is few for a daemon
/// that follows a host's connections, serves metrics to any local user and exports over a pool.
fn raise_file_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                log::warn!(
                    "cannot raise the open-file limit from {}: {}",
                    limit.rlim_cur,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// What the context injector is told: whose namespace it may change, and whose context it
/// carries on (the same `--trust-context` the linker applies).
fn inject_options(
    netns: Option<&std::path::Path>,
    trust: &Trust,
) -> anyhow::Result<probes::InjectOptions> {
    let netns_cookie = netns_cookie(netns)?;
    let (trust, trusted) = match trust {
        Trust::All => (1, Vec::new()),
        Trust::Nobody => (0, Vec::new()),
        Trust::Networks(nets) => (2, nets.clone()),
    };
    Ok(probes::InjectOptions {
        netns_cookie,
        trust,
        trusted,
    })
}

/// The cookie of the `--netns` namespace (`SO_NETNS_COOKIE` of a socket made inside it, Linux
/// 5.14+): how sock_ops programs name a namespace; 0 (every namespace) without one. Made on a
/// thread of its own, which enters the namespace and ends.
fn netns_cookie(netns: Option<&std::path::Path>) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let Some(path) = netns else {
        return Ok(0);
    };
    let ns = std::fs::File::open(path)
        .with_context(|| format!("--netns {}: cannot open it", path.display()))?;
    let cookie = std::thread::scope(|scope| {
        scope
            .spawn(|| -> std::io::Result<u64> {
                // SAFETY: plain syscalls on descriptors this thread owns; setns affects only
                // this thread, which ends right after.
                unsafe {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut cookie = 0u64;
                    let mut len = size_of::<u64>() as libc::socklen_t;
                    const SO_NETNS_COOKIE: libc::c_int = 71;
                    let rc = libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        SO_NETNS_COOKIE,
                        (&raw mut cookie).cast(),
                        &mut len,
                    );
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if rc != 0 {
                        return Err(err);
                    }
                    Ok(cookie)
                }
            })
            .join()
    })
    .map_err(|_| anyhow::anyhow!("the thread reading the namespace cookie panicked"))?;
    cookie.with_context(|| {
        format!(
            "--inject-context with --netns {}: reading the namespace's cookie failed \
             (SO_NETNS_COOKIE needs Linux 5.14)",
            path.display()
        )
    })
}

/// The inode number of a network namespace file: how the probes name the namespace.
fn netns_inode(path: &std::path::Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "--netns {}: no such namespace file (use /run/netns/NAME from `ip netns add NAME`, \
             or /proc/PID/ns/net of a process inside it)",
            path.display()
        )
    })?;
    // A namespace file lives on nsfs (a bind mount of one under /run/netns, or the magic link
    // in /proc, whose target names the namespace type).
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let on_nsfs = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .ok()
        .is_some_and(|c| {
            // SAFETY: a valid C string and an out-pointer to a zeroed statfs.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC }
        });
    let other_type =
        std::fs::read_link(path).is_ok_and(|t| !t.to_string_lossy().starts_with("net:["));
    match u32::try_from(meta.ino()) {
        Ok(ino) if on_nsfs && !other_type => Ok(ino),
        _ => anyhow::bail!(
            "--netns {}: not a network namespace file (expected /run/netns/NAME or /proc/PID/ns/net)",
            path.display()
        ),
    }
}

async fn resolve_endpoint(url: &str) -> Vec<SocketAddr> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Vec::new();
    };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return Vec::new();
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .map(|a| a.collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tracer_common::WAKEUP_THRESHOLD_BYTES;

    use super::*;

    /// Busy: every 50 ms; a trickle: drains of a quarter threshold, up to 200 ms apart; nothing:
    /// the wait doubles up to a second; traffic again: back at once.
    #[test]
    fn the_drain_timer_slows_down_with_the_traffic() {
        let ms = Duration::from_millis;
        let quarter = WAKEUP_THRESHOLD_BYTES / 4;
        assert_eq!(next_drain_wait(ms(50), 10 * quarter, ms(50)), ms(50));
        assert_eq!(next_drain_wait(ms(50), quarter / 2, ms(50)), ms(100));
        assert_eq!(next_drain_wait(ms(100), 100, ms(100)), ms(200));
        let mut wait = ms(200);
        for want in [400, 800, 1000, 1000] {
            wait = next_drain_wait(wait, 0, wait);
            assert_eq!(wait, ms(want));
        }
        assert_eq!(next_drain_wait(wait, 100 * quarter, wait), ms(50));
    }
}
