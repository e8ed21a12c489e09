//! Loading the kernel probes: pre-flight checks with messages a user can act on, load with the
//! kernel's offsets, attach, and access to the maps the agent shares with the probes.
use std::path::Path;

use anyhow::{bail, Context as _};
use aya::{
    maps::{
        lpm_trie::Key, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, ProgramArray,
        SockHash,
    },
    programs::{CgroupAttachMode, ProgramError, SkMsg, SockOps, TracePoint},
    Ebpf, EbpfLoader,
};
use tracer_common::{conn_key, counter, ConnState, KernelOffsets};

use crate::ring::Ring;

/// The probes, built by build.rs from `tracer-ebpf`.
static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// The context injector's sock_ops half (`tracer-ebpf/src/outgoing.rs`): an object of its
/// own, loaded only with `--inject-context`, since its sockhash needs CAP_NET_ADMIN.
static OUTGOING_PROBES: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-outgoing"));

/// Every tracepoint we attach, in the `syscalls` category (stable since Linux 4.x). Reads need
/// only their exit; writes also their entry, for the time a request starts.
pub const TRACEPOINTS: &[&str] = &[
    "sys_exit_read",
    "sys_exit_readv",
    "sys_exit_recvfrom",
    "sys_exit_recvmsg",
    "sys_exit_recvmmsg",
    "sys_enter_write",
    "sys_exit_write",
    "sys_enter_writev",
    "sys_exit_writev",
    "sys_enter_sendto",
    "sys_exit_sendto",
    "sys_enter_sendmsg",
    "sys_exit_sendmsg",
    "sys_enter_sendmmsg",
    "sys_exit_sendmmsg",
    "sys_enter_sendfile64",
    "sys_exit_sendfile64",
    "sys_exit_connect",
    "sys_exit_accept",
    "sys_exit_accept4",
    "sys_enter_close",
    "sys_exit_dup2",
    "sys_exit_dup3",
];

pub const TRACEFS: &str = "/sys/kernel/tracing";
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_SYS_ADMIN: u32 = 21;

/// Options that shape the maps before they are created.
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    pub max_connections: u32,
    /// Trace only sockets of this network namespace (inode number); 0 for all.
    pub netns: u32,
    /// `--inject-context`: insert `traceparent` into outgoing HTTP/1 requests.
    pub inject: Option<InjectOptions>,
    /// Read TLS plaintext through uprobes on the TLS libraries (`--no-tls` turns it off).
    pub tls: bool,
    /// `--metrics-only`: HTTP/1 exchanges counted in the kernel, not recorded.
    pub metrics_only: bool,
    /// `--sample-in-kernel`: HTTP/1 exchanges counted in the kernel, and this share of them
    /// recorded too.
    pub sample_in_kernel: Option<f64>,
    /// With `sample_in_kernel`: carry calls' decisions to other hosts in a TCP option. See
    /// tracer-ebpf's `carry.rs`.
    pub carry_decisions: Option<CarryOptions>,
}

/// Where `--sample-in-kernel`'s TCP option is exchanged.
pub struct CarryOptions {
    /// The cookie of the namespace whose connections carry it; 0 for all.
    pub netns_cookie: u64,
    /// The remote networks it is written for and read from; `None` for every address.
    pub networks: Option<Vec<(std::net::IpAddr, u8)>>,
}

/// What the context injector needs to know (see tracer-ebpf's `inject.rs`).
pub struct InjectOptions {
    /// The cookie of the namespace whose outgoing connections may be changed; 0 for all.
    pub netns_cookie: u64,
    /// Whose incoming context is carried on: 0 nobody, 1 everybody, 2 `trusted` only.
    pub trust: u32,
    pub trusted: Vec<(std::net::IpAddr, u8)>,
}

/// Where the injector's sock_ops program is attached: the root of the cgroup v2 hierarchy, so
/// that it sees every process's connections.
pub fn cgroup2_root() -> anyhow::Result<std::path::PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| std::path::PathBuf::from(path))
        })
        .context(
            "--inject-context needs the cgroup v2 hierarchy mounted (its sock_ops program is \
             attached there), and none is: mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) \
             or run without --inject-context",
        )
}

/// The loaded, attached probes. Dropping it detaches every program.
pub struct Probes {
    ebpf: Ebpf,
    /// The injector's sock_ops object (`--inject-context`), attached while it lives.
    #[allow(dead_code)]
    outgoing: Option<Ebpf>,
    pub attached: usize,
    /// The TLS libraries with uprobes (none without TLS tracing).
    pub tls: Option<crate::tls::TlsLibraries>,
}

/// Checks what the probes need and says what to do about anything missing.
pub fn preflight() -> anyhow::Result<()> {
    check_privileges()?;
    ensure_tracefs()?;
    if !Path::new(BTF_PATH).exists() {
        bail!(
            "this kernel exposes no BTF at {BTF_PATH}: the agent reads kernel structure offsets from it.\n\
             Use a kernel built with CONFIG_DEBUG_INFO_BTF=y (default on most distributions since 2020)."
        );
    }
    if !cfg!(target_arch = "x86_64") {
        bail!(
            "the probes read syscall arguments from x86-64 registers; this agent was built for {}.",
            std::env::consts::ARCH
        );
    }
    if let Some((major, minor)) = kernel_version() {
        if (major, minor) < (5, 15) {
            bail!(
                "this kernel ({}) is older than Linux 5.15: the probes need bpf_task_pt_regs \
                 (5.15) and the BPF ring buffer (5.8).",
                kernel_release()
            );
        }
    }
    let events = Path::new(TRACEFS).join("events").join("syscalls");
    for name in TRACEPOINTS {
        if !events.join(name).exists() {
            bail!(
                "the tracepoint syscalls:{name} does not exist on this kernel ({}).\n\
                 Syscall tracepoints need CONFIG_FTRACE_SYSCALLS=y.",
                kernel_release()
            );
        }
    }
    Ok(())
}

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

pub fn check_privileges() -> anyhow::Result<()> {
    let caps = effective_capabilities().unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    bail!(
        "the agent needs privileges to load eBPF programs (running as uid {euid} with capabilities {caps:#x}).\n\
         Run it as root (sudo tracer agent ...) or grant CAP_BPF and CAP_PERFMON:\n\
         \x20 sudo setcap cap_bpf,cap_perfmon,cap_dac_read_search+ep $(command -v tracer)"
    )
}

/// tracefs is where tracepoints are attached by name. Mount it if it is missing.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    log::info!("tracefs is not mounted; mounting it at {TRACEFS}");
    let src = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}).\n\
             Mount it yourself: sudo mount -t tracefs nodev {TRACEFS}"
        );
    }
    Ok(())
}

/// (major, minor) of the running kernel, if its release string starts with them.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = kernel_release();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".into())
}

/// Loads a program, turning a verifier rejection into a message with the log's end.
pub(crate) fn verified<T>(name: &str, r: Result<T, ProgramError>) -> anyhow::Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => bail!(
            "the kernel verifier rejected the probe {name} ({io_error}) on {}.\n\
             Last lines of the verifier log:\n{}",
            kernel_release(),
            verifier_tail(&verifier_log.to_string(), 25)
        ),
        Err(e) => Err(e).with_context(|| format!("loading the probe {name}")),
    }
}

/// How to grant what `--inject-context` needs.
const NET_ADMIN_HOW: &str = "Run it as root, or grant the capability (the packaged service: \
     `systemctl edit tracer-agent`, then under [Service] add AmbientCapabilities=CAP_NET_ADMIN \
     and CapabilityBoundingSet=CAP_NET_ADMIN).";

/// Whether this process may load sk_msg and sock_ops programs and make a sockhash: the kernel
/// asks for CAP_NET_ADMIN or CAP_SYS_ADMIN (`bpf_net_capable`).
fn net_admin_capable() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    match effective {
        Some(caps) => caps & (1 << CAP_NET_ADMIN | 1 << CAP_SYS_ADMIN) != 0,
        // Unreadable: let the kernel decide.
        None => true,
    }
}

/// Loads and attaches the context injector: sock_ops on the cgroup v2 root puts outgoing
/// connections into `OUTGOING`, sk_msg on that map inserts the header. Returns the programs
/// attached.
fn attach_injector(ebpf: &mut Ebpf, inject: &InjectOptions) -> anyhow::Result<(usize, Ebpf)> {
    // Checked first: the kernel refuses the sk_msg programs with a bare EPERM, which read as a
    // verifier rejection.
    if !net_admin_capable() {
        bail!("--inject-context needs CAP_NET_ADMIN besides what the agent needs otherwise. {NET_ADMIN_HOW}");
    }
    fill_networks(ebpf, "TRUSTED_NETS", &inject.trusted)?;
    // The injector's second half, reached by tail call (see tracer-ebpf's inject.rs).
    let finish: &mut SkMsg = ebpf
        .program_mut("inject_finish")
        .context("program inject_finish missing from the probes object")?
        .try_into()?;
    verified("inject_finish", finish.load())?;
    let finish_fd = finish.fd()?.try_clone()?;
    let mut jump: ProgramArray<_> = ebpf
        .map_mut("JUMP")
        .context("JUMP map missing")?
        .try_into()?;
    jump.set(0, &finish_fd, 0).context("filling JUMP")?;
    let mut outgoing_ebpf = EbpfLoader::new()
        .override_global("INJECT_NETNS_COOKIE", &inject.netns_cookie, true)
        .load(OUTGOING_PROBES)
        .map_err(|e| {
            anyhow::anyhow!(
                "--inject-context: creating the sockhash failed ({e}); it needs CAP_NET_ADMIN \
                 besides what the agent needs otherwise. {NET_ADMIN_HOW}"
            )
        })?;
    let map = outgoing_ebpf
        .map("OUTGOING")
        .context("OUTGOING map missing")?;
    // Keyed by the endpoints (`FlowKey` in the probes: 48 bytes).
    let outgoing: SockHash<_, [u8; 48]> = map.try_into()?;
    let outgoing_fd = outgoing
        .fd()
        .try_clone()
        .context("duplicating OUTGOING's fd")?;
    let msg: &mut SkMsg = ebpf
        .program_mut("inject_context")
        .context("program inject_context missing from the probes object")?
        .try_into()?;
    verified("inject_context", msg.load())?;
    msg.attach(&outgoing_fd)
        .context("attaching inject_context to the OUTGOING sockhash")?;
    attach_sock_ops(&mut outgoing_ebpf, "track_outgoing")?;
    Ok((2, outgoing_ebpf))
}

/// Loads the sock_ops program `name` of `ebpf` and attaches it to the cgroup v2 root, where it
/// sees every process's connections.
fn attach_sock_ops(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let root = cgroup2_root()?;
    let cgroup = std::fs::File::open(&root)
        .with_context(|| format!("opening the cgroup v2 root {}", root.display()))?;
    let ops: &mut SockOps = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the probes object"))?
        .try_into()?;
    verified(name, ops.load())?;
    // A bpf link: flags must be 0 (links to one cgroup never exclude each other), so
    // "Single" here still lets several agents (one per namespace) attach.
    ops.attach(&cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("attaching {name} to the cgroup {}", root.display()))?;
    Ok(())
}

/// Fills one of the probes' network tries (key: the address family in the first 32 bits, then
/// the address, IPv4 in its first 4 bytes).
fn fill_networks(
    ebpf: &mut Ebpf,
    name: &str,
    networks: &[(std::net::IpAddr, u8)],
) -> anyhow::Result<()> {
    if networks.is_empty() {
        return Ok(());
    }
    let mut trie: LpmTrie<_, [u8; 20], u8> = ebpf
        .map_mut(name)
        .with_context(|| format!("{name} map missing"))?
        .try_into()?;
    for &(ip, bits) in networks {
        let mut data = [0u8; 20];
        let (family, addr_bits) = match ip {
            std::net::IpAddr::V4(v4) => {
                data[4..8].copy_from_slice(&v4.octets());
                (libc::AF_INET as u8, 32)
            }
            std::net::IpAddr::V6(v6) => {
                data[4..20].copy_from_slice(&v6.octets());
                (libc::AF_INET6 as u8, 128)
            }
        };
        data[0] = family;
        let bits = u32::from(bits).min(addr_bits);
        trie.insert(&Key::new(32 + bits, data), 1, 0)
            .with_context(|| format!("filling {name}"))?;
    }
    Ok(())
}

/// Attaches `carry_decisions` (sock_ops, tracer-ebpf's `carry.rs`); `networks` are those it
/// exchanges the option with (empty with `CARRY_EVERYWHERE`).
fn attach_carrier(ebpf: &mut Ebpf, networks: &[(std::net::IpAddr, u8)]) -> anyhow::Result<()> {
    fill_networks(ebpf, "CARRY_NETS", networks)?;
    attach_sock_ops(ebpf, "carry_decisions")
}

/// The last lines of a verifier log: the rejection reason is at the end.
fn verifier_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Probes {
    pub fn load(offsets: &KernelOffsets, opts: &LoadOptions) -> anyhow::Result<Probes> {
        let agent_tgid = std::process::id();
        let inject = u32::from(opts.inject.is_some());
        let trust = opts.inject.as_ref().map_or(0, |i| i.trust);
        let red_in_kernel = opts.metrics_only || opts.sample_in_kernel.is_some();
        let sample_in_kernel = u32::from(opts.sample_in_kernel.is_some());
        // A 32-bit hash is kept below this; `as` saturates a share above 1.
        let keep_below = (opts.sample_in_kernel.unwrap_or(0.0) * 2f64.powi(32)) as u64;
        // Decided before the maps are made (the flag is read-only data): the capability is
        // what the attach below needs; a failure after this check only warns.
        let carry_netns = opts.carry_decisions.as_ref().map_or(0, |c| c.netns_cookie);
        let carry_everywhere = opts
            .carry_decisions
            .as_ref()
            .map_or(0, |c| u32::from(c.networks.is_none()));
        let carry = u32::from(
            opts.sample_in_kernel.is_some() && opts.carry_decisions.is_some() && {
                let capable = net_admin_capable();
                if !capable {
                    log::warn!(
                        "--sample-in-kernel: decisions are not carried to other hosts (the TCP \
                         option needs CAP_NET_ADMIN); each host decides its part of a trace \
                         alone. {NET_ADMIN_HOW}"
                    );
                }
                capable
            },
        );
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", offsets, true)
            .override_global("AGENT_TGID", &agent_tgid, true)
            .override_global("NETNS_FILTER", &opts.netns, true)
            .override_global("INJECT", &inject, true)
            .override_global("TRUST_CONTEXT", &trust, true)
            .override_global("TLS", &u32::from(opts.tls), true)
            .override_global("RED_IN_KERNEL", &u32::from(red_in_kernel), true)
            .override_global("SAMPLE_IN_KERNEL", &sample_in_kernel, true)
            .override_global("KEEP_BELOW", &keep_below, true)
            .override_global("CARRY_DECISIONS", &carry, true)
            .override_global("CARRY_NETNS_COOKIE", &carry_netns, true)
            .override_global("CARRY_EVERYWHERE", &carry_everywhere, true)
            .map_max_entries("EVENTS", opts.ring_buffer_bytes)
            .map_max_entries("CONNS", opts.max_connections)
            .load(PROBES)
            .context("creating the probes' maps failed")?;
        let mut attached = 0;
        for name in TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the probes object"))?
                .try_into()?;
            if let Err(e) = program.load() {
                if let ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } = &e
                {
                    bail!(
                        "the kernel verifier rejected the probe {name} ({io_error}) on {}.\n\
                         Last lines of the verifier log:\n{}",
                        kernel_release(),
                        verifier_tail(&verifier_log.to_string(), 25)
                    );
                }
                return Err(e).with_context(|| format!("loading the probe {name}"));
            }
            program
                .attach("syscalls", name)
                .with_context(|| format!("attaching to the tracepoint syscalls:{name}"))?;
            attached += 1;
        }
        if let (1, Some(c)) = (carry, &opts.carry_decisions) {
            match attach_carrier(&mut ebpf, c.networks.as_deref().unwrap_or_default()) {
                Ok(()) => attached += 1,
                Err(e) => log::warn!(
                    "--sample-in-kernel: decisions are not carried to other hosts, each host \
                     decides its part of a trace alone: {e:#}"
                ),
            }
        }
        let mut outgoing = None;
        if let Some(inject) = &opts.inject {
            let (n, object) = attach_injector(&mut ebpf, inject)?;
            attached += n;
            outgoing = Some(object);
        }
        let tls = if opts.tls {
            crate::tls::TlsLibraries::load(&mut ebpf)?;
            let mut libraries = crate::tls::TlsLibraries::default();
            libraries.rescan(&mut ebpf);
            Some(libraries)
        } else {
            None
        };
        Ok(Probes {
            ebpf,
            outgoing,
            attached,
            tls,
        })
    }

    /// Attaches the TLS uprobes to libraries that appeared since the last look (new
    /// containers, programs with their own libssl).
    pub fn rescan_tls(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.rescan(&mut self.ebpf);
        }
    }

    /// Each program's instructions processed by the verifier (Linux 5.16+; none before), the
    /// measure of how close a program is to the verifier's limits.
    pub fn verified_instructions(&self) -> Vec<(&'static str, u32)> {
        TRACEPOINTS
            .iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((*name, info.verified_instruction_count()?))
            })
            .collect()
    }

    /// The ring buffer the probes write records to (can be taken once).
    pub fn take_ring_buffer(&mut self) -> anyhow::Result<Ring> {
        match self.ebpf.take_map("EVENTS").context("EVENTS map missing")? {
            Map::RingBuf(data) => Ring::new(data),
            _ => anyhow::bail!("EVENTS is not a ring buffer map"),
        }
    }

    /// A handle to read the per-CPU counters (can be taken once).
    pub fn take_counters(&mut self) -> anyhow::Result<Counters> {
        let map = self
            .ebpf
            .take_map("COUNTERS")
            .context("COUNTERS map missing")?;
        Ok(Counters(PerCpuArray::try_from(map)?))
    }

    /// The counts of `--metrics-only` and `--sample-in-kernel` (can be taken once).
    pub fn take_kernel_red(&mut self) -> anyhow::Result<crate::kernel_red::KernelRed> {
        let counts = self.ebpf.take_map("RED").context("RED map missing")?;
        let paths = self.ebpf.take_map("PATHS").context("PATHS map missing")?;
        let serving = self
            .ebpf
            .take_map("SERVING")
            .context("SERVING map missing")?;
        Ok(crate::kernel_red::KernelRed::new(
            PerCpuHashMap::try_from(counts)?,
            HashMap::try_from(paths)?,
            HashMap::try_from(serving)?,
        ))
    }

    /// A handle to the connection table, to mute connections (can be taken once).
    pub fn take_connections(&mut self) -> anyhow::Result<Connections> {
        let map = self.ebpf.take_map("CONNS").context("CONNS map missing")?;
        Ok(Connections(HashMap::try_from(map)?))
    }
}

pub struct Counters(PerCpuArray<MapData, u64>);

/// Sums of the probes' per-CPU counters, indexed by `tracer_common::counter::*`.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelCounters(pub [u64; counter::COUNT as usize]);

impl KernelCounters {
    pub fn get(&self, which: u32) -> u64 {
        self.0[which as usize]
    }
}

impl Counters {
    pub fn read(&self) -> KernelCounters {
        let mut out = KernelCounters::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            if let Ok(values) = self.0.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

pub struct Connections(HashMap<MapData, u64, ConnState>);

impl Connections {
    /// The probes' state of a connection, if `fd` of `tgid` still is that connection.
    pub fn get(&self, tgid: u32, fd: u32, conn_id: u64) -> Option<ConnState> {
        let state = self.0.get(&conn_key(tgid, fd), 0).ok()?;
        (state.conn_id == conn_id).then_some(state)
    }

    /// Tells the probes to stop sending records for this connection: the syscalls' (`tls`
    /// false) or the TLS library's plaintext (`tls` true), which are two streams to the agent.
    pub fn mute(&mut self, tgid: u32, fd: u32, conn_id: u64, tls: bool) {
        let key = conn_key(tgid, fd);
        if let Ok(mut state) = self.0.get(&key, 0) {
            // The fd may have been reused by a newer connection since: leave that one alone.
            if state.conn_id != conn_id {
                return;
            }
            let flag = if tls {
                &mut state.tls_muted
            } else {
                &mut state.muted
            };
            if *flag == 0 {
                *flag = 1;
                let _ = self.0.insert(key, state, 0);
            }
        }
    }
}
