//! Finding the TLS libraries processes use and attaching the plaintext uprobes to them
//! (`tracer-ebpf/src/tls.rs` has the probes).
//!
//! A uprobe is set on a file, so it fires in every process that maps that file, including
//! processes started later: each library file (by device and inode) is attached once. Files are
//! found in the standard system path and in `/proc/PID/maps` of running processes (a
//! container's own libssl is a different file, reached through `/proc/PID/root`); `rescan`
//! repeats the search for libraries that appear later.
//!
//! Covered: OpenSSL 1.1 and 3 linked dynamically (`libssl.so.*`): nginx, curl, Python's `ssl`,
//! Node.js built against the system OpenSSL, anything using libssl. Not covered: statically
//! linked OpenSSL or BoringSSL (Node's bundled build, Envoy, many Go and Rust binaries), Go's
//! `crypto/tls`, rustls, GnuTLS, NSS, Java's JSSE: their connections show as TLS and are muted
//! (`tracer_connections_muted_total`), never parsed as garbage.
use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    programs::{uprobe::UProbeScope, UProbe},
    Ebpf,
};

/// (program, library function) pairs attached to every libssl found.
const PROBES: &[(&str, &str)] = &[
    ("ssl_write", "SSL_write"),
    ("ssl_write_ret", "SSL_write"),
    ("ssl_write_ex", "SSL_write_ex"),
    ("ssl_write_ret", "SSL_write_ex"),
    ("ssl_read", "SSL_read"),
    ("ssl_read_ret", "SSL_read"),
    ("ssl_read_ex", "SSL_read_ex"),
    ("ssl_read_ret", "SSL_read_ex"),
    ("ssl_handshake", "SSL_do_handshake"),
    ("ssl_handshake_ret", "SSL_do_handshake"),
    ("ssl_handshake", "SSL_accept"),
    ("ssl_handshake_ret", "SSL_accept"),
    ("ssl_handshake", "SSL_connect"),
    ("ssl_handshake_ret", "SSL_connect"),
];

/// Where distributions keep the system libssl: attached even before a process maps it.
const SYSTEM_LIBRARIES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/lib/x86_64-linux-gnu/libssl.so.3",
];

/// The TLS libraries attached so far.
#[derive(Default)]
pub struct TlsLibraries {
    /// (device, inode) of each library file attached.
    seen: HashSet<(u64, u64)>,
    pub attached: Vec<PathBuf>,
}

impl TlsLibraries {
    /// Loads the uprobe programs (once).
    pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let mut names: Vec<&str> = PROBES.iter().map(|(p, _)| *p).collect();
        names.dedup();
        let mut loaded = HashSet::new();
        for name in names {
            if !loaded.insert(name) {
                continue;
            }
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow::anyhow!("program {name} missing from the probes object"))?
                .try_into()?;
            crate::probes::verified(name, program.load())?;
        }
        Ok(())
    }

    /// Attaches to the libraries not attached yet; returns how many were added.
    pub fn rescan(&mut self, ebpf: &mut Ebpf) -> usize {
        let mut added = 0;
        for path in candidates() {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !self.seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            match attach(ebpf, &path) {
                Ok(()) => {
                    log::info!("TLS: uprobes on {}", path.display());
                    self.attached.push(path);
                    added += 1;
                }
                Err(e) => log::warn!("TLS: not traced through {}: {e:#}", path.display()),
            }
        }
        added
    }
}

fn attach(ebpf: &mut Ebpf, path: &Path) -> anyhow::Result<()> {
    for (name, function) in PROBES {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow::anyhow!("program {name} missing"))?
            .try_into()?;
        program
            .attach(*function, path, UProbeScope::AllProcesses)
            .map_err(|e| anyhow::anyhow!("{function}: {e}"))?;
    }
    Ok(())
}

/// libssl files: the system ones, and every one a running process maps (through its root, so
/// a container's file is reached from here).
fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = SYSTEM_LIBRARIES
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for line in maps.lines() {
            let Some(path) = line.split_whitespace().nth(5) else {
                continue;
            };
            let file = path.rsplit('/').next().unwrap_or("");
            if file.starts_with("libssl.so") {
                out.push(PathBuf::from(format!("/proc/{pid}/root{path}")));
            }
        }
    }
    out
}
