//! The Debian packages, installed on this machine: `packaging/build-debs.sh` builds them from
//! this build's binaries, apt installs them, the services run as their units say (their users,
//! capabilities, no-new-privileges), the agent traces a request that the collector then serves,
//! and a purge leaves nothing behind. Where systemd is not PID 1 (containers, this project's
//! test VMs), the units cannot be started by systemd; the test runs each unit's `ExecStart` with
//! its `User`, `AmbientCapabilities`, `CapabilityBoundingSet` and `NoNewPrivileges` through
//! `setpriv`, read from the installed unit file, so the unit's own settings are what is tested.
mod support;

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use support::collector_bin;
use tracer_test_support::{free_port, require_root, temp_dir, topology::Daemon, wait_for, Proc};

const PACKAGES: [&str; 2] = ["tracer-agent", "tracer-collector"];

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn purge() {
    let _ = Command::new("apt-get")
        .args(["purge", "-y", "-q"])
        .args(PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Purges the packages however the test ends.
struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        purge();
    }
}

/// One `Key=value` of a unit file (the last one, as systemd reads it).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit:\n{unit}"))
        .trim()
        .to_owned()
}

/// The unit's `ExecStart` (plus `extra` arguments) as its `User`, with its capabilities and
/// no-new-privileges, through setpriv.
fn as_the_unit_says(unit_file: &Path, extra: &[String]) -> Command {
    let unit = std::fs::read_to_string(unit_file).unwrap();
    let user = unit_value(&unit, "User");
    // Capability lists merge across the unit and its drop-ins, as systemd reads them; an empty
    // assignment empties the list.
    let setpriv_caps = |key: &str| -> String {
        let mut caps: Vec<String> = Vec::new();
        for value in unit
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        {
            if value.trim().is_empty() {
                caps.clear();
            }
            caps.extend(
                value
                    .split_whitespace()
                    .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
            );
        }
        caps.join(",")
    };
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .arg("--init-groups");
    if unit.contains("AmbientCapabilities=") {
        let ambient = setpriv_caps("AmbientCapabilities");
        cmd.arg(format!("--inh-caps={ambient}"))
            .arg(format!("--ambient-caps={ambient}"));
    }
    let bounding = setpriv_caps("CapabilityBoundingSet");
    cmd.arg(if bounding.is_empty() {
        "--bounding-set=-all".to_owned()
    } else {
        format!("--bounding-set=-all,{bounding}")
    });
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    cmd.arg("--no-new-privs").arg("--");
    let exec = unit_value(&unit, "ExecStart");
    cmd.args(exec.split_whitespace()).args(extra);
    cmd
}

fn get(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn packages_install_run_trace_and_purge_cleanly() {
    require_root();
    // The packages are built from the agent's directory, which must hold the collector too.
    let bin_dir = collector_bin().parent().unwrap().to_owned();
    let out = temp_dir("packages");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-debs.sh");
    let built = run(Command::new("bash").arg(&script).arg(&bin_dir).arg(&out));
    let debs: Vec<&str> = built.lines().filter(|l| l.ends_with(".deb")).collect();
    assert_eq!(debs.len(), 2, "{built}");

    // A run that died half-way may have left them installed.
    purge();
    let _installed = Installed;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&debs)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    for package in PACKAGES {
        assert!(installed(package), "{package} is not installed");
        run(Command::new("getent").args(["passwd", package]));
    }
    for (config, group) in [
        ("/etc/tracer/agent.toml", "tracer-agent"),
        ("/etc/tracer/collector.toml", "tracer-collector"),
    ] {
        let meta = std::fs::metadata(config).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640, "{config} may hold a token");
        let gid = run(Command::new("getent").args(["group", group]));
        let gid: u32 = gid.split(':').nth(2).unwrap().parse().unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, gid), "{config}'s owner");
    }

    let systemd = Path::new("/run/systemd/system").exists();
    let (http, grpc, query) = (free_port(), free_port(), free_port());
    let traced_port = free_port();
    let (_collector, _agent) = if systemd {
        // The units run with the packaged config files: this host's default ports.
        for package in PACKAGES {
            wait_for(
                &format!("{package}.service active"),
                Duration::from_secs(20),
                || {
                    Command::new("systemctl")
                        .args(["is-active", "--quiet", package])
                        .status()
                        .is_ok_and(|s| s.success())
                },
            );
        }
        (None, None)
    } else {
        // What StateDirectory= would make.
        std::fs::create_dir_all("/var/lib/tracer-collector").unwrap();
        run(Command::new("chown").args([
            "tracer-collector:tracer-collector",
            "/var/lib/tracer-collector",
        ]));
        // Flags after the config file's settings: these ports, not this host's defaults.
        let collector = Daemon::start(
            as_the_unit_says(
                Path::new("/lib/systemd/system/tracer-collector.service"),
                &[
                    format!("--http-addr=127.0.0.1:{http}"),
                    format!("--grpc-addr=127.0.0.1:{grpc}"),
                    format!("--query-addr=127.0.0.1:{query}"),
                ],
            ),
            "collector",
            "tracer-collector: ready",
            true,
        );
        let agent = Daemon::start(
            as_the_unit_says(
                Path::new("/lib/systemd/system/tracer-agent.service"),
                &[
                    format!("--endpoint=http://127.0.0.1:{http}"),
                    format!("--port={traced_port}"),
                    "--metrics-addr=off".into(),
                    "--batch-timeout-ms=100".into(),
                ],
            ),
            "agent",
            "tracer: ready",
            true,
        );
        (Some(collector), Some(agent))
    };
    let query = if systemd { 16686 } else { query };

    // A request the agent, unprivileged but for its capabilities, must see.
    let dir = temp_dir("packages-www");
    std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();
    let _server = Proc(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &traced_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server"),
    );
    wait_for("the web server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", traced_port)).is_ok()
    });
    assert_eq!(
        get(&format!("http://127.0.0.1:{traced_port}/hello.txt")),
        "hello\n"
    );
    let search = format!(
        "http://127.0.0.1:{query}/api/traces?service=curl&operation=GET%20%2Fhello.txt&lookback=1h&limit=5"
    );
    wait_for(
        "curl's span in the packaged collector",
        Duration::from_secs(20),
        || get(&search).contains("\"GET /hello.txt\""),
    );
    inject_context_needs_net_admin_as_documented(http, traced_port);
    drop((_collector, _agent));

    purge();
    for package in PACKAGES {
        assert!(!installed(package), "{package} is still installed");
        assert!(
            Command::new("getent")
                .args(["passwd", package])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| !s.success()),
            "the user {package} is still there"
        );
    }
    for path in [
        "/usr/bin/tracer",
        "/usr/bin/tracer-collector",
        "/etc/tracer",
        "/var/lib/tracer-collector",
        "/lib/systemd/system/tracer-agent.service",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after the purge");
    }
}

/// `--inject-context` needs CAP_NET_ADMIN, which the packaged unit leaves out: the agent stops
/// and says how to add it; added as agent.toml says (a drop-in), the agent starts.
fn inject_context_needs_net_admin_as_documented(http: u16, port: u16) {
    let unit = Path::new("/lib/systemd/system/tracer-agent.service");
    let args = [
        format!("--endpoint=http://127.0.0.1:{http}"),
        format!("--port={port}"),
        "--metrics-addr=off".into(),
        "--inject-context".into(),
    ];
    let mut child = as_the_unit_says(unit, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the packaged agent");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the agent ran with --inject-context without CAP_NET_ADMIN");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    for said in ["CAP_NET_ADMIN", "systemctl edit tracer-agent"] {
        assert!(stderr.contains(said), "no {said:?} in:\n{stderr}");
    }

    let agent_toml = std::fs::read_to_string("/etc/tracer/agent.toml").unwrap();
    let drop_in: String = agent_toml
        .lines()
        .skip_while(|l| !l.contains("systemctl edit tracer-agent"))
        .skip(1)
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", l.trim_start_matches("#   ")))
        .collect();
    assert!(drop_in.starts_with("[Service]\n"), "{drop_in}");
    let edited = temp_dir("packages-unit").join("tracer-agent.service");
    std::fs::write(
        &edited,
        std::fs::read_to_string(unit).unwrap() + "\n" + &drop_in,
    )
    .unwrap();
    let agent = Daemon::start(
        as_the_unit_says(&edited, &args),
        "agent with CAP_NET_ADMIN",
        "tracer: ready",
        true,
    );
    drop(agent);
}

/// The long flags `--help` lists, without `--help`, `--version` and `--config`.
fn flags(program: &Path, args: &[&str]) -> Vec<String> {
    let help = run(Command::new(program).args(args).arg("--help"));
    let mut flags: Vec<String> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .filter(|f| !f.is_empty() && f.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .filter(|f| !["help", "version", "config"].contains(&f.as_str()))
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// Each packaged config file names every setting the program has (commented out at its
/// default), so an operator reads the options where they set them.
#[test]
fn packaged_config_files_document_every_flag() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tracer = PathBuf::from(env!("CARGO_BIN_EXE_tracer"));
    let collector = collector_bin();
    // The agent's file keys are its settings' names: the repeatable flags' are plural.
    let agent_key = |flag: &str| match flag {
        "pid" => "pids".to_owned(),
        "exe" => "executables".to_owned(),
        "cgroup" => "cgroups".to_owned(),
        "port" => "ports".to_owned(),
        "service-rule" => "service_rules".to_owned(),
        f => f.replace('-', "_"),
    };
    for (file, program, args, key) in [
        (
            "agent.toml",
            tracer.as_path(),
            &["agent"][..],
            &agent_key as &dyn Fn(&str) -> String,
        ),
        (
            "collector.toml",
            collector.as_path(),
            &[][..],
            &|f: &str| f.replace('-', "_"),
        ),
    ] {
        let text = std::fs::read_to_string(root.join("packaging").join(file)).unwrap();
        let documented = |k: &str| {
            text.lines().any(|l| {
                l.trim_start_matches('#')
                    .trim_start()
                    .strip_prefix(k)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let flags = flags(program, args);
        assert!(
            flags.len() >= 10,
            "{file}: too few flags read from --help: {flags:?}"
        );
        let missing: Vec<String> = flags
            .iter()
            .map(|f| key(f))
            .filter(|k| !documented(k))
            .collect();
        assert!(
            missing.is_empty(),
            "packaging/{file} does not document {missing:?}"
        );
    }
}
