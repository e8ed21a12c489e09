//! A process that exits before the agent reads its /proc entry is named as a running one would
//! be, from the command name and executable name the probes send with its first connection.
//! Real probes, real programs started through links (busybox's `wget` applet, a venv-style
//! `python` link to the system interpreter); the agent is stopped (SIGSTOP) while they run, so
//! each has exited, /proc entry and all, before the agent reads its records.
mod support;

use std::{process::Command, time::Duration};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::*;

#[test]
fn programs_gone_before_the_agent_looked_keep_their_running_names() {
    require_root();
    let (nginx_port, receiver, agent, _nginx) = traced_nginx();

    let dir = temp_dir("process-names");
    let wget = dir.join("wget");
    std::os::unix::fs::symlink("/usr/bin/busybox", &wget).unwrap();
    let python = dir.join("python");
    std::os::unix::fs::symlink("/usr/bin/python3", &python).unwrap();
    // What a running `python` link is named by: the interpreter it resolves to (python3.N).
    let interpreter = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let interpreter = interpreter
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let url = format!("http://127.0.0.1:{nginx_port}/ok");

    let agent_pid = agent.proc.0.id() as i32;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGSTOP) }, 0);
    let ran = |cmd: &mut Command| {
        let status = cmd.status().expect("starting a client");
        assert!(status.success(), "{cmd:?}: {status}");
    };
    ran(Command::new(&wget).args(["-q", "-O", "/dev/null", &url]));
    ran(Command::new(&python).args([
        "-c",
        &format!("import urllib.request; urllib.request.urlopen('{url}').read()"),
    ]));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGCONT) }, 0);

    wait_for("two client spans", Duration::from_secs(20), || {
        receiver
            .spans()
            .iter()
            .filter(|s| s.span.kind == SpanKind::Client as i32)
            .count()
            >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    let spans = receiver.spans();
    let log = agent.stop();
    let mut clients: Vec<(String, String, String)> = spans
        .iter()
        .filter(|s| s.span.kind == SpanKind::Client as i32)
        .map(|s| {
            let res = |k: &str| match s.res(k) {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(v)) => v,
                _ => String::new(),
            };
            (
                s.service(),
                res("process.executable.name"),
                res("process.executable.path"),
            )
        })
        .collect();
    clients.sort();
    let gone = |name: &str| (name.to_owned(), name.to_owned(), String::new());
    let mut want = vec![gone(&interpreter), gone("wget")];
    want.sort();
    assert_eq!(
        clients, want,
        "named as while running (an empty path: read after they exited); agent log:\n{log}"
    );
}
