//! Shared pieces of the collector tests: the real collector binary on free ports with its own
//! store directory, and OTLP requests built with the official protobuf definitions.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, AnyValue, KeyValue},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use tracer_test_support::{free_port, temp_dir, wait_for};

/// The repository root (for `.venv`, the UI test script, the agent binary).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A running `tracer-collector`.
pub struct Collector {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    pub query_port: u16,
    pub extra: Vec<String>,
    pub log: Arc<Mutex<String>>,
}

impl Collector {
    pub fn start(name: &str, extra: &[&str]) -> Collector {
        let mut c = Collector {
            child: None,
            data_dir: temp_dir(name),
            grpc_port: free_port(),
            http_port: free_port(),
            query_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: Arc::new(Mutex::new(String::new())),
        };
        c.spawn();
        c
    }

    /// Starts (again) on the same ports and store.
    pub fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracer-collector"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--grpc-addr", &format!("127.0.0.1:{}", self.grpc_port)])
            .args(["--http-addr", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--query-addr", &format!("127.0.0.1:{}", self.query_port)])
            .args(&self.extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tracer-collector");
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[collector] {line}");
                if line.contains("tracer-collector: ready") {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!(
                "the collector did not become ready:\n{}",
                self.log.lock().unwrap()
            );
        }
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.http_port)
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.query_port)
    }

    /// GET on the query API, returning the JSON body (panics on transport errors).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::get(self.api(path)).await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")),
        )
    }

    /// One value from `/metrics`: `series` is the name with its labels as printed, e.g.
    /// `tracer_collector_forward_retries_total{upstream="http://..."}` (panics if absent).
    pub async fn metric(&self, series: &str) -> u64 {
        let text = reqwest::get(self.api("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

pub fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

pub fn s(v: &str) -> Value {
    Value::StringValue(v.into())
}

/// A request with one resource (service) and the given spans.
pub fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s(service)),
                    kv("host.name", s("test-host")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
}

pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A span starting `offset_us` after `base` (Unix ns) lasting `dur_us`.
pub fn span(
    trace: [u8; 16],
    id: u8,
    parent: Option<u8>,
    name: &str,
    base: u64,
    offset_us: u64,
    dur_us: u64,
) -> Span {
    Span {
        trace_id: trace.to_vec(),
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: name.into(),
        kind: 2,
        start_time_unix_nano: base + offset_us * 1000,
        end_time_unix_nano: base + (offset_us + dur_us) * 1000,
        attributes: vec![kv("http.request.method", s("GET"))],
        ..Default::default()
    }
}

/// A CA and a server certificate for 127.0.0.1/localhost signed by it (openssl CLI).
pub fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tracer test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
}
