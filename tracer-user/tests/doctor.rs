//! `tracer doctor` on this host: every check passes as root against a real collector that
//! requires a token; a wrong token, a collector that is down and a user without privileges each
//! fail their line with what to do, and the exit status says so.
mod support;

use std::process::Command;

use support::collector_bin;
use tracer_test_support::{free_port, require_root, temp_dir, topology::Daemon};

const TOKEN: &str = "doctor-test-token";

/// A collector requiring `TOKEN`, its store in a directory named after `test`; returns it and
/// its OTLP/HTTP base URL.
fn collector(test: &str) -> (Daemon, String) {
    let http = free_port();
    let mut cmd = Command::new(collector_bin());
    cmd.arg("--data-dir")
        .arg(temp_dir(&format!("doctor-{test}")))
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--query-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--token", TOKEN]);
    let daemon = Daemon::start(cmd, "collector", "tracer-collector: ready", true);
    (daemon, format!("http://127.0.0.1:{http}"))
}

/// Runs `tracer doctor` with `args`; returns (success, stdout + stderr).
fn doctor(prefix: &[&str], args: &[&str]) -> (bool, String) {
    let tracer = env!("CARGO_BIN_EXE_tracer");
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(tracer);
            c
        }
        None => Command::new(tracer),
    };
    let out = cmd
        .arg("doctor")
        .args(args)
        .env_remove("TRACER_TOKEN")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("run tracer doctor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The verdict and the text of one check's first line.
fn line<'a>(report: &'a str, check: &str) -> (&'a str, &'a str) {
    report
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            let verdict = words.next()?;
            let rest = l.trim_start()[verdict.len()..].trim_start();
            let text = rest.strip_prefix(check)?.trim_start();
            matches!(verdict, "ok" | "warn" | "FAIL" | "skip").then_some((verdict, text))
        })
        .unwrap_or_else(|| panic!("no {check:?} line in:\n{report}"))
}

#[test]
fn doctor_passes_here_and_loads_the_probes_for_real() {
    require_root();
    let (_collector, url) = collector("passes");
    // The same collector by another name, with its token as this endpoint's own header, and
    // an endpoint that is down: a warning, not a failure (the agent runs without it).
    let also = url.replace("127.0.0.1", "localhost");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let also_headers = format!("authorization=Bearer%20{TOKEN}");
    let (ok, report) = doctor(
        &[],
        &[
            "--endpoint",
            &url,
            "--token",
            TOKEN,
            "--also-export",
            &also,
            "--also-export",
            &dead,
            "--also-export-headers",
            &also_headers,
        ],
    );
    let also_lines: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("also-export"))
        .collect();
    assert!(
        also_lines
            .iter()
            .any(|l| l.trim_start().starts_with("ok") && l.contains("accepted an empty export")),
        "{report}"
    );
    assert!(
        also_lines
            .iter()
            .any(|l| l.trim_start().starts_with("warn") && l.contains("cannot reach")),
        "{report}"
    );
    for check in [
        "architecture",
        "kernel",
        "privileges",
        "BTF",
        "tracefs",
        "tracepoints",
        "probes",
        "ring buffer",
        "uprobes",
        "sk_msg/sock_ops",
        "collector",
    ] {
        assert_eq!(line(&report, check).0, "ok", "{check}:\n{report}");
    }
    // The syscall programs and `--sample-in-kernel`'s sock_ops carrier (root may attach it).
    assert!(
        line(&report, "probes").1.starts_with(&format!(
            "{} programs accepted",
            tracer_user::probes::TRACEPOINTS.len() + 1
        )),
        "{report}"
    );
    assert!(
        line(&report, "collector").1.contains("with the token"),
        "{report}"
    );
    // The clock may or may not be synchronised on a test machine; it is never a failure.
    assert_ne!(line(&report, "clock").0, "FAIL", "{report}");
    assert!(ok, "doctor must exit 0 when nothing failed:\n{report}");
}

#[test]
fn doctor_fails_on_a_wrong_token_and_a_collector_that_is_down() {
    require_root();
    let (_collector, url) = collector("fails");
    let (ok, report) = doctor(&[], &["--endpoint", &url, "--token", "not-the-token"]);
    assert!(!ok, "a refused token is a failure:\n{report}");
    let (verdict, text) = line(&report, "collector");
    assert_eq!(verdict, "FAIL", "{report}");
    assert!(
        text.contains("refused the credentials (HTTP 401)"),
        "{report}"
    );
    assert!(
        report.contains("TRACER_TOKEN"),
        "the fix names the setting:\n{report}"
    );

    let (ok, report) = doctor(&[], &["--endpoint", &url]);
    assert!(!ok, "{report}");
    assert!(
        report.contains("the collector requires a token"),
        "{report}"
    );

    let down = format!("http://127.0.0.1:{}", free_port());
    let (ok, report) = doctor(&[], &["--endpoint", &down]);
    assert!(!ok, "{report}");
    let (verdict, text) = line(&report, "collector");
    assert_eq!(verdict, "FAIL", "{report}");
    assert!(
        text.contains("cannot reach") && text.contains("Connection refused"),
        "{report}"
    );
    assert!(report.contains("tracer: error: 1 check failed"), "{report}");
}

#[test]
fn doctor_without_privileges_says_how_to_grant_them() {
    require_root();
    // setpriv (util-linux) drops to nobody; changing uid clears the effective capabilities.
    let (ok, report) = doctor(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        &["--stdout"],
    );
    assert!(!ok, "{report}");
    let (verdict, _) = line(&report, "privileges");
    assert_eq!(verdict, "FAIL", "{report}");
    assert!(report.contains("setcap cap_bpf,cap_perfmon"), "{report}");
    // What needs the privileges is skipped, not reported as broken.
    assert_eq!(line(&report, "probes").0, "skip", "{report}");
    assert_eq!(
        line(&report, "collector").0,
        "skip",
        "--stdout exports nothing:\n{report}"
    );
}
