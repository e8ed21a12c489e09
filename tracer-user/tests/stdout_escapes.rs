//! `tracer agent --stdout` prints what the network sent (paths, user agents) as JSON lines: a
//! client of a traced server must not be able to send escape sequences to the terminal of whoever
//! watches them. C0 controls are refused by the HTTP parser or escaped by JSON; C1 controls
//! (U+0080..U+009F, valid UTF-8 and allowed in a request as raw bytes) are escaped too.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use support::*;

#[test]
fn stdout_spans_carry_no_raw_control_characters() {
    require_root();
    let port = free_port();
    let _nginx = start_nginx(port, free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["agent", "--stdout", "--metrics-addr", "off"])
        .args(["--port", &port.to_string(), "--exe", "nginx"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let (ready_tx, ready) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[agent] {line}");
            if line.contains("tracer: ready") {
                let _ = ready_tx.send(());
            }
        }
    });
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        // Raw bytes: a line is checked before any decoding could hide what it holds.
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let agent = Proc(child);
    ready
        .recv_timeout(Duration::from_secs(60))
        .expect("the agent did not become ready");

    // CSI (U+009B) "2J" clears the screen; OSC (U+009D) "0;..." sets the title, ended by ST
    // (U+009C); the same in the User-Agent.
    let path = "/ok\u{9b}2J\u{9d}0;pwned\u{9c}";
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: ua\u{9b}31m\u{9d}52;c;cHduZWQ=\u{9c}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut conn, &mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 "),
        "nginx answered: {answer:?}"
    );

    let line = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(15))
            .expect("no span printed for the request within 15 s");
        if line.windows(6).any(|w| w == b"pwned\\") || line.windows(5).any(|w| w == b"pwned") {
            break line;
        }
    };
    drop(agent);
    let text = String::from_utf8(line).expect("UTF-8 JSON");
    assert!(
        !text.chars().any(char::is_control),
        "a raw control character reached stdout: {text:?}"
    );
    assert!(text.contains("\\u009b2J"), "{text}");
    let span: serde_json::Value = serde_json::from_str(&text).expect("still one JSON object");
    assert_eq!(span["attributes"]["url.path"], path, "{text}");
    assert!(
        span["attributes"]["user_agent.original"]
            .as_str()
            .is_some_and(|ua| ua.contains('\u{9b}')),
        "the value is kept, only its printing escaped: {text}"
    );
}
