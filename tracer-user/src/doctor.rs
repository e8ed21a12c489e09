//! `tracer doctor`: whether this host can run the agent and the agent can reach its collector,
//! one line a check, each failure with what to do. It runs the same pre-flight checks as the
//! agent, then goes further than the agent would before failing: it loads and attaches the
//! probes for real (the verifier's answer, not a guess from the kernel version), probes the
//! kernel features optional work needs (uprobes; sk_msg/sock_ops for `--inject-context`), sends an empty export to the
//! collector with the agent's settings (the same flags and config file), and reads the clock's
//! synchronisation state. Exit status 0 when nothing failed (warnings allowed), 1 otherwise.
use std::{fmt::Write as _, path::Path, time::Duration};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use crate::{
    btf, export,
    probes::{self, LoadOptions, Probes},
    settings::AgentArgs,
};

#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Ok,
    /// Works, with a caveat, or a feature later work needs is missing.
    Warn,
    Fail,
    /// Not checked because an earlier check failed.
    Skipped,
}

struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    fix: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn add(&mut self, name: &'static str, verdict: Verdict, detail: impl Into<String>) {
        self.0.push(Check {
            name,
            verdict,
            detail: detail.into(),
            fix: None,
        });
    }

    fn add_fix(
        &mut self,
        name: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Check {
            name,
            verdict,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }

    fn passed(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|c| c.name == name && matches!(c.verdict, Verdict::Ok | Verdict::Warn))
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.0.iter().filter(|c| c.verdict == verdict).count()
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.0 {
            let tag = match c.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
                Verdict::Skipped => "skip",
            };
            let mut lines = c.detail.lines();
            let _ = writeln!(
                out,
                "  {tag:<5} {:<20} {}",
                c.name,
                lines.next().unwrap_or("")
            );
            for line in lines {
                let _ = writeln!(out, "  {:<5} {:<20} {line}", "", "");
            }
            if let Some(fix) = &c.fix {
                for (i, line) in fix.lines().enumerate() {
                    let lead = if i == 0 { "fix:" } else { "" };
                    let _ = writeln!(out, "  {:<5} {:<20} {lead:<4} {line}", "", "");
                }
            }
        }
        out
    }
}

/// Runs every check, prints the report, and fails if any check did.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let args = args.with_config_file()?;
    let mut report = Report::default();
    host_checks(&mut report);
    probe_checks(&mut report);
    feature_checks(&mut report);
    collector_check(&mut report, &args).await;
    also_export_checks(&mut report, &args).await;
    clock_check(&mut report);
    println!(
        "tracer doctor: {} on {}, kernel {}",
        env!("CARGO_PKG_VERSION"),
        crate::resource::HostFacts::read().name,
        probes::kernel_release()
    );
    print!("{}", report.render());
    let (failed, warned) = (report.count(Verdict::Fail), report.count(Verdict::Warn));
    println!(
        "{} ok, {warned} warning{}, {failed} failed",
        report.count(Verdict::Ok),
        if warned == 1 { "" } else { "s" }
    );
    if failed > 0 {
        anyhow::bail!(
            "{failed} check{} failed: see the fix under each FAIL line",
            if failed == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// What the agent's pre-flight also checks: architecture, kernel, privileges, BTF, tracefs and
/// the syscall tracepoints.
fn host_checks(report: &mut Report) {
    if cfg!(target_arch = "x86_64") {
        report.add("architecture", Verdict::Ok, "x86_64");
    } else {
        report.add_fix(
            "architecture",
            Verdict::Fail,
            std::env::consts::ARCH,
            "the probes read syscall arguments from x86-64 registers; run on x86-64",
        );
    }
    match probes::kernel_version() {
        Some(v) if v >= (5, 15) => report.add(
            "kernel",
            Verdict::Ok,
            format!("{} (5.15 or later needed)", probes::kernel_release()),
        ),
        Some(_) => report.add_fix(
            "kernel",
            Verdict::Fail,
            format!("{} is older than 5.15", probes::kernel_release()),
            "the probes need bpf_task_pt_regs (5.15) and the BPF ring buffer (5.8): upgrade the kernel",
        ),
        None => report.add(
            "kernel",
            Verdict::Warn,
            format!("cannot read a version from {:?}", probes::kernel_release()),
        ),
    }
    match probes::check_privileges() {
        Ok(()) => report.add("privileges", Verdict::Ok, privileges_detail()),
        Err(e) => {
            let text = format!("{e:#}");
            let (what, fix) = text.split_once('\n').unwrap_or((&text, ""));
            report.add_fix("privileges", Verdict::Fail, what, fix.trim());
        }
    }
    match btf::kernel_offsets() {
        Ok(_) => report.add(
            "BTF",
            Verdict::Ok,
            "/sys/kernel/btf/vmlinux: every structure offset the probes use was found",
        ),
        Err(e) => report.add_fix(
            "BTF",
            Verdict::Fail,
            e.to_string(),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (the default of most distributions since 2020)",
        ),
    }
    let tracefs = Path::new(probes::TRACEFS);
    let events = std::fs::metadata(tracefs.join("events"));
    if events.is_ok() {
        report.add(
            "tracefs",
            Verdict::Ok,
            format!("mounted at {}", probes::TRACEFS),
        );
    } else if events.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied) {
        report.add(
            "tracefs",
            Verdict::Warn,
            format!(
                "{} is not readable by this user (the agent runs as root)",
                probes::TRACEFS
            ),
        );
    } else {
        report.add_fix(
            "tracefs",
            Verdict::Warn,
            format!(
                "not mounted at {}; the agent mounts it when it starts as root",
                probes::TRACEFS
            ),
            format!(
                "or mount it yourself: sudo mount -t tracefs nodev {}",
                probes::TRACEFS
            ),
        );
    }
    if !tracefs.join("events").exists() {
        report.add(
            "tracepoints",
            Verdict::Skipped,
            "tracefs is not mounted or not readable: run as root to check them",
        );
        return;
    }
    let events = tracefs.join("events/syscalls");
    let missing: Vec<&str> = probes::TRACEPOINTS
        .iter()
        .copied()
        .filter(|name| !events.join(name).exists())
        .collect();
    if missing.is_empty() {
        report.add(
            "tracepoints",
            Verdict::Ok,
            format!(
                "all {} syscall tracepoints exist",
                probes::TRACEPOINTS.len()
            ),
        );
    } else {
        report.add_fix(
            "tracepoints",
            Verdict::Fail,
            format!("missing: {}", missing.join(", ")),
            "syscall tracepoints need a kernel built with CONFIG_FTRACE_SYSCALLS=y",
        );
    }
}

fn privileges_detail() -> String {
    // SAFETY: geteuid has no preconditions.
    match unsafe { libc::geteuid() } {
        0 => "root".into(),
        uid => format!("uid {uid} with CAP_BPF and CAP_PERFMON"),
    }
}

/// Loads and attaches the probes with small maps, then detaches them: the verifier's answer.
fn probe_checks(report: &mut Report) {
    let needs = ["privileges", "BTF", "tracepoints"];
    if let Some(missing) = needs.iter().find(|n| !report.passed(n)) {
        report.add(
            "probes",
            Verdict::Skipped,
            format!("needs the {missing} check to pass first"),
        );
        return;
    }
    let offsets = match btf::kernel_offsets() {
        Ok(o) => o,
        Err(e) => {
            report.add("probes", Verdict::Fail, e.to_string());
            return;
        }
    };
    let options = LoadOptions {
        ring_buffer_bytes: 64 * 1024,
        max_connections: 1024,
        netns: 0,
        inject: None,
        tls: false,
        // The framing code of `--metrics-only` and the decisions of `--sample-in-kernel` in
        // too: the verifier's largest walk of the syscall programs, so a kernel that passes
        // here loads them either way.
        metrics_only: true,
        sample_in_kernel: Some(0.1),
        // With the decisions made at writes' entries and their sock_ops carrier, where the
        // capability allows.
        carry_decisions: Some(crate::probes::CarryOptions {
            netns_cookie: 0,
            // A list (empty here), so the verifier walks the network lookup too.
            networks: Some(Vec::new()),
        }),
    };
    match Probes::load(&offsets, &options) {
        Ok(mut loaded) => {
            let ring = loaded.take_ring_buffer();
            let verified = loaded.verified_instructions();
            let insns = match verified.iter().max_by_key(|(_, n)| *n) {
                Some((name, most)) => format!(
                    " (instructions verified: {most} in {name}, the largest; {} in all)",
                    verified.iter().map(|(_, n)| u64::from(*n)).sum::<u64>()
                ),
                None => String::new(),
            };
            report.add(
                "probes",
                Verdict::Ok,
                format!(
                    "{} programs accepted by the verifier{insns}, attached, then detached",
                    loaded.attached
                ),
            );
            match ring {
                Ok(_) => report.add("ring buffer", Verdict::Ok, "created and mapped"),
                Err(e) => report.add("ring buffer", Verdict::Fail, format!("{e:#}")),
            }
        }
        Err(e) => report.add_fix(
            "probes",
            Verdict::Fail,
            format!("{e:#}"),
            "report this with the kernel version and the lines above",
        ),
    }
}

/// Kernel features the agent does not need yet but its TLS and context-propagation work will:
/// warnings, never failures.
fn feature_checks(report: &mut Report) {
    if !report.passed("privileges") {
        report.add(
            "uprobes",
            Verdict::Skipped,
            "probing program types needs the privileges above",
        );
        report.add(
            "sk_msg/sock_ops",
            Verdict::Skipped,
            "probing program types needs the privileges above",
        );
        return;
    }
    let uprobe_pmu = Path::new("/sys/bus/event_source/devices/uprobe").exists();
    match is_program_supported(ProgramType::KProbe) {
        Ok(true) if uprobe_pmu => report.add(
            "uprobes",
            Verdict::Ok,
            "available (for tracing TLS libraries)",
        ),
        Ok(_) => report.add_fix(
            "uprobes",
            Verdict::Warn,
            "not available: TLS traffic could not be traced here",
            "uprobes need CONFIG_UPROBE_EVENTS=y",
        ),
        Err(e) => report.add("uprobes", Verdict::Warn, format!("could not probe: {e}")),
    }
    let programs = is_program_supported(ProgramType::SkMsg).unwrap_or(false)
        && is_program_supported(ProgramType::SockOps).unwrap_or(false);
    let helpers =
        is_helper_supported(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_push_data).unwrap_or(false);
    let cgroup2 = cgroup2_mount();
    match (programs && helpers, &cgroup2) {
        (true, Some(at)) => report.add(
            "sk_msg/sock_ops",
            Verdict::Ok,
            format!("available with bpf_msg_push_data; cgroup v2 at {at} (--inject-context can run, --sample-in-kernel can carry decisions across hosts)"),
        ),
        (true, None) => report.add_fix(
            "sk_msg/sock_ops",
            Verdict::Warn,
            "the programs are available but no cgroup v2 hierarchy is mounted to attach sock_ops to: --inject-context cannot run, --sample-in-kernel decides on each host alone",
            "mount one: sudo mount -t cgroup2 none /sys/fs/cgroup/unified",
        ),
        (false, _) => report.add(
            "sk_msg/sock_ops",
            Verdict::Warn,
            "not available (or without bpf_msg_push_data): --inject-context cannot run here, --sample-in-kernel decides on each host alone",
        ),
    }
    match is_map_supported(MapType::RingBuf) {
        Ok(true) => {}
        Ok(false) => report.add(
            "ring buffer map",
            Verdict::Fail,
            "BPF ring buffers are not supported (Linux 5.8+)",
        ),
        Err(e) => report.add(
            "ring buffer map",
            Verdict::Warn,
            format!("could not probe: {e}"),
        ),
    }
}

/// Where a cgroup v2 hierarchy is mounted, from this process's mount table.
fn cgroup2_mount() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| at.to_owned())
    })
}

/// Sends an empty export (a valid, empty `ExportTraceServiceRequest`) with the agent's URL,
/// headers, token and CA: reachable, credentials accepted.
async fn collector_check(report: &mut Report, args: &AgentArgs) {
    if args.stdout {
        report.add(
            "collector",
            Verdict::Skipped,
            "--stdout: the agent would not export",
        );
        return;
    }
    let config = match args.export_config() {
        Ok(c) => c,
        Err(e) => {
            report.add("collector", Verdict::Fail, format!("{e:#}"));
            return;
        }
    };
    let client = match export::http_client(&config) {
        Ok(c) => c,
        Err(e) => {
            report.add("collector", Verdict::Fail, format!("{e:#}"));
            return;
        }
    };
    let url = &config.url;
    match empty_export(&client, &config).await {
        Ok(r) if r.status().is_success() => report.add(
            "collector",
            Verdict::Ok,
            format!(
                "{url} accepted an empty export{}",
                if args.token.is_some() || args.token_file.is_some() { " with the token" } else { "" }
            ),
        ),
        Ok(r) if matches!(r.status().as_u16(), 401 | 403) => report.add_fix(
            "collector",
            Verdict::Fail,
            format!("{url} refused the credentials (HTTP {})", r.status().as_u16()),
            if args.token.is_some() || args.token_file.is_some() {
                "the token is not the collector's: check --token-file / TRACER_TOKEN (or the config file's token)"
            } else {
                "the collector requires a token: pass it with --token-file, TRACER_TOKEN or the config file's token"
            },
        ),
        Ok(r) => report.add_fix(
            "collector",
            Verdict::Fail,
            format!("{url} answered HTTP {}", r.status().as_u16()),
            "is this an OTLP/HTTP traces endpoint? --endpoint takes the base URL (…:4318), --traces-endpoint the full one",
        ),
        Err(e) => report.add_fix(
            "collector",
            Verdict::Fail,
            format!("cannot reach {url}: {}", root_cause(&e)),
            "start the collector (tracer-collector) or point --endpoint at it",
        ),
    }
}

/// Posts a valid, empty `ExportTraceServiceRequest` to `config`'s URL with its headers.
async fn empty_export(
    client: &reqwest::Client,
    config: &export::ExportConfig,
) -> reqwest::Result<reqwest::Response> {
    let (content_type, body): (&str, &[u8]) = match config.protocol {
        export::Protocol::HttpProtobuf => ("application/x-protobuf", b""),
        export::Protocol::HttpJson => ("application/json", b"{}"),
    };
    let mut request = client
        .post(&config.url)
        .timeout(Duration::from_secs(5))
        .header("content-type", content_type)
        .body(body);
    for (k, v) in &config.headers {
        request = request.header(k, v);
    }
    request.send().await
}

/// The same empty export to each `--also-export` endpoint, with its own headers. One that fails
/// is a warning: the agent runs and exports to the others, and counts what this one drops.
async fn also_export_checks(report: &mut Report, args: &AgentArgs) {
    if args.stdout || args.also_export.is_empty() {
        return;
    }
    let configs = match args
        .export_config()
        .and_then(|primary| args.also_export_configs(&primary))
    {
        Ok(c) => c,
        Err(e) => {
            report.add("also-export", Verdict::Fail, format!("{e:#}"));
            return;
        }
    };
    for config in configs {
        let url = export::endpoint_label(&config.url);
        let outcome = match export::http_client(&config) {
            Ok(client) => match empty_export(&client, &config).await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("{url} answered HTTP {}", r.status().as_u16())),
                Err(e) => Err(format!("cannot reach {url}: {}", root_cause(&e))),
            },
            Err(e) => Err(format!("{url}: {e:#}")),
        };
        match outcome {
            Ok(()) => report.add(
                "also-export",
                Verdict::Ok,
                format!("{url} accepted an empty export"),
            ),
            Err(why) => report.add_fix(
                "also-export",
                Verdict::Warn,
                why,
                "the agent still exports to the collector; this endpoint's losses are counted (tracer_also_export_dropped_total); check its URL and --also-export-headers",
            ),
        }
    }
}

/// The innermost cause of an HTTP client error ("Connection refused (os error 111)"): the
/// layers above it repeat the URL.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Whether the kernel considers the clock synchronised (NTP's `STA_UNSYNC`), and its estimated
/// error: hosts' clocks decide how their spans line up.
fn clock_check(report: &mut Report) {
    // SAFETY: a zeroed timex with modes 0 only reads the kernel's state into it.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state == -1 {
        let err = std::io::Error::last_os_error();
        report.add(
            "clock",
            Verdict::Warn,
            format!("cannot read its state: {err}"),
        );
    } else if state == libc::TIME_ERROR || tx.status & libc::STA_UNSYNC != 0 {
        report.add_fix(
            "clock",
            Verdict::Warn,
            "not synchronised (NTP): this host's spans may be shifted against other hosts'; the collector corrects skew it can measure from calls between hosts",
            "run a time daemon (chrony, systemd-timesyncd)",
        );
    } else {
        report.add(
            "clock",
            Verdict::Ok,
            format!("synchronised, estimated error {} µs", tx.esterror),
        );
    }
}
