//! `cargo xtask kernels`: the agent on kernels other than the host's, each booted in QEMU.
//!
//! Each kernel of the matrix is a Debian cloud kernel package (`apt-get download`, cached in
//! `target/kernels/`), booted with KVM when `/dev/kvm` answers (emulation otherwise) on an
//! initramfs the xtask builds from this machine's files: busybox (static, from apt) as the
//! system and as the HTTP client, nginx as the server, the release `tracer` and `bpftool`, with
//! the libraries they link. `kernels/init` mounts what the agent needs and runs
//! `kernels/scenario.sh`: the agent (`--stdout`) against nginx, 11 requests by
//! `busybox wget` (one a 404), the programs' statistics from `bpftool prog show` with
//! `kernel.bpf_stats_enabled` on, then SIGINT and the agent's counters. The host's kernel runs
//! the same scenario in a network namespace of its own. The table: each kernel's probes loaded
//! (or the agent's refusal), the HTTP spans checked against the requests made, the counters,
//! the verifier's instructions processed per program and the programs' run time per traced
//! syscall.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::run;

/// What a kernel of the matrix must show.
#[derive(Clone, Copy)]
enum Expect {
    /// The probes load and every request gives its spans.
    Traces,
    /// The agent refuses to start, with a message containing this text.
    Refuses(&'static str),
}

struct Kernel {
    /// What `--only` takes.
    label: &'static str,
    /// The meta-package whose dependency is the newest kernel of the line.
    meta: &'static str,
    /// A Debian suite other than this machine's to take it from.
    suite: Option<&'static str>,
    expect: Expect,
}

/// The kernels booted besides the host's: Debian's cloud kernels, by meta-package (the newest
/// build of each line in the archive). 5.10 (Debian 11) is below the agent's floor: it must
/// refuse and say why.
const MATRIX: &[Kernel] = &[
    Kernel {
        label: "5.10",
        meta: "linux-image-cloud-amd64",
        suite: Some("bullseye"),
        expect: Expect::Refuses("older than Linux 5.15"),
    },
    Kernel {
        label: "6.1",
        meta: "linux-image-cloud-amd64",
        suite: None,
        expect: Expect::Traces,
    },
    Kernel {
        label: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
        suite: None,
        expect: Expect::Traces,
    },
];

/// The probe programs, as the kernel names them (at most 15 characters).
const PROGRAM_PREFIXES: [&str; 2] = ["sys_enter_", "sys_exit_"];

pub struct KernelsArgs {
    /// Only these kernels of the matrix, by label (5.10, 6.1, 6.12; default: all).
    pub only: Vec<String>,
    /// Skip the host's own kernel.
    pub no_host: bool,
    /// Where the `tracer` binary is (the release build by default; the tests use theirs).
    pub bin_dir: PathBuf,
}

pub fn kernels(root: &Path, args: &KernelsArgs) -> anyhow::Result<()> {
    ensure_tools()?;
    let bin = &args.bin_dir;
    let cache = root.join("target/kernels");
    std::fs::create_dir_all(&cache)?;
    let initrd = cache.join("initrd.gz");
    build_initramfs(root, bin, &cache.join("rootfs"), &initrd)?;
    let mut rows = Vec::new();
    if !args.no_host {
        eprintln!("kernels: the host's kernel, in a network namespace");
        let output = run_on_host(root, bin)?;
        rows.push(Row::parse("host", &output, false, Expect::Traces));
    }
    let unknown: Vec<&String> = args
        .only
        .iter()
        .filter(|o| !MATRIX.iter().any(|k| k.label == o.as_str()))
        .collect();
    if !unknown.is_empty() {
        let labels: Vec<&str> = MATRIX.iter().map(|k| k.label).collect();
        bail!(
            "no kernel {unknown:?} in the matrix: it has {}",
            labels.join(", ")
        );
    }
    for kernel in MATRIX
        .iter()
        .filter(|k| args.only.is_empty() || args.only.iter().any(|o| o == k.label))
    {
        let (package, vmlinuz) = fetch_kernel(kernel, &cache)?;
        eprintln!("kernels: booting {package}");
        let (output, emulated) = boot(&vmlinuz, &initrd)?;
        rows.push(Row::parse(&package, &output, emulated, kernel.expect));
    }
    print_table(&rows);
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.source.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the agent did not pass on: {}", failed.join(", "));
    }
    Ok(())
}

/// qemu and a static busybox, from apt, if this machine lacks them.
fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
    ]
    .into_iter()
    .filter(|(cmd, _)| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() {
        eprintln!("kernels: installing {}", missing.join(", "));
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let busybox = Path::new("/bin/busybox");
    let file = output(Command::new("file").arg(busybox)).unwrap_or_default();
    if file.contains("dynamically linked") {
        bail!("/bin/busybox is dynamically linked: install busybox-static (apt-get install busybox-static)");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// apt options that read another suite's package lists, kept under `cache` (fetched once a
/// day); none for this machine's own suites.
fn apt_options(suite: Option<&str>, cache: &Path) -> anyhow::Result<Vec<String>> {
    let Some(suite) = suite else {
        return Ok(Vec::new());
    };
    let dir = cache.join(format!("apt-{suite}"));
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::create_dir_all(dir.join("archives/partial"))?;
    let sources = dir.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb http://deb.debian.org/debian {suite} main\n\
             deb http://deb.debian.org/debian-security {suite}-security main\n"
        ),
    )?;
    let options = vec![
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Etc::SourceList={}", sources.display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::Cache={}", dir.display()),
    ];
    let fresh = std::fs::metadata(dir.join("pkgcache.bin"))
        .and_then(|m| m.modified())
        .is_ok_and(|t| {
            t.elapsed()
                .is_ok_and(|age| age < Duration::from_secs(86_400))
        });
    if !fresh {
        eprintln!("kernels: reading Debian {suite}'s package lists");
        run(Command::new("apt-get")
            .args(&options)
            .args(["update", "-qq"]))?;
    }
    Ok(options)
}

/// The kernel package a meta-package points at, downloaded and unpacked once; its vmlinuz.
fn fetch_kernel(kernel: &Kernel, cache: &Path) -> anyhow::Result<(String, PathBuf)> {
    let options = apt_options(kernel.suite, cache)?;
    let meta = kernel.meta;
    let depends = output(
        Command::new("apt-cache")
            .args(&options)
            .args(["depends", meta]),
    )?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("apt knows no kernel package behind {meta}:\n{depends}"))?
        .to_owned();
    let dir = cache.join(&package);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.exists() {
        return Ok((package, vmlinuz));
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("kernels: downloading {package}");
    run(Command::new("apt-get")
        .args(&options)
        .args(["download", "-q", &package])
        .current_dir(&dir)
        .stderr(Stdio::null()))?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacked = dir.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let image = std::fs::read_dir(unpacked.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no boot/vmlinuz-* in the kernel package")?;
    std::fs::copy(&image, &vmlinuz)?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&deb);
    Ok((package, vmlinuz))
}

/// The shared libraries a binary links, from ldd.
fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` to the same absolute path under `rootfs`.
fn place(rootfs: &Path, from: &Path, to: &str) -> anyhow::Result<()> {
    let target = rootfs.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap())?;
    std::fs::copy(from, &target)
        .with_context(|| format!("copying {} into the initramfs", from.display()))?;
    Ok(())
}

fn build_initramfs(root: &Path, bin: &Path, rootfs: &Path, initrd: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(rootfs);
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "www",
    ] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    let tracer = bin.join("tracer");
    if !tracer.exists() {
        bail!(
            "{} is missing: cargo build --release -p tracer-user",
            tracer.display()
        );
    }
    let bpftool = Path::new("/usr/sbin/bpftool");
    let nginx = Path::new("/usr/sbin/nginx");
    place(rootfs, Path::new("/bin/busybox"), "/bin/busybox")?;
    place(rootfs, &tracer, "/usr/bin/tracer")?;
    // A test build's agent is ~120 MB with its debug information; the VM needs none of it.
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(rootfs.join("usr/bin/tracer")))?;
    place(rootfs, bpftool, "/usr/sbin/bpftool")?;
    place(rootfs, nginx, "/usr/sbin/nginx")?;
    for binary in [tracer.as_path(), bpftool, nginx] {
        for lib in libraries(binary)? {
            place(rootfs, &lib, &lib.to_string_lossy())?;
        }
    }
    let scripts = root.join("xtask/kernels");
    place(rootfs, &scripts.join("init"), "/init")?;
    place(rootfs, &scripts.join("scenario.sh"), "/scenario.sh")?;
    std::fs::write(rootfs.join("www/index.html"), "<p>kernel matrix</p>\n")?;
    std::fs::write(
        rootfs.join("etc/machine-id"),
        "6b65726e656c2d6d61747269782d766d\n",
    )?;
    std::fs::write(rootfs.join("etc/hostname"), "kernel-matrix\n")?;
    // nginx's workers run as nobody.
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let archive = format!(
        "cd '{}' && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        rootfs.display(),
        initrd.display()
    );
    run(Command::new("sh").args(["-c", &archive]))
}

/// The scenario on this machine's kernel, in a new network namespace (its own loopback).
fn run_on_host(root: &Path, bin: &Path) -> anyhow::Result<String> {
    let www = std::env::temp_dir().join(format!("tracer-kernels-www-{}", std::process::id()));
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "<p>kernel matrix</p>\n")?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!(
        "ip link set lo up && exec sh '{}'",
        root.join("xtask/kernels/scenario.sh").display()
    );
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .env("PATH", path)
        .env("WWW", &www)
        .output()
        .context("running the scenario on the host (unshare --net)")?;
    let _ = std::fs::remove_dir_all(&www);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Boots `vmlinuz` on `initrd`; returns its console and whether it was emulated.
fn boot(vmlinuz: &Path, initrd: &Path) -> anyhow::Result<(String, bool)> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        match boot_with(vmlinuz, initrd, true) {
            Ok(console) if console.contains("KM kernel") => return Ok((console, false)),
            // Nested KVM can stall before the kernel prints anything (seen on a cloud VM) or
            // refuse the host CPU's model: emulation is slower but sure.
            Ok(_) => eprintln!("kernels: the KVM guest stalled: emulating instead"),
            Err(e) => eprintln!("kernels: KVM failed ({e:#}): emulating instead"),
        }
    }
    Ok((boot_with(vmlinuz, initrd, false)?, true))
}

fn boot_with(vmlinuz: &Path, initrd: &Path, kvm: bool) -> anyhow::Result<String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    let log = initrd.with_file_name(format!(
        "console-{}.log",
        vmlinuz
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut child = cmd
        .args(["-m", "768", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=3"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    // A KVM guest that has printed nothing after 20 s has stalled (a normal boot here prints
    // within a second or two; emulated, the whole scenario takes ~5 s).
    let limit = Duration::from_secs(if kvm { 20 } else { 300 });
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            if kvm {
                return Ok(String::from_utf8_lossy(&std::fs::read(&log)?).into_owned());
            }
            bail!(
                "the VM did not power off within {} s; its console is in {}",
                limit.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = std::fs::read(&log)?;
    Ok(String::from_utf8_lossy(&console).replace('\r', ""))
}

/// One kernel's results.
struct Row {
    source: String,
    release: String,
    loaded: bool,
    /// The agent's last error line when it refused.
    refusal: Option<String>,
    requests: usize,
    /// GET /index.html 200 and GET /missing.html 404, CLIENT and SERVER each.
    spans_right: usize,
    spans: usize,
    /// `--metrics-only`: the requests the kernel counted (the server's histograms), and the
    /// exchanges the agent parsed itself then (0 when the kernel counted them all).
    red_counted: u64,
    red_parsed: Option<u64>,
    counters: String,
    /// The probe programs' instructions processed by the verifier, as `tracer doctor` reports
    /// them (the largest program's and the sum).
    verified: Option<String>,
    /// Booted without KVM: the run times are the emulator's, not the kernel's.
    emulated: bool,
    expect: Expect,
    /// Run time of the probe programs per run (ns).
    ns_per_run: Option<f64>,
    ended: bool,
}

impl Row {
    fn parse(source: &str, output: &str, emulated: bool, expect: Expect) -> Row {
        let lines: Vec<&str> = output
            .lines()
            .filter_map(|l| l.find("KM ").map(|i| &l[i + 3..]))
            .collect();
        let value = |key: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(key).map(str::trim))
                .unwrap_or("")
                .to_owned()
        };
        let log: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("agent-log "))
            .collect();
        // The `--metrics-only` agent's log, kept only when it refused.
        let red_log = lines.iter().filter_map(|l| l.strip_prefix("red-log "));
        let spans: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("span "))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let right = |name: &str, status: i64| {
            spans
                .iter()
                .filter(|s| {
                    s["name"] == name
                        && s["attributes"]["http.response.status_code"].as_i64() == Some(status)
                        && matches!(s["kind"].as_str(), Some("CLIENT" | "SERVER"))
                })
                .count()
        };
        let requests: usize = value("requests").parse().unwrap_or(0);
        let red: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("red "))
            .collect();
        let red_count = |route: &str, status: u16| -> u64 {
            let series = format!(
                "http_server_request_duration_seconds_count{{service_name=\"nginx\",\
                 http_request_method=\"GET\",http_route=\"{route}\",\
                 http_response_status_code=\"{status}\"}}"
            );
            red.iter()
                .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
                .unwrap_or(0)
        };
        let ns_per_run = run_time_per_run(&value("bpftool"));
        let verified = lines
            .iter()
            .filter_map(|l| l.strip_prefix("doctor "))
            .find_map(|l| l.split_once("instructions verified: ").map(|(_, v)| v))
            .map(|v| {
                v.trim_end_matches(", attached, then detached")
                    .trim_end_matches(')')
                    .to_owned()
            });
        Row {
            source: source.to_owned(),
            release: value("kernel"),
            loaded: lines.contains(&"probes loaded"),
            refusal: log
                .iter()
                .copied()
                .chain(red_log)
                .rfind(|l| l.contains("error"))
                .map(|l| l.to_string()),
            requests,
            spans_right: right("GET /index.html", 200) + right("GET /missing.html", 404),
            spans: spans.len(),
            red_counted: red_count("/index.html", 200) + red_count("/missing.html", 404),
            red_parsed: red.iter().find_map(|l| {
                l.strip_prefix("tracer_exchanges_total")?
                    .trim()
                    .parse()
                    .ok()
            }),
            counters: log
                .iter()
                .find_map(|l| l.split_once("counters: ").map(|(_, c)| c.to_owned()))
                .unwrap_or_default(),
            verified,
            emulated,
            expect,
            ns_per_run,
            ended: lines.contains(&"end") || source == "host",
        }
    }

    fn counter(&self, name: &str) -> Option<u64> {
        self.counters
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    }

    /// Every request gave its CLIENT and SERVER span and the counters agree with nothing lost,
    /// and `--metrics-only` counted every request in the kernel; or, below the agent's floor,
    /// it refused with the message expected.
    fn passed(&self) -> bool {
        if let Expect::Refuses(text) = self.expect {
            return !self.loaded
                && self.ended
                && self.refusal.as_deref().is_some_and(|r| r.contains(text));
        }
        self.loaded
            && self.requests > 0
            && self.spans_right == 2 * self.requests
            && self.spans == 2 * self.requests
            && self.counter("spans") == Some(self.spans as u64)
            && self.counter("ringbuf_drops") == Some(0)
            && self.red_counted == self.requests as u64
            && self.red_parsed == Some(0)
    }
}

/// From `bpftool prog show --json` (with `kernel.bpf_stats_enabled`): the probe programs' run
/// time per run, in ns.
fn run_time_per_run(json: &str) -> Option<f64> {
    let Ok(serde_json::Value::Array(programs)) = serde_json::from_str(json) else {
        return None;
    };
    let (ns, runs) = programs
        .iter()
        .filter(|p| p["type"] == "tracepoint")
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| PROGRAM_PREFIXES.iter().any(|pre| n.starts_with(pre)))
        })
        .fold((0u64, 0u64), |(ns, runs), p| {
            (
                ns + p["run_time_ns"].as_u64().unwrap_or(0),
                runs + p["run_cnt"].as_u64().unwrap_or(0),
            )
        });
    (runs > 0).then(|| ns as f64 / runs as f64)
}

fn print_table(rows: &[Row]) {
    println!("\n== tracer on each kernel (cargo xtask kernels) ==");
    println!(
        "{:<34} {:<21} {:<12} {:<16} {:<20} {:<58} {:>14}",
        "kernel",
        "probes",
        "HTTP spans",
        "--metrics-only",
        "counters",
        "instructions verified (tracer doctor)",
        "ns a run"
    );
    for r in rows {
        let probes = match (r.loaded, r.expect) {
            (true, _) => "load",
            (false, Expect::Refuses(_)) => "refused, as expected",
            (false, Expect::Traces) => "refused",
        };
        let spans = format!("{}/{} right", r.spans_right, 2 * r.requests);
        let counters = match (r.counter("spans"), r.counter("ringbuf_drops")) {
            (Some(s), Some(d)) => format!("spans={s} drops={d}"),
            _ => "-".into(),
        };
        let ns = match (r.ns_per_run, r.emulated) {
            (Some(ns), false) => format!("{ns:.0}"),
            (Some(ns), true) => format!("{ns:.0} emulated"),
            (None, _) => "-".into(),
        };
        let red = format!("{}/{} counted", r.red_counted, r.requests);
        println!(
            "{:<34} {:<21} {:<12} {:<16} {:<20} {:<58} {:>14}{}",
            if r.source == "host" {
                format!("{} (this host)", r.release)
            } else {
                r.release.clone()
            },
            probes,
            spans,
            red,
            counters,
            r.verified.as_deref().unwrap_or("-"),
            ns,
            if r.passed() { "" } else { "  FAILED" }
        );
        if let Some(refusal) = &r.refusal {
            println!("    agent: {refusal}");
        }
        if !r.ended {
            println!("    the VM did not reach the end of the scenario");
        }
    }
}
