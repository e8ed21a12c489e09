//! `cargo xtask ...`: set-up, build, test and run orchestration, so the README's commands work
//! on a fresh machine.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the tracer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything a fresh Debian 12 machine lacks (idempotent).
    Setup,
    /// Set up, then run every test: formatting, clippy, unit and integration tests (loads the
    /// probes into this kernel, so it needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and start the agent tracing this host.
    Run {
        /// Arguments for `tracer agent` (default: print spans to stdout).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\x1b[1m[xtask]\x1b[0m {cmd:?}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    run(Command::new("bash").arg("scripts/setup.sh"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
            run(Command::new("cargo").args([
                "clippy",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The probes build for bpfel-unknown-none with nightly: lint them there.
            run(Command::new("cargo")
                .args(["+nightly", "clippy", "--release", "--", "-D", "warnings"])
                .current_dir(root().join("tracer-ebpf")))?;
            // One test binary at a time: each integration test loads its own probes and starts
            // real servers; running them in parallel on 2 cores makes timings noisy.
            run(Command::new("cargo")
                .args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "tracer-ebpf",
                    "--",
                    "--test-threads=1",
                ])
                .args(&args))
        }
        Cmd::Run { args } => {
            setup()?;
            run(Command::new("cargo").args(["build", "--release", "-p", "tracer-user"]))?;
            let args = if args.is_empty() {
                vec!["--stdout".to_string()]
            } else {
                args
            };
            run(Command::new(root().join("target/release/tracer"))
                .arg("agent")
                .args(&args))
        }
    }
}
