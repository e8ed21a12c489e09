use which::which;

/// Rebuild the probes when bpf-linker changes: a new linker can change the object it emits.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
