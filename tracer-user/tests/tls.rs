//! TLS, traced for real: nginx from apt serving HTTPS with a certificate the test makes
//! (`openssl req`), called by curl, by Python's `ssl` + `urllib` and by `requests` (PyPI, over
//! urllib3, two requests on one kept-alive connection), all using the system OpenSSL
//! (libssl.so.3) that the agent's uprobes are on. Each request must come out as a
//! CLIENT and a SERVER span with the method, path, status and addresses, `url.scheme=https`,
//! both ends with the same `tracer.tcp.edge` (the plaintext offset on the connection), and
//! nothing parsed from the ciphertext.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::*;
use tracer_test_support::topology::python;

fn start_tls_nginx(port: u16) -> Proc {
    let dir = temp_dir(&format!("nginx-tls-{port}"));
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
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location = /secure/ok {{ return 200 "ok over tls\n"; }}
        location = /secure/missing {{ return 404; }}
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
    wait_for("nginx with TLS to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

const PY: &str = r#"
import ssl, sys, urllib.request, urllib.error
ctx = ssl._create_unverified_context()
url = f"https://127.0.0.1:{sys.argv[1]}"
print(urllib.request.urlopen(url + "/secure/ok?from=python", context=ctx).read().decode(), end="")
try:
    urllib.request.urlopen(url + "/secure/missing", context=ctx)
except urllib.error.HTTPError as e:
    print(e.code)
import requests, urllib3
urllib3.disable_warnings()
with requests.Session() as s:
    print(s.get(url + "/secure/ok?from=requests", verify=False).text, end="")
    print(s.get(url + "/secure/missing", verify=False).status_code)
"#;

#[test]
fn https_requests_become_client_and_server_spans() {
    require_root();
    let port = free_port();
    // Started before the agent: nginx has libssl mapped already; curl and Python map it later.
    let _nginx = start_tls_nginx(port);
    let receiver = OtlpReceiver::start(free_port());
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
        "--metrics-addr",
        "off",
        "--batch-timeout-ms",
        "100",
    ]);
    for path in ["/secure/ok?from=curl", "/secure/missing"] {
        let out = Command::new("curl")
            .args([
                "-sk",
                "--http1.1",
                &format!("https://127.0.0.1:{port}{path}"),
            ])
            .output()
            .expect("curl");
        assert!(out.status.success(), "curl {path}: {out:?}");
    }
    let out = Command::new(python())
        .args(["-c", PY, &port.to_string()])
        .output()
        .expect("the venv's python (scripts/setup.sh makes it)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok over tls\n404\nok over tls\n404\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // (kind, service, path, status) of every span.
    let want = [
        ("CLIENT", "curl", "/secure/ok", 200),
        ("SERVER", "nginx", "/secure/ok", 200),
        ("CLIENT", "curl", "/secure/missing", 404),
        ("SERVER", "nginx", "/secure/missing", 404),
        ("CLIENT", "python3", "/secure/ok", 200),
        ("SERVER", "nginx", "/secure/ok", 200),
        ("CLIENT", "python3", "/secure/missing", 404),
        ("SERVER", "nginx", "/secure/missing", 404),
        ("CLIENT", "python3", "/secure/ok", 200),
        ("SERVER", "nginx", "/secure/ok", 200),
        ("CLIENT", "python3", "/secure/missing", 404),
        ("SERVER", "nginx", "/secure/missing", 404),
    ];
    let mut spans = Vec::new();
    wait_for("the HTTPS spans", Duration::from_secs(20), || {
        spans = receiver.spans();
        spans.len() >= want.len()
    });
    let log = agent.stop();
    let kind = |s: &Received| if s.span.kind == 2 { "SERVER" } else { "CLIENT" };
    let mut got: Vec<(&str, String, String, i64)> = spans
        .iter()
        .map(|s| {
            (
                kind(s),
                s.service(),
                s.str_attr("url.path").unwrap_or_default(),
                s.int_attr("http.response.status_code").unwrap_or(0),
            )
        })
        .collect();
    let mut want: Vec<(&str, String, String, i64)> = want
        .iter()
        .map(|&(k, svc, p, st)| (k, svc.to_owned(), p.to_owned(), st))
        .collect();
    // Python's executable is python3.N (whether or not it exited before the agent read
    // /proc): the version is this machine's.
    for g in &mut got {
        if g.1.starts_with("python3.") {
            g.1 = "python3".into();
        }
    }
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "every HTTPS request, both sides, and nothing else"
    );
    for s in &spans {
        assert_eq!(s.str_attr("url.scheme").as_deref(), Some("https"));
        assert_eq!(s.str_attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.int_attr("server.port"), Some(i64::from(port)));
    }
    // Both ends of each request name the same plaintext position on the same connection.
    let edges = |k: i32| {
        let mut e: Vec<String> = spans
            .iter()
            .filter(|s| s.span.kind == k)
            .filter_map(|s| s.str_attr("tracer.tcp.edge"))
            .collect();
        e.sort();
        e
    };
    assert_eq!(edges(3).len(), 6, "every client span has an edge");
    assert_eq!(edges(3), edges(2), "client and server edges pair up");
    assert!(!log.contains("ERROR"), "agent log:\n{log}");
}
