//! `tracer-collector`: receives OTLP from agents and SDKs, stores spans in an embedded database,
//! and serves the Jaeger-compatible query API and the web UI.
/// mimalloc instead of glibc's malloc: every span is a handful of short-lived allocations,
/// and glibc's malloc/free were a quarter of the profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser};
use tracer_collector::{config_file, ingest, jaeger, query_guard, stitch, tls, ui};
use tracer_store::{Retention, SpanStore, SqliteStore};

#[derive(Parser, Debug)]
#[command(
    name = "tracer-collector",
    version,
    about = "Receives OTLP traces, stores them, serves the query API and web UI",
    // The config file's settings come first as flags: the command line's, later, win.
    args_override_self = true
)]
struct Args {
    /// Read settings from this TOML file: each key a flag's name without the dashes (`_` for
    /// `-`), e.g. `retention_age = "3d"`. Flags and environment variables win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the embedded store keeps its files.
    #[arg(long, env = "TRACER_DATA_DIR", default_value = "./tracer-data")]
    data_dir: PathBuf,
    /// OTLP/gRPC listen address (OTLP/HTTP is accepted here too).
    #[arg(long, default_value = "127.0.0.1:4317")]
    grpc_addr: SocketAddr,
    /// OTLP/HTTP listen address (`POST /v1/traces`; gRPC is accepted here too).
    #[arg(long, default_value = "127.0.0.1:4318")]
    http_addr: SocketAddr,
    /// Query API and web UI listen address.
    #[arg(long, default_value = "127.0.0.1:16686")]
    query_addr: SocketAddr,
    /// Bearer token required on ingest (agents: --token; SDKs: an Authorization header). A
    /// command line is readable by every local user: prefer --token-file or the environment.
    #[arg(long, env = "TRACER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the ingest token from this file (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Wait for an fsync of each commit before acknowledging: acknowledged spans survive a power
    /// loss too, not only a crash of the collector, at the cost of a disk flush per batch.
    #[arg(long)]
    fsync: bool,
    /// PEM certificate for TLS on the ingest ports (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the ingest ports.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest request body accepted, in bytes (after gzip decompression too).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Delete spans older than this (e.g. 72h, 7d). `0` keeps them forever.
    #[arg(long, default_value = "7d")]
    retention_age: String,
    /// Delete the spans that arrived first while the store (database and write-ahead log) is
    /// larger than this many MiB. `0`: no limit.
    #[arg(long, default_value_t = 10 * 1024)]
    retention_mib: u64,
    /// Spans one answer of the query API holds at most: a trace's first spans to arrive, a
    /// search's traces together. The answer says when it was cut.
    #[arg(long, default_value_t = 50_000)]
    max_trace_spans: usize,
    /// The same limit in MiB of span data (attributes, events, names).
    #[arg(long, default_value_t = 64)]
    max_trace_mib: usize,
    /// Memory that export requests being read and decoded may take together, in MiB; beyond
    /// it requests wait up to 2 s, then are told to retry (429). Bounds the collector's size
    /// whatever clients send.
    #[arg(long, default_value_t = 256)]
    max_in_flight_mib: usize,
    /// Open connections per port at most; beyond, new ones are closed at once (counted).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a connection may stay silent (no request, no body bytes) before it is closed.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Credential required by the query API, the UI and /metrics: `Authorization: Bearer
    /// <token>`, or the token as the password of HTTP Basic (browsers ask for it).
    #[arg(long, env = "TRACER_QUERY_TOKEN", hide_env_values = true)]
    query_token: Option<String>,
    /// Read the query token from this file (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "query_token")]
    query_token_file: Option<PathBuf>,
    /// A host name the query port answers for (repeatable; `*` for any). Others get 421, which
    /// stops DNS rebinding. [default: localhost, 127.0.0.1, ::1 and the address of --query-addr]
    #[arg(long = "allow-host", value_name = "HOST")]
    allow_hosts: Vec<String>,
    /// Serve the query API and UI over TLS too, with --tls-cert and --tls-key.
    #[arg(long, requires = "tls_cert")]
    query_tls: bool,
    /// Also send every stored batch to this OTLP/HTTP traces endpoint (repeatable), e.g.
    /// http://otel-collector:4318/v1/traces: fan-out to another backend.
    #[arg(long = "forward", value_name = "URL")]
    forward: Vec<String>,
    /// A header for the forwarded requests, `name=value` (repeatable), e.g. an authorization.
    #[arg(long = "forward-header", value_name = "NAME=VALUE")]
    forward_headers: Vec<String>,
    /// Bytes waiting for each upstream at most, in MiB; beyond, batches are not forwarded to it
    /// (counted).
    #[arg(long, default_value_t = 256)]
    forward_queue_mib: u64,
}

fn parse_age(s: &str) -> anyhow::Result<Option<Duration>> {
    if s == "0" {
        return Ok(None);
    }
    let nanos = if let Some(days) = s.strip_suffix('d') {
        days.parse::<f64>().ok().map(|d| (d * 86400e9) as u64)
    } else {
        jaeger::parse_duration_nanos(s)
    };
    let nanos =
        nanos.with_context(|| format!("--retention-age {s:?} is not a duration like 72h or 7d"))?;
    Ok(Some(Duration::from_nanos(nanos)))
}

fn main() -> std::process::ExitCode {
    // No transparent huge pages: ingest allocates and frees request-sized buffers, and each
    // time the allocator gave memory back, the next fault zeroed a whole 2 MiB page (12% of the
    // collector's CPU at 10k requests/s in perf; 19.0 -> 16.7 µs a traced request with THP off,
    // 3 alternated runs).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let args = match config_file::expand(std::env::args_os().collect(), &Args::command()) {
        Ok(argv) => Args::parse_from(argv),
        Err(e) => {
            eprintln!("tracer-collector: error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer-collector: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The first line of a token file, which must not be empty.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        anyhow::bail!("the token file {} is empty", path.display());
    }
    Ok(token)
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.token_file {
        args.token = Some(read_token(path)?);
    }
    if let Some(path) = &args.query_token_file {
        args.query_token = Some(read_token(path)?);
    }
    let retention = Retention {
        max_age: parse_age(&args.retention_age)?,
        max_bytes: (args.retention_mib > 0).then_some(args.retention_mib * 1024 * 1024),
    };
    let options = tracer_store::StoreOptions {
        durability: if args.fsync {
            tracer_store::Durability::PowerLoss
        } else {
            tracer_store::Durability::ProcessCrash
        },
        ..Default::default()
    };
    let store: Arc<dyn SpanStore> = Arc::new(
        SqliteStore::open_with(&args.data_dir, &options)
            .with_context(|| format!("opening the store in {}", args.data_dir.display()))?,
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls::server_config(c, k)?),
        _ => None,
    };
    if args.token.is_none() && !args.http_addr.ip().is_loopback() {
        log::warn!(
            "ingest on {} accepts spans from anyone: set --token (and --tls-cert/--tls-key)",
            args.http_addr
        );
    }
    let forward_headers = args
        .forward_headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("--forward-header {h:?} is not name=value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let forward = tracer_collector::forward::Forwarder::start(
        &args.forward,
        args.forward_queue_mib,
        forward_headers,
    )?;
    for u in &forward.upstreams {
        log::info!("forwarding stored batches to {}", u.url);
    }
    let ingest = Arc::new(ingest::Ingest {
        store: store.clone(),
        token: args.token.clone(),
        max_body_bytes: args.max_body_bytes,
        in_flight: ingest::InFlight::new(args.max_in_flight_mib),
        stats: Default::default(),
        forward,
    });
    let files = tls::raise_file_limit();
    if files < args.max_connections as u64 * 3 + 64 {
        log::warn!(
            "this process may open {files} files: fewer than 3 ports x --max-connections {}; \
             raise the limit (LimitNOFILE= in the unit, ulimit -n) or lower --max-connections",
            args.max_connections
        );
    }
    let limits = tls::Limits {
        max_connections: args.max_connections,
        idle: Duration::from_secs(args.idle_timeout_secs.max(1)),
        stats: Arc::new(tls::ConnectionStats::default()),
    };
    let ingest_router = ingest::router(ingest.clone());
    let guard = Arc::new(query_guard::QueryGuard {
        token: args.query_token.clone(),
        allowed_hosts: if args.allow_hosts.is_empty() {
            query_guard::QueryGuard::default_hosts(args.query_addr)
        } else {
            args.allow_hosts.clone()
        },
    });
    if args.query_token.is_none() && !args.query_addr.ip().is_loopback() {
        log::warn!(
            "the query API on {} shows every trace to anyone who reaches it: set --query-token",
            args.query_addr
        );
    }
    let traces_truncated = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let query_router = jaeger::router(Arc::new(jaeger::Api {
        store: store.clone(),
        limits: stitch::Limits {
            answer: tracer_store::TraceLimit {
                max_spans: args.max_trace_spans.max(1),
                max_bytes: args.max_trace_mib.max(1) << 20,
            },
            ..stitch::Limits::default()
        },
        traces_truncated: traces_truncated.clone(),
    }))
    .merge(ui::router())
    .merge(ingest::metrics_router(
        ingest.clone(),
        limits.stats.clone(),
        traces_truncated,
    ))
    .layer(axum::middleware::from_fn_with_state(
        guard,
        query_guard::guard,
    ));

    let grpc = tls::bind(args.grpc_addr, "OTLP/gRPC").await?;
    let http = tls::bind(args.http_addr, "OTLP/HTTP").await?;
    let query = tls::bind(args.query_addr, "the query API and UI").await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    log::info!("store: {}", args.data_dir.display());
    log::info!(
        "OTLP/gRPC on {}, OTLP/HTTP on {scheme}://{}/v1/traces{}",
        args.grpc_addr,
        args.http_addr,
        if args.token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    log::info!(
        "UI and query API on {}://{}/{}",
        if args.query_tls { "https" } else { "http" },
        args.query_addr,
        if args.query_token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    eprintln!("tracer-collector: ready");

    tokio::spawn(tls::serve(
        grpc,
        ingest_router.clone(),
        tls.clone(),
        limits.clone(),
    ));
    let query_tls = if args.query_tls { tls.clone() } else { None };
    tokio::spawn(tls::serve(http, ingest_router, tls, limits.clone()));
    tokio::spawn(tls::serve(query, query_router, query_tls, limits));
    tokio::spawn(retention_loop(store.clone(), retention));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    log::info!(
        "stopping: {} spans accepted in {} requests",
        ingest
            .stats
            .spans_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        ingest
            .stats
            .requests_accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// Applies retention every minute, off the async threads.
async fn retention_loop(store: Arc<dyn SpanStore>, policy: Retention) {
    if policy.max_age.is_none() && policy.max_bytes.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let (store, policy) = (store.clone(), policy.clone());
        match tokio::task::spawn_blocking(move || store.enforce_retention(&policy)).await {
            Ok(Ok(r)) if r.deleted_spans > 0 || r.pruned_operations > 0 => log::info!(
                "retention: deleted {} spans; dropped {} operation names left without spans",
                r.deleted_spans,
                r.pruned_operations
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::error!("retention failed: {e}"),
            Err(e) => log::error!("retention task failed: {e}"),
        }
    }
}
