//! Shared pieces of the integration tests: real peers (nginx, curl, a Python upstream), an OTLP
//! receiver decoding with the official protobuf definitions, and the agent binary itself.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, KeyValue},
    trace::v1::Span,
};
use prost::Message as _;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use tracer_test_support::{free_port, require_root, temp_dir, wait_for, Proc};

/// The collector binary next to the `tracer` under test. `cargo test --workspace` (and so
/// `cargo xtask test`) builds it; a run of one test binary alone builds it if it is missing
/// (cargo holds no lock while tests run). It is not rebuilt when present: `cargo build -p` alone
/// resolves features differently from a workspace build and would relink it on every run.
pub fn collector_bin() -> std::path::PathBuf {
    tracer_test_support::collector_beside(std::path::Path::new(env!("CARGO_BIN_EXE_tracer")))
}

pub fn wait_listening(port: u16, what: &str) {
    wait_for(what, Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// nginx from apt with a config of ours: static answers with chosen statuses and a proxied path.
pub fn start_nginx(port: u16, upstream_port: u16) -> Proc {
    let dir = temp_dir(&format!("nginx-{port}"));
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
    keepalive_requests 1000;
    server {{
        listen 127.0.0.1:{port};
        location = /ok {{ return 200 "ok\n"; }}
        location = /created {{ return 201 "created\n"; }}
        location = /notfound {{ return 404; }}
        location = /fail {{ return 503; }}
        location /slow/ {{ proxy_pass http://127.0.0.1:{upstream_port}; }}
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
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx not installed: run scripts/setup.sh");
    let p = Proc(child);
    wait_listening(port, "nginx to listen");
    p
}

/// A real Python HTTP server (stdlib) that answers `/slow/<ms>` after sleeping that long.
pub fn start_slow_upstream(port: u16) -> Proc {
    let script = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        ms = int(self.path.rstrip("/").rsplit("/", 1)[-1])
        time.sleep(ms / 1000)
        body = b"slept\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(port.to_string())
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_listening(port, "the Python upstream to listen");
    p
}

/// Spans received by the in-test OTLP receiver, each with its resource attributes.
#[derive(Clone, Debug)]
pub struct Received {
    pub span: Span,
    pub resource: Vec<KeyValue>,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<Value> {
        find(&self.span.attributes, key)
    }
    pub fn res(&self, key: &str) -> Option<Value> {
        find(&self.resource, key)
    }
    pub fn str_attr(&self, key: &str) -> Option<String> {
        match self.attr(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            Value::IntValue(i) => Some(i),
            _ => None,
        }
    }
    pub fn service(&self) -> String {
        match self.res("service.name") {
            Some(Value::StringValue(s)) => s,
            other => panic!("span without service.name: {other:?}"),
        }
    }
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.span.end_time_unix_nano - self.span.start_time_unix_nano)
    }
}

fn find(kvs: &[KeyValue], key: &str) -> Option<Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

/// An OTLP/HTTP receiver decoding bodies with the official protobuf definitions
/// (opentelemetry-proto), gunzipping when asked to.
pub struct OtlpReceiver {
    pub port: u16,
    pub spans: Arc<Mutex<Vec<Received>>>,
    pub requests: Arc<Mutex<usize>>,
    /// Bodies of JSON requests, as received (after gunzip).
    pub json_bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub fn start(port: u16) -> OtlpReceiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind OTLP receiver");
        listener.set_nonblocking(true).unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(0));
        let json_bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, r, j, st) = (
            spans.clone(),
            requests.clone(),
            json_bodies.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let (s, r, j) = (s.clone(), r.clone(), j.clone());
                        std::thread::spawn(move || serve_otlp(stream, &s, &r, &j));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        OtlpReceiver {
            port,
            spans,
            requests,
            json_bodies,
            stop,
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    pub fn raw_json(&self) -> Vec<Vec<u8>> {
        self.json_bodies.lock().unwrap().clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal HTTP/1.1 server loop for POST /v1/traces (keep-alive aware).
fn serve_otlp(
    stream: TcpStream,
    spans: &Mutex<Vec<Received>>,
    requests: &Mutex<usize>,
    json_bodies: &Mutex<Vec<Vec<u8>>>,
) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        let mut gzip = false;
        let mut json = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap(),
                "content-encoding" => gzip = v.trim() == "gzip",
                "content-type" => json = v.contains("json"),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        if gzip {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut out)
                .unwrap();
            body = out;
        }
        if json {
            json_bodies.lock().unwrap().push(body.clone());
        }
        let req: ExportTraceServiceRequest = if json {
            serde_json::from_slice(&body).expect("valid OTLP JSON")
        } else {
            ExportTraceServiceRequest::decode(&body[..]).expect("valid OTLP protobuf")
        };
        {
            let mut spans = spans.lock().unwrap();
            for rs in req.resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        spans.push(Received {
                            span,
                            resource: resource.clone(),
                        });
                    }
                }
            }
        }
        *requests.lock().unwrap() += 1;
        let _ = writer.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

/// The agent's `/metrics` text (empty if it does not answer within 5 s).
pub fn scrape(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent binary under test, running until dropped (SIGTERM).
pub struct Agent {
    pub proc: Proc,
    pub stderr: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracer"));
        cmd.arg("agent").args(args).env("RUST_LOG", "info");
        let daemon =
            tracer_test_support::topology::Daemon::start(cmd, "agent", "tracer: ready", true);
        Agent {
            proc: daemon.proc,
            stderr: daemon.log,
        }
    }

    /// Stops the agent with SIGTERM and returns its full stderr.
    pub fn stop(self) -> String {
        tracer_test_support::topology::Daemon {
            proc: self.proc,
            log: self.stderr,
        }
        .stop()
    }
}

/// nginx on a free port traced by the agent, which exports to a receiver every 100 ms and
/// serves no metrics: where most single-host tests start. nginx's proxied path points at a
/// free port nothing listens on. Returns nginx's port, the receiver, the agent and nginx.
pub fn traced_nginx() -> (u16, OtlpReceiver, Agent, Proc) {
    let (port, otlp_port) = (free_port(), free_port());
    let nginx = start_nginx(port, free_port());
    let receiver = OtlpReceiver::start(otlp_port);
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
        "--batch-timeout-ms",
        "100",
        "--metrics-addr",
        "off",
    ]);
    (port, receiver, agent, nginx)
}

/// One HTTP/1.1 response read off a stream: status, and the time from the first byte of the
/// request written to the last byte of the response read, as the client measured it.
pub struct Timed {
    pub status: u16,
    pub elapsed: Duration,
}

/// Reads one HTTP/1.1 response with a Content-Length from `stream`.
pub fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    loop {
        if let Some(end) = find_head_end(buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + len {
                read_more(stream, buf);
            }
            buf.drain(..end + len);
            return status;
        }
        read_more(stream, buf);
    }
}

fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).unwrap();
    assert!(n > 0, "server closed the connection early");
    buf.extend_from_slice(&chunk[..n]);
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Sends one request and reads its response, timing it.
pub fn request(stream: &mut TcpStream, raw: &str) -> Timed {
    let mut buf = Vec::new();
    let start = Instant::now();
    stream.write_all(raw.as_bytes()).unwrap();
    let status = read_response(stream, &mut buf);
    Timed {
        status,
        elapsed: start.elapsed(),
    }
}

pub fn local_port(stream: &TcpStream) -> u16 {
    stream.local_addr().unwrap().port()
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The metric names docs/grafana-dashboard.json's queries use.
pub fn dashboard_metrics() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).unwrap();
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            w.starts_with("tracer_")
                || w.starts_with("http_server_")
                || w.starts_with("http_client_")
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    names
}
