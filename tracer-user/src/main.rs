//! `tracer`: the eBPF tracing agent. See `tracer agent --help`.
mod agent;
mod btf;
mod export;
mod http;
mod metrics;
mod pairing;
mod probes;
mod records;
mod resource;
mod settings;
mod spans;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tracer", version, about = "Traces every HTTP request on this host with eBPF, no code changes", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel probes and stream spans to a collector (needs root or CAP_BPF+CAP_PERFMON).
    Agent(settings::AgentArgs),
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(agent::run(args))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
