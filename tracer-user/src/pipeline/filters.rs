//! Which connections the agent follows: by process, cgroup, port, and never the collector's.
use std::net::SocketAddr;

use crate::resource::ProcessFacts;

pub struct Filters {
    pub(crate) pids: Vec<u32>,
    pub(crate) executables: Vec<String>,
    pub(crate) cgroups: Vec<String>,
    pub(crate) ports: Vec<u16>,
    /// The collector we export to: its traffic is never traced, at either end, or every export
    /// would create spans that are exported in turn.
    pub(crate) export_addrs: Vec<SocketAddr>,
}

impl Filters {
    /// Only connections with one of `ports` at either end (`tracer replay --port`).
    pub fn only_ports(ports: Vec<u16>) -> Self {
        Filters {
            pids: Vec::new(),
            executables: Vec::new(),
            cgroups: Vec::new(),
            ports,
            export_addrs: Vec::new(),
        }
    }

    pub(crate) fn wants(&self, p: &ProcessFacts, local: SocketAddr, remote: SocketAddr) -> bool {
        if self
            .export_addrs
            .iter()
            .any(|a| same_endpoint(*a, remote) || same_endpoint(*a, local))
        {
            return false;
        }
        self.wants_process(p)
            && (self.ports.is_empty()
                || self.ports.contains(&local.port())
                || self.ports.contains(&remote.port()))
    }

    fn wants_process(&self, p: &ProcessFacts) -> bool {
        (self.pids.is_empty() || self.pids.contains(&p.pid))
            && (self.executables.is_empty() || self.executables.contains(&p.executable_name))
            && (self.cgroups.is_empty()
                || self.cgroups.iter().any(|c| p.cgroup.contains(c.as_str())))
    }

    /// `wants` for exchanges counted in the kernel (`--metrics-only`), known by their process
    /// and the server's port only: the export endpoints are left out by port, `--port` matches
    /// the server's.
    pub(crate) fn wants_port(&self, p: &ProcessFacts, port: u16) -> bool {
        !self.export_addrs.iter().any(|a| a.port() == port)
            && self.wants_process(p)
            && (self.ports.is_empty() || self.ports.contains(&port))
    }
}

/// Loopback and wildcard addresses of one port count as the same endpoint.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.ip().is_loopback() && b.ip().is_loopback())
            || a.ip().is_unspecified())
}
