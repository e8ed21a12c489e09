//! The agent's metrics endpoint against a local user who holds connections open: thousands of
//! idle or half-sent connections do not exhaust the agent's descriptors or lock a scrape out,
//! a slow request is cut off, an oversized one refused, and a request for a foreign host name
//! (DNS rebinding) refused.
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    process::Command,
    time::{Duration, Instant},
};

use support::*;

/// The agent's `MAX_CONNECTIONS` and `CONNECTION_TIMEOUT`.
const MAX_CONNECTIONS: usize = 32;
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// The soft open-file limit the agent is started with, below the number of connections opened.
const AGENT_SOFT_LIMIT: u64 = 256;
const FLOOD: usize = 1500;

fn raise_own_file_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = l.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        assert!(
            l.rlim_cur as usize > FLOOD + 100,
            "this test opens {FLOOD} connections; the hard open-file limit is {}",
            l.rlim_cur
        );
    }
}

/// The soft and hard "Max open files" of a process.
fn file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut n = line
        .split_whitespace()
        .skip(3)
        .map(|v| v.parse::<u64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `GET /metrics` with curl and a generous deadline: the status and the body.
fn scrape(port: u16) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn idle_connections_do_not_starve_the_metrics_endpoint() {
    require_root();
    raise_own_file_limit();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracer"));
    cmd.args(["agent", "--stdout", "--port", &free_port().to_string()])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info");
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut l: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
            l.rlim_cur = AGENT_SOFT_LIMIT;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            Ok(())
        });
    }
    let agent = tracer_test_support::topology::Daemon::start(cmd, "agent", "tracer: ready", true);
    let pid = agent.proc.0.id();
    let (soft, hard) = file_limits(pid);
    assert_eq!(
        soft, hard,
        "the agent raises its open-file soft limit (started at {AGENT_SOFT_LIMIT}) to the hard limit"
    );
    let (ok, first) = scrape(port);
    assert!(ok, "a scrape before the flood: {first}");
    let fds_before = open_fds(pid);

    // A web page's request through a name of its own pointed at 127.0.0.1 (DNS rebinding).
    let mut rebound = TcpStream::connect(("127.0.0.1", port)).unwrap();
    rebound
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: rebind.example:80\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = rebound.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 421 "), "{answer}");
    assert!(!answer.contains("tracer_spans_total"), "{answer}");

    // The flood: idle connections, and some that send half a request head and stop.
    let mut held = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        if i % 3 == 0 {
            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        }
        held.push(c);
    }
    let started = Instant::now();
    let (ok, text) = scrape(port);
    assert!(
        ok,
        "a scrape with {FLOOD} connections held open did not answer: {text}"
    );
    eprintln!(
        "scrape answered in {:?} with {FLOOD} connections held",
        started.elapsed()
    );
    assert!(
        counter(&text, "tracer_metrics_connections_evicted_total") > 0,
        "{text}"
    );
    let fds_during = open_fds(pid);
    assert!(
        fds_during <= fds_before + MAX_CONNECTIONS + 4,
        "the agent holds {fds_during} descriptors with the flood on ({fds_before} before): \
         the endpoint keeps at most {MAX_CONNECTIONS} connections"
    );

    // Held connections are closed by the agent, answered or not, within the timeout.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    slow.set_read_timeout(Some(CONNECTION_TIMEOUT * 4)).unwrap();
    let waited = Instant::now();
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest);
    assert!(
        closed.is_ok() && waited.elapsed() < CONNECTION_TIMEOUT * 3,
        "a half-sent request was not cut off: {closed:?} after {:?}",
        waited.elapsed()
    );
    drop(held);

    // A request head larger than the endpoint reads is refused, not buffered.
    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(40)).as_bytes());
    }
    let _ = big.write_all(&head);
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("tracer_spans_total"),
        "a 100 KB request head was served: {answer}"
    );

    let (ok, text) = scrape(port);
    assert!(ok, "a scrape after the flood: {text}");
    assert!(
        counter(&text, "tracer_metrics_connections_timed_out_total") > 0,
        "{text}"
    );
    let log = agent.stop();
    assert!(log.contains("stopping"), "{log}");
}
