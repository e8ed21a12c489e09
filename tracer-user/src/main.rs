//! `tracer`: the eBPF tracing agent. See `tracer agent --help`.
/// mimalloc instead of glibc's malloc: every span is a handful of short-lived allocations,
/// and glibc's malloc/free were a quarter of the profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracer_user::{agent, client, doctor, replay, settings};

#[derive(Parser)]
#[command(name = "tracer", version, about = "Traces every request on this host with eBPF (HTTP/1, HTTP/2, gRPC, Redis, PostgreSQL, MySQL, DNS; TLS through OpenSSL), no code changes; queries the collector", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel probes and stream spans to a collector (needs root or CAP_BPF+CAP_PERFMON).
    Agent(Box<settings::AgentArgs>),
    /// Check that this host can run the agent and reach its collector, one line a check with
    /// what to do about each failure; takes the agent's flags (and --config) to check the
    /// collector the agent would use. Exit status 1 if any check failed.
    Doctor(Box<settings::AgentArgs>),
    /// List the services the collector knows.
    Services {
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List a service's operations (span names).
    Operations {
        service: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Search traces.
    Traces {
        #[command(flatten)]
        query: client::TracesArgs,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show one trace as an indented waterfall.
    Trace {
        /// Trace id (hex).
        id: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Benchmark the agent's own work (pairing, spans, OTLP encoding) on records saved by
    /// `tracer agent --record FILE`: prints its CPU time per record and per span.
    Replay {
        /// The recording (made by this version of the agent: the record layout is the probes').
        file: std::path::PathBuf,
        /// Times to run through it.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Only trace connections with this local or remote port (repeatable), as the agent's
        /// `--port`.
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// Print the spans, one JSON object a line (as `tracer agent --stdout`), instead of
        /// dropping them; the figures go to stderr.
        #[arg(long)]
        spans: bool,
    },
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (the version libmimalloc-sys 0.1.49
/// builds; the Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Give freed pages back to the kernel at once instead of after 10 ms: the agent's memory
    // is mostly short-lived span batches, and its resident size is what users budget for.
    // MIMALLOC_PURGE_DELAY in the environment still wins, for whoever wants to tune it.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores the value; mimalloc reads it on its next purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    if let Command::Replay {
        file,
        repeat,
        ports,
        spans,
    } = &cli.command
    {
        return exit(replay::replay(file, *repeat, ports.clone(), *spans));
    }
    // One thread for the drain, the exporter and the metrics endpoint: with worker threads,
    // every drain's hand-over to the exporter woke one up (a futex and an epoll wake each way),
    // which measured 10.9 -> 8.6 us of agent CPU a request at 10k req/s.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match cli.command {
                Command::Agent(args) => agent::run(*args).await,
                Command::Doctor(args) => doctor::run(*args).await,
                Command::Services { client } => client::services(&client).await,
                Command::Operations { service, client } => {
                    client::operations(&client, &service).await
                }
                Command::Traces { query, client } => client::traces(&client, &query).await,
                Command::Trace { id, client } => client::trace(&client, &id).await,
                Command::Replay { .. } => unreachable!("handled without a runtime"),
            }
        })
    });
    exit(result)
}

fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
