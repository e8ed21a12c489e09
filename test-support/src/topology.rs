//! The four-host topology of issue 16, shared by the integration test (`tracer-user/tests/
//! topology.rs`) and `cargo xtask traces`: client → proxy (nginx) → service → data, each host a
//! network namespace with its own agent, one collector; the load client's ground truth; the
//! traces read back from the collector's Jaeger API and scored against it.
//!
//! Every request's expected tree, each span named by its host, kind and `url.path`:
//! client CLIENT /api/rid → proxy SERVER /api/rid → proxy CLIENT /api/rid →
//! service SERVER /api/rid → service CLIENT /data/rid → data SERVER /data/rid.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    free_port,
    netns::{Host, Hosts},
    Proc,
};

/// The hosts, in address order (10.201.R.1 is the client).
pub const HOSTS: [&str; 4] = ["client", "proxy", "service", "data"];
/// Every server listens on this port of its own host.
pub const PORT: u16 = 8080;

/// One span of the expected tree.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub host: &'static str,
    pub kind: &'static str,
    pub prefix: &'static str,
}

/// The expected tree of one request, root first; each hop's parent is the one before it.
pub const TREE: [Hop; 6] = [
    Hop {
        host: "client",
        kind: "client",
        prefix: "/api/",
    },
    Hop {
        host: "proxy",
        kind: "server",
        prefix: "/api/",
    },
    Hop {
        host: "proxy",
        kind: "client",
        prefix: "/api/",
    },
    Hop {
        host: "service",
        kind: "server",
        prefix: "/api/",
    },
    Hop {
        host: "service",
        kind: "client",
        prefix: "/data/",
    },
    Hop {
        host: "data",
        kind: "server",
        prefix: "/data/",
    },
];

/// The repository root (peers, `.venv`, `target`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives in the repository")
        .to_path_buf()
}

/// The service programs and the load client.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The repository's venv Python (it has aiohttp); `scripts/setup.sh` makes it.
pub fn python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (or cargo xtask setup)",
        p.display()
    );
    p
}

/// rotel's binary (an OTLP relay from PyPI, not written here), installed into `.venv` by
/// `scripts/setup.sh`.
pub fn rotel() -> PathBuf {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("the .venv python (run scripts/setup.sh)");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && Path::new(&path).exists(),
        "rotel is not installed in .venv: run scripts/setup.sh\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path.into()
}

/// How the service host's program handles a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Thread per connection (`ThreadingHTTPServer`), the data call on the same thread.
    Threaded,
    /// One thread reads every connection; a `ThreadPoolExecutor` thread calls out and answers.
    Pool,
    /// asyncio + aiohttp server and `ClientSession`: one thread, many requests in flight.
    Async,
    /// Node.js `http` + `fetch`: the same on V8's event loop.
    Node,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Threaded, Arch::Pool, Arch::Async, Arch::Node];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Threaded => "threaded",
            Arch::Pool => "pool",
            Arch::Async => "async",
            Arch::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Result<Arch, String> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                format!("unknown service architecture {s:?} (threaded, pool, async or node)")
            })
    }

    fn command(self, host: &Host, data: SocketAddr, downstream: Downstream) -> Command {
        let (program, script) = match self {
            Arch::Threaded => (python(), "service_threaded.py"),
            Arch::Pool => (python(), "service_pool.py"),
            Arch::Async => (python(), "service_async.py"),
            Arch::Node => (PathBuf::from("node"), "service_node.mjs"),
        };
        let mut cmd = host.command(program);
        cmd.arg(peers_dir().join(script))
            .arg(host.ip.to_string())
            .arg(PORT.to_string())
            .arg(data.to_string());
        if downstream == Downstream::Opaque {
            cmd.env("TOPOLOGY_DOWNSTREAM", "opaque");
        }
        cmd
    }
}

/// What the service's data call carries of the request it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Downstream {
    /// `/api/<rid>` calls `/data/<rid>`: the path carries the request's id, as REST services
    /// that fetch what they were asked about do.
    #[default]
    SameId,
    /// `/api/<rid>` calls `/data/<token>`, a token sharing no id with the rid (the peers'
    /// `data_id`): nothing in the call's bytes names the request it serves.
    Opaque,
}

impl Downstream {
    pub fn name(self) -> &'static str {
        match self {
            Downstream::SameId => "same id",
            Downstream::Opaque => "opaque",
        }
    }
}

/// A long-running child whose stderr is kept (and echoed, if asked) and which is ready once
/// it prints a given line.
pub struct Daemon {
    pub proc: Proc,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(mut cmd: Command, label: &str, ready: &str, echo: bool) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label} ({cmd:?}): {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().expect("piped stderr");
        let (keep, label_owned, ready) = (log.clone(), label.to_owned(), ready.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[{label_owned}] {line}");
                }
                if line.contains(&ready) {
                    let _ = tx.send(());
                }
                keep.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut daemon = Daemon {
            proc: Proc(child),
            log,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let status = daemon.proc.0.try_wait();
            panic!(
                "{label} did not become ready ({status:?}); its log:\n{}",
                daemon.log()
            );
        }
        daemon
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Stops it (SIGTERM, as `Proc` does) and returns its log.
    pub fn stop(self) -> String {
        let log = self.log.clone();
        drop(self.proc);
        std::thread::sleep(Duration::from_millis(100));
        let s = log.lock().unwrap().clone();
        s
    }
}

/// Where the pieces are and how they run.
pub struct Options {
    /// The `tracer` binary (the agent).
    pub tracer: PathBuf,
    /// The `tracer-collector` binary.
    pub collector: PathBuf,
    /// Scratch directory (store, nginx prefix, ground truth files).
    pub scratch: PathBuf,
    /// Extra agent arguments for one host, e.g. `("service", ["--clock-shift-ms", "50"])`.
    pub agent_args: Vec<(String, Vec<String>)>,
    /// Echo the collector's and the agents' logs on stderr.
    pub echo_logs: bool,
}

/// The programs under test on the proxy, service and data hosts.
pub struct Peers {
    pub arch: Arch,
    // Dropped first to last: the client side of each hop before its server.
    proxy: Proc,
    service: Proc,
    data: Proc,
}

/// The hosts with one agent each and the collector. Dropped in field order: peers, agents (which
/// flush into the collector), collector, hosts.
pub struct Topology {
    pub peers: Option<Peers>,
    /// What the service's data calls carry (read by `start_peers`).
    pub downstream: Downstream,
    pub agents: Vec<(String, Daemon)>,
    pub collector: Daemon,
    pub http_port: u16,
    pub query_port: u16,
    pub hosts: Hosts,
    pub scratch: PathBuf,
}

/// What the load client is told to do.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub concurrency: usize,
    /// Requests a second in total; 0: as fast as each client can.
    pub rate: f64,
    /// Stop after this long (0: use `count`).
    pub seconds: f64,
    /// Requests a client (0: use `seconds`).
    pub count: usize,
    /// Each client cycles through it, one letter a request: `r` normal, `e` a 500 from the data
    /// service, `s` a 50 ms slow data hop.
    pub pattern: String,
    /// Makes this run's rids unique.
    pub tag: String,
}

/// One request as the load client saw it (times on the client host's clock, Unix ns).
#[derive(Debug, Clone)]
pub struct Request {
    pub rid: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub status: u16,
    pub thread: usize,
    pub local_port: u16,
}

/// The ground truth of one load run.
#[derive(Debug, Clone)]
pub struct Load {
    pub requests: Vec<Request>,
    pub seconds: f64,
    pub rate: f64,
    pub errors: Vec<String>,
}

impl Load {
    /// The time range the run covers, Unix µs.
    pub fn window_us(&self) -> (u64, u64) {
        let start = self.requests.iter().map(|r| r.start_ns).min().unwrap_or(0);
        let end = self.requests.iter().map(|r| r.end_ns).max().unwrap_or(0);
        (start / 1000, end / 1000)
    }
}

fn agent_command(opts: &Options, host: &Host, endpoint: &str) -> Command {
    let mut cmd = Command::new(&opts.tracer);
    cmd.arg("agent")
        .args(["--endpoint", endpoint])
        .arg("--netns")
        .arg(host.netns_path())
        .args(["--host-name", &host.name])
        .args(["--host-id", &host.netns])
        .args(["--batch-timeout-ms", "100", "--metrics-addr", "off"])
        .env("RUST_LOG", "info");
    for (h, args) in &opts.agent_args {
        if *h == host.name {
            cmd.args(args);
        }
    }
    cmd
}

impl Topology {
    /// Creates the four hosts, starts the collector and one agent per host. Needs root.
    pub fn start(opts: &Options) -> Topology {
        for (h, _) in &opts.agent_args {
            assert!(
                HOSTS.contains(&h.as_str()),
                "agent arguments for unknown host {h:?}"
            );
        }
        let hosts = Hosts::create(&HOSTS);
        let (grpc_port, http_port, query_port) = (free_port(), free_port(), free_port());
        let store = opts.scratch.join("store");
        let mut cmd = Command::new(&opts.collector);
        cmd.arg("--data-dir")
            .arg(&store)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(["--query-addr", &format!("127.0.0.1:{query_port}")]);
        let collector = Daemon::start(cmd, "collector", "tracer-collector: ready", opts.echo_logs);
        let endpoint = format!("http://127.0.0.1:{http_port}");
        // Each agent loads its probes (a second or two); in parallel they are ready sooner.
        let agents = std::thread::scope(|s| {
            let handles: Vec<_> = hosts
                .hosts
                .iter()
                .map(|h| {
                    let cmd = agent_command(opts, h, &endpoint);
                    let label = format!("agent {}", h.name);
                    let echo = opts.echo_logs;
                    s.spawn(move || {
                        (
                            h.name.clone(),
                            Daemon::start(cmd, &label, "tracer: ready", echo),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an agent failed to start"))
                .collect()
        });
        Topology {
            peers: None,
            downstream: Downstream::SameId,
            agents,
            collector,
            http_port,
            query_port,
            hosts,
            scratch: opts.scratch.clone(),
        }
    }

    pub fn addr(&self, host: &str) -> SocketAddr {
        SocketAddr::from((self.hosts.host(host).ip, PORT))
    }

    /// (Re)starts the data service, the service under test and nginx, fresh, with `arch` on the
    /// service host.
    pub fn start_peers(&mut self, arch: Arch) {
        self.peers = None;
        let data_addr = self.addr("data");
        let data_host = self.hosts.host("data").clone();
        let mut cmd = data_host.command(python());
        cmd.arg(peers_dir().join("data.py"))
            .arg(data_host.ip.to_string())
            .arg(PORT.to_string());
        let data = spawn(cmd, "the data service");
        data_host.wait_listening(data_addr, "the data service to listen");

        let service_host = self.hosts.host("service").clone();
        let service = spawn(
            arch.command(&service_host, data_addr, self.downstream),
            "the service",
        );
        service_host.wait_listening(self.addr("service"), "the service to listen");

        let proxy_host = self.hosts.host("proxy").clone();
        let proxy = start_nginx(&proxy_host, self.addr("service"), &self.scratch);
        proxy_host.wait_listening(self.addr("proxy"), "nginx to listen");
        self.peers = Some(Peers {
            arch,
            proxy,
            service,
            data,
        });
    }

    /// Runs the load client on the client host against the proxy and returns its ground truth.
    pub fn run_load(&mut self, spec: &LoadSpec) -> Load {
        let out = self.scratch.join(format!("truth-{}.json", spec.tag));
        let client = self.hosts.host("client");
        let mut cmd = client.command(python());
        cmd.arg(peers_dir().join("loadclient.py"))
            .arg(self.addr("proxy").to_string())
            .arg(&out)
            .args(["--concurrency", &spec.concurrency.to_string()])
            .args(["--rate", &spec.rate.to_string()])
            .args(["--seconds", &spec.seconds.to_string()])
            .args(["--count", &spec.count.to_string()])
            .args(["--pattern", &spec.pattern])
            .args(["--tag", &spec.tag]);
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("starting the load client: {e}"));
        assert!(status.success(), "the load client failed ({status})");
        if let Some(p) = &mut self.peers {
            p.check_running();
        }
        let text = std::fs::read_to_string(&out).expect("the load client's ground truth");
        parse_load(&text)
    }
}

fn spawn(mut cmd: Command, what: &str) -> Proc {
    Proc(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("starting {what} ({cmd:?}): {e}")),
    )
}

/// nginx (apt) as the reverse proxy: `/api/` to an `upstream` with keep-alive connections.
fn start_nginx(host: &Host, service: SocketAddr, scratch: &Path) -> Proc {
    let dir = scratch.join("nginx");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    upstream service {{
        server {service};
        keepalive 128;
        keepalive_requests 100000;
        keepalive_timeout 120s;
    }}
    server {{
        listen {listen};
        location /api/ {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        dir = dir.display(),
        listen = SocketAddr::from((host.ip, PORT)),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = host.command("/usr/sbin/nginx");
    cmd.arg("-c").arg(&path).arg("-p").arg(&dir);
    spawn(cmd, "nginx (run scripts/setup.sh)")
}

fn parse_load(text: &str) -> Load {
    let v: Value = serde_json::from_str(text).expect("ground truth is JSON");
    let num = |r: &Value, k: &str| -> u64 {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("ground truth field {k} missing in {r}"))
    };
    let requests = v["requests"]
        .as_array()
        .expect("ground truth requests")
        .iter()
        .map(|r| Request {
            rid: r["rid"].as_str().expect("rid").to_owned(),
            start_ns: num(r, "start_ns"),
            end_ns: num(r, "end_ns"),
            status: num(r, "status") as u16,
            thread: num(r, "thread") as usize,
            local_port: num(r, "local_port") as u16,
        })
        .collect();
    Load {
        requests,
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        rate: v["rate"].as_f64().unwrap_or(0.0),
        errors: v["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

impl Peers {
    /// Panics if one of the programs has exited (a crash would otherwise look like lost spans).
    pub fn check_running(&mut self) {
        for (what, p) in [
            ("nginx", &mut self.proxy),
            ("the service", &mut self.service),
            ("the data service", &mut self.data),
        ] {
            if let Ok(Some(status)) = p.0.try_wait() {
                panic!("{what} exited ({status})");
            }
        }
    }
}

// ---- reading traces back ---------------------------------------------------------------------

/// One span as the collector's Jaeger API shows it.
#[derive(Debug, Clone)]
pub struct JSpan {
    /// The trace it is shown in (the stitched trace's id).
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    pub start_us: i64,
    pub duration_us: i64,
    /// `client`, `server`, ... (`span.kind`).
    pub kind: String,
    pub path: String,
    /// The resource's `host.name`.
    pub host: String,
    pub service: String,
    pub tags: HashMap<String, Value>,
    pub warnings: Vec<String>,
}

impl JSpan {
    pub fn end_us(&self) -> i64 {
        self.start_us + self.duration_us
    }
    pub fn str_tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).and_then(Value::as_str)
    }
    pub fn int_tag(&self, key: &str) -> Option<i64> {
        self.tags.get(key).and_then(Value::as_i64)
    }
    pub fn status(&self) -> Option<i64> {
        self.int_tag("http.response.status_code")
    }
    /// `host kind path (span id)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {} ({})",
            self.host, self.kind, self.path, self.span_id
        )
    }
}

/// One trace as the API shows it.
#[derive(Debug, Clone)]
pub struct JTrace {
    pub trace_id: String,
    pub spans: Vec<JSpan>,
    pub warnings: Vec<String>,
    pub incomplete: Option<bool>,
    pub incomplete_reasons: Vec<String>,
}

/// A GET on the collector's query API: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let body = raw[end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    Ok((status, if chunked { dechunk(&body)? } else { body }))
}

fn dechunk(mut b: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| std::io::Error::other("truncated chunk size"))?;
        let size = std::str::from_utf8(&b[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| std::io::Error::other("bad chunk size"))?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(std::io::Error::other("truncated chunk"));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn api_json(port: u16, path: &str) -> Value {
    let (status, body) =
        http_get(port, path).unwrap_or_else(|e| panic!("GET {path} on the collector: {e}"));
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses one trace of Jaeger JSON.
pub fn parse_trace(t: &Value) -> JTrace {
    let processes = &t["processes"];
    let trace_id = t["traceID"].as_str().unwrap_or_default().to_owned();
    let spans = t["spans"]
        .as_array()
        .map(|spans| {
            spans
                .iter()
                .map(|s| {
                    let tags: HashMap<String, Value> = s["tags"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|kv| {
                            Some((kv["key"].as_str()?.to_owned(), kv["value"].clone()))
                        })
                        .collect();
                    let process = &processes[s["processID"].as_str().unwrap_or_default()];
                    let host = process["tags"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|kv| kv["key"] == "host.name")
                        .and_then(|kv| kv["value"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    let parent = s["references"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|r| r["refType"] == "CHILD_OF")
                        .and_then(|r| r["spanID"].as_str())
                        .map(str::to_owned);
                    JSpan {
                        trace_id: s["traceID"].as_str().unwrap_or_default().to_owned(),
                        span_id: s["spanID"].as_str().unwrap_or_default().to_owned(),
                        parent,
                        start_us: s["startTime"].as_i64().unwrap_or(0),
                        duration_us: s["duration"].as_i64().unwrap_or(0),
                        kind: tags
                            .get("span.kind")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        path: tags
                            .get("url.path")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        host,
                        service: process["serviceName"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        warnings: strings(&s["warnings"]),
                        tags,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    JTrace {
        trace_id,
        spans,
        warnings: strings(&t["warnings"]),
        incomplete: t["incomplete"].as_bool(),
        incomplete_reasons: strings(&t["incompleteReasons"]),
    }
}

/// Every trace with a span in `[start_us, end_us]`, searched without a service (so each
/// stitched trace comes back once, not once a service) in `windows` equal time windows, each
/// split again while a search comes back full (the API returns at most 1,500 traces a search).
pub fn fetch_traces(query_port: u16, start_us: u64, end_us: u64, windows: u64) -> Vec<JTrace> {
    const LIMIT: usize = 1500;
    let windows = windows.max(1);
    let step = (end_us - start_us).div_ceil(windows).max(1);
    let mut todo: Vec<(u64, u64)> = (0..windows)
        .map(|i| (start_us + i * step, (start_us + (i + 1) * step).min(end_us)))
        .filter(|(from, to)| from < to)
        .collect();
    let mut traces: HashMap<String, JTrace> = HashMap::new();
    while let Some((from, to)) = todo.pop() {
        let data = api_json(
            query_port,
            &format!("/api/traces?limit={LIMIT}&start={from}&end={to}"),
        );
        let found = data["data"].as_array().cloned().unwrap_or_default();
        if found.len() >= LIMIT && to - from > 1000 {
            let mid = from + (to - from) / 2;
            todo.push((from, mid));
            todo.push((mid, to));
            continue;
        }
        for t in &found {
            let t = parse_trace(t);
            // A trace seen twice keeps its larger view (spans may have arrived in between).
            let keep = traces
                .get(&t.trace_id)
                .is_none_or(|old| old.spans.len() < t.spans.len());
            if keep {
                traces.insert(t.trace_id.clone(), t);
            }
        }
    }
    let mut out: Vec<JTrace> = traces.into_values().collect();
    out.sort_by(|a, b| a.trace_id.cmp(&b.trace_id));
    out
}

/// The rid a span is about, from its `url.path` (`/api/<rid>` or `/data/<rid>`, the latter
/// possibly an opaque token: see [`Downstream::Opaque`]).
pub fn rid_of(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(rid) = path.strip_prefix("/api/") {
        return Some(rid.into());
    }
    let id = path.strip_prefix("/data/")?;
    // The peers' data_id: first letter, "o", the rest of the rid reversed (rids never have an
    // "o" second: their second character is the tag's).
    let mut chars = id.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some('o')) => {
            let rest: String = chars.rev().collect();
            Some(format!("{first}{rest}").into())
        }
        _ => Some(id.into()),
    }
}

/// Waits until every span of `load` is there (6 a request) or none has arrived for `quiet`, at
/// most `timeout`; returns the traces of the run's time window (widened by `margin_us` for a
/// shifted clock). `progress` gets the spans found, the spans expected and how long the
/// fetch took.
pub fn wait_for_traces(
    query_port: u16,
    load: &Load,
    margin_us: u64,
    quiet: Duration,
    timeout: Duration,
    progress: &mut dyn FnMut(usize, usize, Duration),
) -> Vec<JTrace> {
    let (start, end) = load.window_us();
    let (from, to) = (
        start.saturating_sub(margin_us + 1_000_000),
        end + margin_us + 1_000_000,
    );
    let rids: HashSet<&str> = load.requests.iter().map(|r| r.rid.as_str()).collect();
    let want = rids.len() * TREE.len();
    let began = Instant::now();
    let (mut last, mut last_change) = (usize::MAX, Instant::now());
    // Agents hand spans over after at most a drain period (≤ 1 s) and the batch timeout: a read
    // before that is work thrown away.
    std::thread::sleep(Duration::from_millis(1500));
    loop {
        let fetch_began = Instant::now();
        // About 500 requests a window: a search of 1,500 traces that comes back full is work
        // thrown away.
        let windows = (load.requests.len() as u64).div_ceil(500);
        let traces = fetch_traces(query_port, from, to, windows);
        let have: HashSet<&str> = traces
            .iter()
            .flat_map(|t| &t.spans)
            .filter(|s| rid_of(&s.path).is_some_and(|r| rids.contains(r.as_ref())))
            .map(|s| s.span_id.as_str())
            .collect();
        let n = have.len();
        progress(n, want, fetch_began.elapsed());
        if n != last {
            last = n;
            last_change = Instant::now();
        }
        // The collector links spans when they are read, so once all are there the traces are
        // as whole as they will be.
        if n >= want || last_change.elapsed() >= quiet || began.elapsed() >= timeout {
            return traces;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

// ---- scoring ----------------------------------------------------------------------------------

/// One request's expected spans as found (by host, kind and path), `None` where missing.
#[derive(Debug, Clone)]
pub struct Found {
    pub request: Request,
    pub spans: [Option<JSpan>; 6],
    /// Further spans with the same host, kind and path as one of the six.
    pub duplicates: Vec<JSpan>,
}

impl Found {
    /// The whole expected tree is one trace with every parent right.
    pub fn exact(&self) -> bool {
        let Some(root) = &self.spans[0] else {
            return false;
        };
        root.parent.is_none()
            && self
                .spans
                .iter()
                .all(|s| s.as_ref().is_some_and(|s| s.trace_id == root.trace_id))
            && (1..TREE.len()).all(|i| self.parent_right(i))
    }
    /// Span `i` exists and its parent is span `i - 1`.
    pub fn parent_right(&self, i: usize) -> bool {
        match (&self.spans[i], &self.spans[i - 1]) {
            (Some(s), Some(p)) => s.parent.as_deref() == Some(p.span_id.as_str()),
            _ => false,
        }
    }
}

/// The figures of one run against its ground truth.
#[derive(Debug, Clone, Default)]
pub struct Score {
    pub requests: usize,
    /// Requests whose whole expected tree is one trace with every parent right.
    pub complete: usize,
    /// Requests whose six spans all exist and share a trace id (parents may be wrong).
    pub one_trace: usize,
    /// Expected non-root spans (5 a request) and those whose parent is the expected span.
    pub links_expected: usize,
    pub linked: usize,
    /// Spans (of the expected ones) with a parent that is not the expected one, by the child's
    /// (`tracer.link.source`, `tracer.link.confidence`, `tracer.link.by`).
    pub wrong: usize,
    pub wrong_by: BTreeMap<(String, String, String), usize>,
    /// Right links by the same key, to see what each mechanism did.
    pub right_by: BTreeMap<(String, String, String), usize>,
    /// Expected non-root spans present with no parent at all, and how many at each hop.
    pub orphans: usize,
    pub orphans_by_hop: [usize; 6],
    /// Expected spans never found, and how many of them at each hop.
    pub missing: usize,
    pub missing_by_hop: [usize; 6],
    pub duplicates: usize,
    /// Spans of the window about no request of this run.
    pub other: usize,
    /// The largest amount a child starts before its (actual) parent, and ends after it, µs.
    pub max_early_us: i64,
    pub max_late_end_us: i64,
    /// The child and the parent of the largest early start (`describe()` of each).
    pub max_early_pair: Option<(String, String)>,
    /// Spans whose time the collector shifted (`tracer.clock.shift_us`), and the shifts by host.
    pub shifted: usize,
    pub shift_by_host: BTreeMap<String, (i64, i64)>,
    pub found: Vec<Found>,
}

fn link_key(s: &JSpan) -> (String, String, String) {
    let t = |k: &str| s.str_tag(k).unwrap_or("-").to_owned();
    (
        t("tracer.link.source"),
        t("tracer.link.confidence"),
        t("tracer.link.by"),
    )
}

/// Scores the traces against the ground truth. Spans are matched to hops by host, kind and
/// rid; the actual parent of a span is looked up among all spans fetched.
pub fn score(load: &Load, traces: &[JTrace]) -> Score {
    let mut by_id: HashMap<&str, &JSpan> = HashMap::new();
    for s in traces.iter().flat_map(|t| &t.spans) {
        by_id.entry(s.span_id.as_str()).or_insert(s);
    }
    let index: HashMap<&str, usize> = load
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.rid.as_str(), i))
        .collect();
    let mut found: Vec<Found> = load
        .requests
        .iter()
        .map(|r| Found {
            request: r.clone(),
            spans: Default::default(),
            duplicates: Vec::new(),
        })
        .collect();
    let mut sc = Score {
        requests: load.requests.len(),
        ..Default::default()
    };
    for s in by_id.values() {
        let hop = TREE
            .iter()
            .position(|h| h.host == s.host && h.kind == s.kind && s.path.starts_with(h.prefix));
        let req = rid_of(&s.path).and_then(|r| index.get(r.as_ref()));
        match (hop, req) {
            (Some(h), Some(&i)) => {
                let slot = &mut found[i].spans[h];
                if slot.is_some() {
                    found[i].duplicates.push((*s).clone());
                } else {
                    *slot = Some((*s).clone());
                }
            }
            _ => sc.other += 1,
        }
        if let Some(shift) = s.int_tag("tracer.clock.shift_us") {
            sc.shifted += 1;
            let e = sc
                .shift_by_host
                .entry(s.host.clone())
                .or_insert((shift, shift));
            e.0 = e.0.min(shift);
            e.1 = e.1.max(shift);
        }
    }
    for f in &found {
        sc.duplicates += f.duplicates.len();
        if f.exact() {
            sc.complete += 1;
        }
        if let Some(root) = &f.spans[0] {
            if f.spans
                .iter()
                .all(|s| s.as_ref().is_some_and(|s| s.trace_id == root.trace_id))
            {
                sc.one_trace += 1;
            }
        }
        for (i, s) in f.spans.iter().enumerate() {
            let Some(s) = s else {
                sc.missing += 1;
                sc.missing_by_hop[i] += 1;
                continue;
            };
            if let Some(p) = s.parent.as_deref().and_then(|p| by_id.get(p)) {
                if p.start_us - s.start_us > sc.max_early_us {
                    sc.max_early_us = p.start_us - s.start_us;
                    sc.max_early_pair = Some((s.describe(), p.describe()));
                }
                sc.max_late_end_us = sc.max_late_end_us.max(s.end_us() - p.end_us());
            }
            if i == 0 {
                // The root has no expected parent: any parent is a wrong link.
                if s.parent.is_some() {
                    sc.wrong += 1;
                    *sc.wrong_by.entry(link_key(s)).or_default() += 1;
                }
                continue;
            }
            sc.links_expected += 1;
            if f.parent_right(i) {
                sc.linked += 1;
                *sc.right_by.entry(link_key(s)).or_default() += 1;
            } else if s.parent.is_some() {
                sc.wrong += 1;
                *sc.wrong_by.entry(link_key(s)).or_default() += 1;
            } else {
                sc.orphans += 1;
                sc.orphans_by_hop[i] += 1;
            }
        }
    }
    // Spans missing count towards the expected links too.
    sc.links_expected = sc.requests * (TREE.len() - 1);
    sc.found = found;
    sc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rid: &str) -> Request {
        Request {
            rid: rid.into(),
            start_ns: 1_000_000_000,
            end_ns: 2_000_000_000,
            status: 200,
            thread: 0,
            local_port: 1,
        }
    }

    /// The six spans of `rid` in trace `trace`, each the child of the one before, nested in
    /// time; span ids are `<rid>-<hop>`.
    fn tree(rid: &str, trace: &str) -> Vec<JSpan> {
        TREE.iter()
            .enumerate()
            .map(|(i, h)| {
                let mut tags = HashMap::new();
                tags.insert("tracer.link.source".into(), Value::from("tcp-seq"));
                tags.insert("tracer.link.confidence".into(), Value::from("high"));
                JSpan {
                    trace_id: trace.into(),
                    span_id: format!("{rid}-{i}"),
                    parent: (i > 0).then(|| format!("{rid}-{}", i - 1)),
                    start_us: 1000 + i as i64 * 10,
                    duration_us: 1000 - i as i64 * 20,
                    kind: h.kind.into(),
                    path: format!("{}{rid}", h.prefix),
                    host: h.host.into(),
                    service: "svc".into(),
                    tags,
                    warnings: Vec::new(),
                }
            })
            .collect()
    }

    fn trace(id: &str, spans: Vec<JSpan>) -> JTrace {
        JTrace {
            trace_id: id.into(),
            spans,
            warnings: Vec::new(),
            incomplete: Some(false),
            incomplete_reasons: Vec::new(),
        }
    }

    #[test]
    fn scoring_counts_complete_wrong_orphan_missing_and_early_children() {
        let load = Load {
            requests: vec![request("ra"), request("rb"), request("rc")],
            seconds: 1.0,
            rate: 3.0,
            errors: Vec::new(),
        };
        // ra: exact. rb: hop 2 points at ra's span (wrong), hop 4 has no parent (orphan, and
        // its subtree in a trace of its own), hop 5 starts 7 µs before its parent. rc: the
        // data span never arrived, plus a span about no request.
        let a = tree("ra", "t1");
        let mut b = tree("rb", "t2");
        b[2].parent = Some("ra-1".into());
        b[2].tags
            .insert("tracer.link.source".into(), Value::from("sole-request"));
        b[2].tags
            .insert("tracer.link.confidence".into(), Value::from("medium"));
        b[4].parent = None;
        b[4].trace_id = "t3".into();
        b[5].trace_id = "t3".into();
        b[5].start_us = b[4].start_us - 7;
        let mut c = tree("rc", "t4");
        c.pop();
        let mut stray = tree("zz", "t5");
        stray.truncate(1);
        let traces = vec![
            trace("t1", a),
            trace("t2", b[..4].to_vec()),
            trace("t3", b[4..].to_vec()),
            trace("t4", c),
            trace("t5", stray),
        ];
        let s = score(&load, &traces);
        assert_eq!(s.requests, 3);
        assert_eq!(s.complete, 1, "only ra");
        assert_eq!(s.one_trace, 1);
        assert_eq!(s.links_expected, 15);
        // ra 5, rb hops 1, 3, 5, rc hops 1-4.
        assert_eq!(s.linked, 5 + 3 + 4);
        assert_eq!(s.wrong, 1);
        assert_eq!(
            s.wrong_by
                .get(&("sole-request".into(), "medium".into(), "-".into())),
            Some(&1)
        );
        assert_eq!(s.orphans, 1);
        assert_eq!(s.orphans_by_hop, [0, 0, 0, 0, 1, 0]);
        assert_eq!(s.missing, 1);
        assert_eq!(s.missing_by_hop, [0, 0, 0, 0, 0, 1]);
        assert_eq!(s.other, 1);
        assert_eq!(s.max_early_us, 7);
        assert_eq!(
            s.max_early_pair.as_ref().map(|(c, _)| c.as_str()),
            Some("data server /data/rb (rb-5)")
        );
        assert!(s.found[0].exact() && !s.found[1].exact() && !s.found[2].exact());
    }

    #[test]
    fn jaeger_json_parses_into_spans_with_their_host() {
        let t = serde_json::json!({
            "traceID": "t1",
            "spans": [{
                "traceID": "t1", "spanID": "s2", "startTime": 10, "duration": 5,
                "references": [{"refType": "CHILD_OF", "traceID": "t1", "spanID": "s1"}],
                "processID": "p1", "warnings": ["clock skew: shifted by +3 µs (host proxy)"],
                "tags": [
                    {"key": "span.kind", "type": "string", "value": "server"},
                    {"key": "url.path", "type": "string", "value": "/api/r1"},
                    {"key": "http.response.status_code", "type": "int64", "value": 502},
                ],
            }],
            "processes": {"p1": {"serviceName": "nginx", "tags": [
                {"key": "host.name", "type": "string", "value": "proxy"}]}},
            "incomplete": true,
            "incompleteReasons": ["CLIENT span s9: its server side never arrived"],
        });
        let t = parse_trace(&t);
        assert_eq!(t.incomplete, Some(true));
        assert_eq!(t.incomplete_reasons.len(), 1);
        let s = &t.spans[0];
        assert_eq!(
            (
                s.host.as_str(),
                s.kind.as_str(),
                s.path.as_str(),
                s.service.as_str()
            ),
            ("proxy", "server", "/api/r1", "nginx")
        );
        assert_eq!(s.parent.as_deref(), Some("s1"));
        assert_eq!((s.start_us, s.end_us()), (10, 15));
        assert_eq!(s.status(), Some(502));
        assert_eq!(s.warnings.len(), 1);
        assert_eq!(rid_of(&s.path).as_deref(), Some("r1"));
        assert_eq!(rid_of("/data/so21x3x7").as_deref(), Some("s7x3x12"));
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"5\r\nab").is_err());
    }
}
