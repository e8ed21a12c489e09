//! Builds the kernel probes (`tracer-ebpf`) with the nightly toolchain and bpf-linker, so that
//! `cargo build` of the agent always embeds probes that match its `tracer-common` types.
//! `AYA_BUILD_SKIP=1` skips it (clippy-only runs); `scripts/setup.sh` installs what it needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tracer-user has no parent directory")?
        .join("tracer-ebpf");
    // aya_build watches the probes' crate only; the record layouts they share live in
    // tracer-common, and a change there left stale probes embedded.
    println!(
        "cargo:rerun-if-changed={}",
        root.with_file_name("tracer-common").join("src").display()
    );
    let ebpf = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: root.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()).context(
        "building the eBPF probes failed; run `scripts/setup.sh` (installs bpf-linker and nightly rust-src)",
    )
}
