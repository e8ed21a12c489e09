//! Helpers shared by the integration tests of the agent and of the collector, and by
//! `cargo xtask traces`. Test-only: a dev-dependency of the crates and a dependency of xtask,
//! never linked into a shipped binary.
pub mod netns;
pub mod topology;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

/// Tests that load eBPF programs cannot mean anything without root, so they fail (never skip)
/// and say why.
/// The collector binary beside the test's `tracer` (`CARGO_BIN_EXE_tracer`), built with the
/// same profile first if it is not there (a `cargo test -p tracer-user` builds only the agent).
pub fn collector_beside(tracer: &Path) -> PathBuf {
    let profile_dir = tracer.parent().expect("the tracer binary's directory");
    let bin = profile_dir.join("tracer-collector");
    if bin.exists() {
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "-p", "tracer-collector", "--target-dir"])
        .arg(profile_dir.parent().expect("the target directory"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo to build tracer-collector");
    assert!(status.success(), "building tracer-collector failed");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs into the kernel and must run as root (try: sudo -E cargo test)"
    );
}

/// A port nothing listens on right now, below the kernel's ephemeral range (32768–60999 by
/// default). A port the OS picks for `:0` comes from that range, so between this call and the
/// server's bind an outgoing connection of another test could take it (it happened: a receiver
/// failed to bind). Each test process walks its own stretch of 20000–32767, starting at a
/// place set by its pid, so test binaries running side by side rarely try the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 32_768 - LOW;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {LOW}..32768 on 127.0.0.1");
}

/// A fresh, empty directory for this test process: `tracer-test-<name>-<pid>` in the temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracer-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for `cond` to hold, polling, or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process stopped when dropped: SIGTERM first so servers and the agent shut down
/// cleanly, SIGKILL after 5 s.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// xorshift64*: a deterministic generator for benches and randomised tests, so that runs
/// compare and a failure can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (slightly biased; good enough here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index into something `len` long.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}
