//! End to end on this host: the agent's probes trace nginx, the agent exports to the collector
//! over TLS with a token, and the trace is found through the query API and the `tracer`
//! command-line client.
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

fn agent_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_tracer-collector")).with_file_name("tracer");
    assert!(
        path.exists(),
        "{} missing: build the agent first (cargo build -p tracer-user)",
        path.display()
    );
    path
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start_nginx(port: u16) -> Killed {
    let dir = temp_dir(&format!("e2e-nginx-{port}"));
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         server {{ listen 127.0.0.1:{port}; location = /checkout {{ return 201 \"ok\\n\"; }} location = /boom {{ return 500; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir)
        .spawn()
        .expect("nginx (scripts/setup.sh installs it)");
    wait_for("nginx", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Killed(child)
}

fn http(port: u16, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: shop.local\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn cli(c: &Collector, args: &[&str]) -> String {
    let out = Command::new(agent_binary())
        .args(args)
        .args(["--url", &c.api("")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tracer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn agent_traces_nginx_into_the_collector() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test loads eBPF programs and must run as root"
    );
    let certs = temp_dir("e2e-certs");
    make_certs(&certs);
    let (cert, key) = (certs.join("server.pem"), certs.join("server.key"));
    let c = Collector::start(
        "e2e",
        &[
            "--token",
            "agent-token",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let nginx_port = free_port();
    let _nginx = start_nginx(nginx_port);
    let mut agent = Command::new(agent_binary())
        .args([
            "agent",
            "--endpoint",
            &format!("https://127.0.0.1:{}", c.http_port),
            "--token",
            "agent-token",
        ])
        .arg("--ca-cert")
        .arg(certs.join("ca.pem"))
        .args([
            "--port",
            &nginx_port.to_string(),
            "--exe",
            "nginx",
            "--batch-timeout-ms",
            "100",
            "--metrics-addr",
            "off",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = agent.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut seen = String::new();
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            eprint!("[agent] {}", String::from_utf8_lossy(&buf[..n]));
            if seen.contains("tracer: ready") {
                let _ = tx.send(());
            }
        }
    });
    let _agent = Killed(agent);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the agent did not become ready");

    assert!(http(nginx_port, "POST", "/checkout?card=4111").starts_with("HTTP/1.1 201"));
    assert!(http(nginx_port, "GET", "/boom").starts_with("HTTP/1.1 500"));

    let start = std::time::Instant::now();
    let found = loop {
        let (_, body) = c.get("/api/traces?service=nginx&lookback=5m").await;
        if body["data"].as_array().is_some_and(|d| d.len() >= 2) {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the nginx spans never reached the collector: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let traces = found["data"].as_array().unwrap();
    assert_eq!(traces.len(), 2, "{found}");
    let (_, ops) = c.get("/api/services/nginx/operations").await;
    assert_eq!(
        ops["data"],
        serde_json::json!(["GET /boom", "POST /checkout"])
    );
    let (_, by_op) = c
        .get("/api/traces?service=nginx&operation=POST%20%2Fcheckout&lookback=5m")
        .await;
    let trace = &by_op["data"][0];
    let span = &trace["spans"][0];
    assert_eq!(span["operationName"], "POST /checkout");
    let tags = span["tags"].as_array().unwrap();
    let get = |k: &str| {
        tags.iter()
            .find(|t| t["key"] == k)
            .map(|t| t["value"].clone())
    };
    assert_eq!(
        get("url.path"),
        Some("/checkout".into()),
        "query string not stored"
    );
    assert_eq!(get("http.response.status_code"), Some(201.into()));
    assert_eq!(get("server.address"), Some("shop.local".into()));
    assert_eq!(get("span.kind"), Some("server".into()));
    let process = &trace["processes"][span["processID"].as_str().unwrap()];
    assert!(process["tags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "host.name"));
    let (_, boom) = c
        .get("/api/traces?service=nginx&operation=GET%20%2Fboom&lookback=5m")
        .await;
    let boom_tags = boom["data"][0]["spans"][0]["tags"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        boom_tags
            .iter()
            .any(|t| t["key"] == "error" && t["value"] == true),
        "5xx is an error: {boom_tags:?}"
    );

    // The command-line client sees the same.
    let services = cli(&c, &["services"]);
    assert!(services.lines().any(|l| l == "nginx"), "{services}");
    let listing = cli(
        &c,
        &[
            "traces",
            "--service",
            "nginx",
            "--operation",
            "POST /checkout",
        ],
    );
    let id = trace["traceID"].as_str().unwrap();
    assert!(
        listing.contains(id) && listing.contains("nginx: POST /checkout"),
        "{listing}"
    );
    let shown = cli(&c, &["trace", id]);
    assert!(shown.contains("nginx: POST /checkout [server]"), "{shown}");
    let json: serde_json::Value = serde_json::from_str(&cli(&c, &["trace", id, "--json"])).unwrap();
    assert_eq!(json[0]["traceID"], id);
}
