//! "Hosts" on one machine: one network namespace each, joined by veth pairs to a Linux bridge
//! in the root namespace, with addresses from 10.201.0.0/16 only. Programs run inside with
//! `ip netns exec`; the agents stay in the root namespace and pick a host by its namespace file.
//!
//! Names carry this process's pid (`tsn-<pid>-<run>-<host>` for namespaces, `tsn<pid in hex>...`
//! for links, which may hold 15 characters), so parallel test processes never collide, and the
//! leftovers of a killed run are recognised by their dead pid and removed by the next one.
use std::{
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// One namespace "host": its name in the test, its namespace, its address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// The namespace file an agent's `--netns` takes.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// `program` to be run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Opens a TCP connection from inside this host's namespace (a thread that enters it), to
    /// check that a server listens without sending it anything a tracer would see.
    pub fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let path = self.netns_path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on a namespace fd we hold; it changes only this (short-lived) thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&to, Duration::from_secs(1))
        })
        .join()
        .expect("the connecting thread panicked")
    }

    /// Waits until something listens on `to`, as seen from this host.
    pub fn wait_listening(&self, to: SocketAddr, what: &str) {
        crate::wait_for(what, Duration::from_secs(15), || self.connect(to).is_ok());
    }
}

/// A set of hosts on one bridge, removed when dropped.
#[derive(Debug)]
pub struct Hosts {
    pub hosts: Vec<Host>,
    bridge: String,
    /// The root-namespace ends of the veth pairs.
    veths: Vec<String>,
}

static RUNS: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the `ip` command (iproute2; run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and links of earlier runs whose process is gone.
fn remove_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("tsn-") else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse().ok());
            if pid.is_some_and(|p| !pid_alive(p)) {
                ip_quiet(&["netns", "del", name]);
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "12: tsn1a2bb0: <...": the name ends at ':' or '@' (a veth names its peer).
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            let Some(rest) = name.strip_prefix("tsn") else {
                continue;
            };
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            // The hex pid ends at 'x' (bridge), 'v' or 'p' (veth ends), none of them hex.
            let pid = u32::from_str_radix(&hex, 16).ok();
            if pid.is_some_and(|p| !pid_alive(p)) {
                ip_quiet(&["link", "del", name]);
            }
        }
    }
}

impl Hosts {
    /// Creates one host per name, addressed 10.201.R.1, .2, ... in the order given, with
    /// loopback up. Needs root.
    pub fn create(names: &[&str]) -> Hosts {
        crate::require_root();
        assert!(
            !names.is_empty() && names.len() < 250,
            "1 to 249 hosts, not {}",
            names.len()
        );
        remove_stale();
        let pid = std::process::id();
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        // Each run has a bridge of its own, so equal subnets in two runs would not meet; the
        // octet differs anyway so that addresses in spans tell runs apart.
        let octet = (pid.wrapping_add(run.wrapping_mul(37)) % 250) as u8 + 1;
        let bridge = format!("tsn{pid:x}x{run}");
        assert!(bridge.len() <= 15, "interface name {bridge} too long");
        let mut hosts = Hosts {
            hosts: Vec::new(),
            bridge: bridge.clone(),
            veths: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, name) in names.iter().enumerate() {
            let host = Host {
                name: (*name).to_owned(),
                netns: format!("tsn-{pid}-{run}-{name}"),
                ip: Ipv4Addr::new(10, 201, octet, i as u8 + 1),
            };
            let (veth, peer) = (
                format!("tsn{pid:x}v{run}h{i}"),
                format!("tsn{pid:x}p{run}h{i}"),
            );
            assert!(veth.len() <= 15, "interface name {veth} too long");
            ip(&["netns", "add", &host.netns]);
            // Pushed before it is complete: a failure below still removes what exists.
            hosts.hosts.push(host.clone());
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            hosts.veths.push(veth.clone());
            ip(&["link", "set", &veth, "master", &bridge]);
            ip(&["link", "set", &veth, "up"]);
            ip(&["link", "set", &peer, "netns", &host.netns]);
            let ns = host.netns.as_str();
            ip(&["-n", ns, "link", "set", &peer, "name", "eth0"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?}"))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // A namespace's veth ends go when the kernel tears it down, later, in the background;
        // deleting a pair from this side is immediate.
        for v in &self.veths {
            ip_quiet(&["link", "del", v]);
        }
        for h in &self.hosts {
            ip_quiet(&["netns", "del", &h.netns]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    fn netns_names() -> String {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Two hosts reach each other over the bridge by their own addresses, not over loopback
    /// (each has its own), and everything is gone after drop.
    #[test]
    fn hosts_talk_over_the_bridge_and_vanish_on_drop() {
        let hosts = Hosts::create(&["a", "b"]);
        let (a, b) = (hosts.host("a").clone(), hosts.host("b").clone());
        assert_ne!(a.ip, b.ip);
        let to = SocketAddr::from((b.ip, 7070));
        let path = b.netns_path();
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: as in Host::connect, only this thread changes namespace.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let l = std::net::TcpListener::bind(to).unwrap();
            tx.send(()).unwrap();
            let (mut c, peer) = l.accept().unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            (peer, buf)
        });
        rx.recv().unwrap();
        let mut c = a.connect(to).expect("a reaches b");
        c.write_all(b"hello").unwrap();
        let (peer, got) = server.join().unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(a.ip),
            "b sees a's own address"
        );
        // Programs run inside: `ip netns exec` shows the host's address.
        let out = a
            .command("ip")
            .args(["-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&a.ip.to_string()));
        let names = [a.netns.clone(), b.netns.clone()];
        assert!(names.iter().all(|n| netns_names().contains(n.as_str())));
        drop(hosts);
        let left = netns_names();
        assert!(
            names.iter().all(|n| !left.contains(n.as_str())),
            "left: {left}"
        );
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        let prefix = format!("tsn{:x}", std::process::id());
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        assert!(
            !links.lines().any(|l| l.contains(&format!(": {prefix}"))),
            "links left: {links}"
        );
    }
}
