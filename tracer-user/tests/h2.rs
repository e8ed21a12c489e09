//! HTTP/2 and gRPC, traced for real: nginx from apt with `http2` on a cleartext port (h2c with
//! prior knowledge) and on a TLS port (h2 chosen by ALPN, read through the TLS uprobes), called
//! by curl; hypercorn from PyPI, which also takes h2c by `Upgrade` from HTTP/1.1 (what
//! `curl --http2` asks of an `http://` URL); and a gRPC server and client from PyPI (grpcio, no
//! generated code) on one connection: a unary call, a unary call the server answers NOT_FOUND,
//! a server-streaming call, and five unary calls at once (interleaved streams). Every request
//! must be one CLIENT and one SERVER span with method and path (or gRPC service and method),
//! status, HTTP version 2, and the same `tracer.tcp.edge` on both ends.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::*;
use tracer_test_support::topology::{peers_dir, python};

fn start_h2_nginx(h2c: u16, h2: u16) -> Proc {
    let dir = temp_dir(&format!("nginx-h2-{h2c}"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt install openssl)");
    assert!(status.success(), "making the test certificate failed");
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{h2c} http2;
        listen 127.0.0.1:{h2} ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location = /h2/ok {{ return 200 "ok over h2\n"; }}
        location = /h2/missing {{ return 404; }}
    }}
}}
"#,
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(&dir)
        .spawn()
        .expect("nginx not installed: run scripts/setup.sh");
    let p = Proc(child);
    for port in [h2c, h2] {
        wait_for(
            "nginx with HTTP/2 to listen",
            Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
    }
    p
}

/// (kind, name, status) of the spans on `port`, sorted; and whether every client edge has its
/// server twin.
fn summary(spans: &[Received], port: u16) -> (Vec<(String, String, i64)>, bool) {
    let on_port: Vec<&Received> = spans
        .iter()
        .filter(|s| s.int_attr("server.port") == Some(i64::from(port)))
        .collect();
    let mut out: Vec<(String, String, i64)> = on_port
        .iter()
        .map(|s| {
            let kind = if s.span.kind == 2 { "SERVER" } else { "CLIENT" };
            let status = s
                .int_attr("http.response.status_code")
                .or_else(|| s.int_attr("rpc.grpc.status_code"))
                .unwrap_or(-1);
            (kind.to_owned(), s.span.name.clone(), status)
        })
        .collect();
    out.sort();
    let edges = |k: i32| {
        let mut e: Vec<String> = on_port
            .iter()
            .filter(|s| s.span.kind == k)
            .filter_map(|s| s.str_attr("tracer.tcp.edge"))
            .collect();
        e.sort();
        e
    };
    let paired = !edges(3).is_empty() && edges(3) == edges(2);
    (out, paired)
}

fn pairs(list: &[(&str, i64)]) -> Vec<(String, String, i64)> {
    let mut v: Vec<(String, String, i64)> = list
        .iter()
        .flat_map(|&(name, status)| {
            ["CLIENT", "SERVER"].map(|k| (k.to_owned(), name.to_owned(), status))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn http2_requests_and_grpc_calls_become_spans_on_both_sides() {
    require_root();
    let (h2c, h2, grpc_port) = (free_port(), free_port(), free_port());
    let _nginx = start_h2_nginx(h2c, h2);
    let venv = python();
    let _grpc = Proc(
        Command::new(&venv)
            .arg(peers_dir().join("grpc_peer.py"))
            .args(["server", &grpc_port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("the venv's python (scripts/setup.sh installs grpcio)"),
    );
    wait_for("the gRPC server", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_ok()
    });
    let upgrade = free_port();
    let _hypercorn = Proc(
        Command::new(&venv)
            .args(["-m", "hypercorn", "asgi_h2c:app", "--bind"])
            .arg(format!("127.0.0.1:{upgrade}"))
            .current_dir(peers_dir())
            .stderr(Stdio::null())
            .spawn()
            .expect("the venv's python (scripts/setup.sh installs hypercorn)"),
    );
    wait_for("hypercorn", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", upgrade)).is_ok()
    });
    let receiver = OtlpReceiver::start(free_port());
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &h2c.to_string(),
        "--port",
        &h2.to_string(),
        "--port",
        &grpc_port.to_string(),
        "--port",
        &upgrade.to_string(),
        "--metrics-addr",
        "off",
        "--batch-timeout-ms",
        "100",
    ]);
    for path in ["/h2/ok", "/h2/missing"] {
        for args in [
            vec![
                "--http2-prior-knowledge".to_owned(),
                format!("http://127.0.0.1:{h2c}{path}"),
            ],
            vec![
                "-k".to_owned(),
                "--http2".to_owned(),
                format!("https://127.0.0.1:{h2}{path}"),
            ],
        ] {
            let out = Command::new("curl")
                .arg("-s")
                .args(&args)
                .output()
                .expect("curl");
            assert!(out.status.success(), "curl {args:?}: {out:?}");
        }
    }
    for path in ["/h2c/ok", "/h2c/missing"] {
        // Upgrade from HTTP/1.1, then prior knowledge.
        for flag in ["--http2", "--http2-prior-knowledge"] {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_version}", flag])
                .arg(format!("http://127.0.0.1:{upgrade}{path}"))
                .output()
                .expect("curl");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "2",
                "curl {flag} {path}"
            );
        }
    }
    let out = Command::new(&venv)
        .arg(peers_dir().join("grpc_peer.py"))
        .args(["client", &grpc_port.to_string()])
        .output()
        .expect("the gRPC client");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello world\nNOT_FOUND\n0,1,2\nhello n0,hello n1,hello n2,hello n3,hello n4\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want_http = pairs(&[("GET /h2/ok", 200), ("GET /h2/missing", 404)]);
    let want_grpc = pairs(&[
        ("demo.Greeter/SayHello", 0),
        ("demo.Greeter/SayHello", 5),
        ("demo.Greeter/Count", 0),
        // The five concurrent calls.
        ("demo.Greeter/SayHello", 0),
        ("demo.Greeter/SayHello", 0),
        ("demo.Greeter/SayHello", 0),
        ("demo.Greeter/SayHello", 0),
        ("demo.Greeter/SayHello", 0),
    ]);
    let want_upgrade = pairs(&[
        ("GET /h2c/ok", 200),
        ("GET /h2c/ok", 200),
        ("GET /h2c/missing", 404),
        ("GET /h2c/missing", 404),
    ]);
    let mut spans = Vec::new();
    wait_for("the HTTP/2 and gRPC spans", Duration::from_secs(20), || {
        spans = receiver.spans();
        spans.len() >= 2 * want_http.len() + want_grpc.len() + want_upgrade.len()
    });
    let log = agent.stop();
    for (port, want) in [
        (h2c, &want_http),
        (h2, &want_http),
        (grpc_port, &want_grpc),
        (upgrade, &want_upgrade),
    ] {
        let (got, paired) = summary(&spans, port);
        assert_eq!(&got, want, "spans on port {port}");
        assert!(paired, "client and server edges pair up on port {port}");
    }
    for s in &spans {
        let port = s.int_attr("server.port");
        if port == Some(i64::from(grpc_port)) {
            assert_eq!(s.str_attr("rpc.system").as_deref(), Some("grpc"));
            assert_eq!(s.str_attr("rpc.service").as_deref(), Some("demo.Greeter"));
            // The client process exits at once: named by its main thread, not by grpcio's
            // worker thread that made the calls (`event_engine`).
            assert!(s.service().starts_with("python"), "service {}", s.service());
        } else {
            assert_eq!(s.str_attr("http.request.method").as_deref(), Some("GET"));
            let scheme = if port == Some(i64::from(h2)) {
                "https"
            } else {
                "http"
            };
            assert_eq!(s.str_attr("url.scheme").as_deref(), Some(scheme));
        }
        assert_eq!(s.str_attr("network.protocol.version").as_deref(), Some("2"));
    }
    // NOT_FOUND is the client's error, not the server's (the RPC conventions).
    let not_found: Vec<(i32, i32)> = spans
        .iter()
        .filter(|s| s.int_attr("rpc.grpc.status_code") == Some(5))
        .map(|s| (s.span.kind, s.span.status.as_ref().map_or(0, |st| st.code)))
        .collect();
    assert!(
        not_found.contains(&(3, 2)) && not_found.contains(&(2, 0)),
        "{not_found:?}"
    );
    assert!(!log.contains("ERROR"), "agent log:\n{log}");
}
