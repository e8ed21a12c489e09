//! The query API, the UI and /metrics behind the query token, the Host allow-list (DNS
//! rebinding) and the browser security headers, on the real collector.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

use support::*;

/// A raw HTTP/1.1 GET with the given Host; returns the response head and body.
fn get_with_host(port: u16, path: &str, host: &str, auth: Option<&str>) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_query_port_wants_its_token_and_its_own_host_name() {
    let c = Collector::start("query-security", &["--query-token", "q-secret"]);
    let host = format!("127.0.0.1:{}", c.query_port);
    for path in ["/api/services", "/metrics", "/"] {
        let r = get_with_host(c.query_port, path, &host, None);
        assert_eq!(status(&r), 401, "{path} without the token:\n{r}");
        assert!(
            r.contains("www-authenticate: Basic realm=\"tracer\""),
            "{r}"
        );
        let r = get_with_host(c.query_port, path, &host, Some("Bearer q-secret"));
        assert_eq!(status(&r), 200, "{path} with the token:\n{r}");
    }
    // The token as HTTP Basic's password, as a browser sends it (user "me").
    let r = get_with_host(
        c.query_port,
        "/api/services",
        &host,
        Some("Basic bWU6cS1zZWNyZXQ="),
    );
    assert_eq!(status(&r), 200, "{r}");
    let r = get_with_host(c.query_port, "/api/services", &host, Some("Bearer nope"));
    assert_eq!(status(&r), 401, "{r}");

    // A page elsewhere that rebinds its name to 127.0.0.1 is refused, token or not.
    let r = get_with_host(
        c.query_port,
        "/api/services",
        "attacker.example",
        Some("Bearer q-secret"),
    );
    assert_eq!(status(&r), 421, "{r}");
    assert!(r.contains("--allow-host"), "{r}");
    let r = get_with_host(c.query_port, "/", "localhost", Some("Bearer q-secret"));
    assert_eq!(status(&r), 200, "{r}");

    // Every answer carries the browser security headers.
    for header in [
        "content-security-policy: default-src 'self'; frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "x-frame-options: DENY",
    ] {
        assert!(
            r.to_lowercase().contains(&header.to_lowercase()),
            "{header}:\n{r}"
        );
    }
}

/// Times that would wrap when turned into nanoseconds are refused, not wrapped into a
/// different window.
#[test]
fn query_times_do_not_wrap() {
    let c = Collector::start("query-wrap", &[]);
    let host = format!("127.0.0.1:{}", c.query_port);
    for path in [
        "/api/traces?service=a&start=18446744073709552&end=18446744073709552",
        "/api/dependencies?endTs=18446744073710&lookback=1",
        "/api/dependencies?endTs=1&lookback=18446744073710",
    ] {
        let r = get_with_host(c.query_port, path, &host, None);
        assert_eq!(status(&r), 400, "{path}:\n{r}");
        assert!(r.contains("too"), "{r}");
    }
}

#[test]
fn allow_host_adds_names() {
    let c = Collector::start(
        "query-hosts",
        &[
            "--allow-host",
            "tracer.internal",
            "--allow-host",
            "localhost",
        ],
    );
    let r = get_with_host(c.query_port, "/api/services", "tracer.internal:16686", None);
    assert_eq!(status(&r), 200, "{r}");
    // The list replaces the defaults: 127.0.0.1 was not named.
    let r = get_with_host(c.query_port, "/api/services", "127.0.0.1", None);
    assert_eq!(status(&r), 421, "{r}");
}

#[test]
fn tokens_can_come_from_files() {
    let dir = temp_dir("token-files-secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let (ingest, query) = (dir.join("ingest.token"), dir.join("query.token"));
    std::fs::write(&ingest, "in-secret\n").unwrap();
    std::fs::write(&query, "q-secret\n").unwrap();
    let c = Collector::start(
        "token-files",
        &[
            "--token-file",
            ingest.to_str().unwrap(),
            "--query-token-file",
            query.to_str().unwrap(),
        ],
    );
    let host = format!("127.0.0.1:{}", c.query_port);
    let r = get_with_host(
        c.query_port,
        "/api/services",
        &host,
        Some("Bearer q-secret"),
    );
    assert_eq!(status(&r), 200, "{r}");
    let r = get_with_host(
        c.query_port,
        "/api/services",
        &host,
        Some("Bearer in-secret"),
    );
    assert_eq!(
        status(&r),
        401,
        "the ingest token is not the query token:\n{r}"
    );
    drop(c);

    // An empty token file is a mistake, not "no token".
    let empty = dir.join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tracer-collector"))
        .args(["--data-dir", dir.join("store").to_str().unwrap()])
        .args(["--token-file", empty.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is empty"), "{err}");
}
