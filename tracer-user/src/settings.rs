//! Agent settings: command-line flags (with the standard OTEL_* variables as fallbacks), then an
//! optional TOML config file, then defaults. The first that says something wins.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::{
    context::Trust,
    export::{self, ExportConfig, Protocol as ExportProtocol},
    protocol::{Protocol, Protocols},
};

/// Private and shared address space: where a fleet's hosts usually are, and no server
/// outside it (`--tcp-option-networks`).
pub const DEFAULT_TCP_OPTION_NETWORKS: &str =
    "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7";

#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentArgs {
    /// TOML file with any of these settings (flags win over it).
    #[arg(long, short = 'c')]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// OTLP/HTTP base URL of the collector; spans go to <endpoint>/v1/traces.
    /// [default: http://127.0.0.1:4318]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Full URL for traces, used as is (overrides --endpoint).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub traces_endpoint: Option<String>,

    /// Extra request headers, `key=value,key2=value2` (values may be percent-encoded).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_HEADERS")]
    pub headers: Option<String>,

    /// Also export every span to this OTLP/HTTP base URL (repeatable; spans go to
    /// <url>/v1/traces), e.g. an OpenTelemetry Collector, Tempo or Jaeger beside the collector.
    /// Each endpoint has its own queue, retries and drop counters: one that is down or slow
    /// never holds back or drops the others' spans. The collector's token and headers are not
    /// sent there; see --also-export-headers.
    #[arg(long = "also-export", value_name = "URL")]
    pub also_export: Vec<String>,

    /// Request headers for the --also-export endpoints, `key=value,...` (e.g. a vendor's API
    /// key).
    #[arg(long, value_name = "HEADERS")]
    pub also_export_headers: Option<String>,

    /// Body encoding. [default: http/protobuf]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum)]
    pub protocol: Option<ExportProtocol>,

    /// `gzip` or `none` (the OTLP default). gzip costs agent CPU (~5% of it at saturation);
    /// worth it when the collector is across a slow or metered link. [default: none]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_COMPRESSION")]
    pub compression: Option<String>,

    /// Bearer token sent to the collector (`Authorization: Bearer <token>`). A command line is
    /// readable by every local user: prefer --token-file, the config file or the environment.
    #[arg(long, env = "TRACER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the bearer token from this file (its first line).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM CA certificate to trust for an https collector.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub ca_cert: Option<PathBuf>,

    /// Print one JSON span per line on stdout instead of exporting.
    #[arg(long)]
    pub stdout: bool,

    /// Only trace these process ids (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Only trace processes whose executable name is one of these (repeatable).
    #[arg(long = "exe", value_name = "NAME")]
    pub executables: Vec<String>,

    /// Only trace processes whose cgroup path contains this text (repeatable).
    #[arg(long = "cgroup", value_name = "TEXT")]
    pub cgroups: Vec<String>,

    /// Only trace connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,

    /// Protocols to read, comma-separated (`http`, `http2`, `redis`, `postgresql`, `mysql`, `dns`); a connection none of them recognises is
    /// muted (no spans, counted). [default: all of them]
    #[arg(long, value_name = "LIST")]
    pub protocols: Option<String>,

    /// Name services by rule, `exe=NAME:SERVICE`, `pid=PID:SERVICE`, `cgroup=TEXT:SERVICE` or
    /// `port=PORT:SERVICE` (a server's local port). First match wins; default: executable name.
    #[arg(long = "service-rule", value_name = "RULE")]
    pub service_rules: Vec<String>,

    /// Address of the Prometheus metrics endpoint; `off` disables it. [default: 127.0.0.1:9464]
    #[arg(long)]
    pub metrics_addr: Option<String>,

    /// Log the counters every 10 seconds.
    #[arg(long)]
    pub stats: bool,

    /// Ring buffer size in MiB (a power of two). 8 MiB holds ~150 ms of records at 20k
    /// requests/s; records that do not fit are dropped and counted. [default: 8]
    #[arg(long)]
    pub ring_buffer_mib: Option<u32>,

    /// Spans held for export at most; beyond, new spans are dropped and counted. [default: 65536]
    #[arg(long)]
    pub queue_capacity: Option<usize>,

    /// Memory the spans held for export may take, in MiB; beyond, new spans are dropped and
    /// counted. Bounds the agent's size while the collector is down or slow (nginx's spans take
    /// ~400 bytes: 16 MiB holds ~40,000). [default: 16]
    #[arg(long)]
    pub queue_mib: Option<u32>,

    /// Spans per export request (requests take whole drain batches of up to 48 KiB, so one may
    /// hold ~100 spans more). [default: 2048]
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// Longest wait before a partial batch is sent, in milliseconds. [default: 500]
    #[arg(long)]
    pub batch_timeout_ms: Option<u64>,

    /// `adaptive`: the agent runs only on otherwise idle CPU time (SCHED_IDLE) while its ring
    /// buffer has room, and at normal priority once an eighth of it is waiting, so its bursts
    /// of work do not delay the traced processes (one connection's p99 1.7 -> 0.3 ms on the
    /// bench's 2 cores). Needs CAP_SYS_NICE; without it the agent says so and runs normal.
    /// `normal`: always at the priority it was started with. [default: adaptive]
    #[arg(long, value_parser = ["normal", "adaptive"])]
    pub priority: Option<String>,

    /// Trace only sockets of this network namespace: a namespace file such as
    /// /run/netns/NAME or /proc/PID/ns/net. One agent per namespace makes each namespace (a
    /// container's, a test "host") report as its own host. [default: every namespace]
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// `host.name` of this agent's spans. [default: the machine's host name]
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,

    /// `host.id` of this agent's spans; the collector corrects clock skew per host id.
    /// [default: /etc/machine-id]
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,

    /// Whose incoming trace context (`traceparent`, B3 headers) is honoured: `all`, `none`, or
    /// a comma-separated list of CIDRs of the callers to trust (e.g. `10.0.0.0/8,127.0.0.0/8`).
    /// Context from outside the fleet can be forged to attach spans to someone else's trace.
    /// [default: all]
    #[arg(long, value_name = "WHO")]
    pub trust_context: Option<String>,

    /// Insert a W3C `traceparent` header into the HTTP/1 requests traced processes send, so
    /// that downstream services (SDK-instrumented ones too) continue the caller's trace. It
    /// changes application traffic, hence off by default: only connections opened after the
    /// agent started, only at request heads it has parsed whole, never into bodies, never
    /// where a `traceparent` already is; a connection whose framing it cannot follow (chunked
    /// or pipelined uploads, other protocols) is left alone for good. Needs the cgroup v2
    /// hierarchy. See docs/USER_GUIDE.md, "Carrying context on the wire".
    #[arg(long)]
    #[serde(default)]
    pub inject_context: bool,

    /// RED metrics only, at the lowest cost: no spans, and HTTP/1 exchanges counted in the
    /// kernel instead of recorded and parsed (the durations then end at the response's first
    /// read or write). Connections that are not plain HTTP/1 (TLS, HTTP/2, other protocols)
    /// are recorded and counted by the agent as usual. The histograms are served on
    /// `--metrics-addr`. See docs/USER_GUIDE.md, "Metrics only".
    #[arg(long, conflicts_with_all = ["sample", "inject_context"])]
    #[serde(default)]
    pub metrics_only: bool,

    /// Export the spans of this share of traces (0 to 1; default 1, every trace). The RED
    /// metrics still count every request. A trace is kept when the low 64 bits of its id fall
    /// below the share (the OpenTelemetry SDKs' TraceIdRatioBased rule), so every agent and SDK
    /// with the same share keeps the same traces: whole where the trace id travels between
    /// hosts (an SDK's `traceparent`, or `--inject-context`); otherwise each host decides its
    /// part of a trace alone. See docs/USER_GUIDE.md, "Sampling".
    #[arg(long, value_name = "SHARE")]
    pub sample: Option<f64>,

    /// Decide `--sample` in the kernel, at each plain HTTP/1 request's start, so that a dropped
    /// request costs only the probes' framing (no record, no parsing). A request is kept by a
    /// hash of its TCP sequence number, which both ends of a connection read, and a call follows
    /// the requests its process is serving; every exchange is still counted in the RED metrics.
    /// Traces through event-loop services (one process serving kept and dropped requests at
    /// once) lose links the agent would have made. Needs --sample; not with --inject-context.
    /// See docs/USER_GUIDE.md, "Sampling in the kernel".
    #[arg(long, conflicts_with_all = ["inject_context", "metrics_only"])]
    #[serde(default)]
    pub sample_in_kernel: bool,

    /// With --sample-in-kernel: do not carry a call's decision to its server on another host
    /// in a TCP option (kind 254, id 0x7472, on the segment with the request's first byte);
    /// each host then decides its part of a trace by the request's sequence number alone. For
    /// networks whose middleboxes drop segments with options they do not know. Carrying needs
    /// CAP_NET_ADMIN; without it the agent warns and each host decides alone.
    #[arg(long, requires = "sample_in_kernel")]
    #[serde(default)]
    pub no_tcp_option: bool,

    /// With --sample-in-kernel: the networks the TCP option is exchanged with, `all`, or
    /// comma-separated CIDRs: written only for servers, and read only from clients, whose
    /// address is in one (a server outside the fleet has no agent to read it, and a client
    /// outside could use it to keep its requests out of the traces).
    /// [default: 10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7]
    #[arg(long, value_name = "NETWORKS", requires = "sample_in_kernel")]
    pub tcp_option_networks: Option<String>,

    /// Do not read TLS plaintext. By default the agent puts uprobes on the OpenSSL libraries
    /// (libssl.so) processes load, and parses what `SSL_read`/`SSL_write` carry as it parses
    /// plaintext connections. See docs/USER_GUIDE.md, "TLS".
    #[arg(long)]
    #[serde(default)]
    pub no_tls: bool,

    /// Shifts every timestamp this agent reports by this many milliseconds. For testing the
    /// collector's clock-skew correction; never useful in production.
    #[arg(long, hide = true, allow_hyphen_values = true)]
    #[serde(skip)]
    pub clock_shift_ms: Option<i64>,

    /// Also append every ring-buffer record to this file, for `tracer replay` (the benchmark
    /// of the agent's own work on recorded traffic). Records hold payload prefixes, so the file
    /// is as sensitive as the traffic; it is created readable by root only.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub record: Option<PathBuf>,
}

/// Spans per export request by default: ~1 MiB requests. Against 512 (the OpenTelemetry SDKs'
/// default) this cut the collector's CPU per span by a fifth at 10k requests/s (a commit and a
/// request's handling per batch), and the agent's did not change.
const DEFAULT_BATCH_SIZE: usize = 2048;

/// Memory for spans waiting for export by default. Bounded by count alone (65,536), a full
/// queue of nginx's spans took the agent from 46 to 70 MiB at peak (collector slower than the
/// traffic, `cargo xtask bench`), past the 64 MiB budget.
const DEFAULT_QUEUE_MIB: u32 = 16;

fn vec_or<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
    if a.is_empty() {
        b
    } else {
        a
    }
}

impl AgentArgs {
    /// Fills what the flags left unset from the config file named by `--config`.
    pub fn with_config_file(self) -> anyhow::Result<AgentArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        let file: AgentArgs = toml::from_str(&text)
            .with_context(|| format!("the config file {} is not valid", path.display()))?;
        Ok(AgentArgs {
            config: self.config,
            endpoint: self.endpoint.or(file.endpoint),
            traces_endpoint: self.traces_endpoint.or(file.traces_endpoint),
            headers: self.headers.or(file.headers),
            also_export: vec_or(self.also_export, file.also_export),
            also_export_headers: self.also_export_headers.or(file.also_export_headers),
            protocol: self.protocol.or(file.protocol),
            compression: self.compression.or(file.compression),
            token: self.token.or(file.token),
            token_file: self.token_file.or(file.token_file),
            ca_cert: self.ca_cert.or(file.ca_cert),
            stdout: self.stdout || file.stdout,
            pids: vec_or(self.pids, file.pids),
            executables: vec_or(self.executables, file.executables),
            cgroups: vec_or(self.cgroups, file.cgroups),
            ports: vec_or(self.ports, file.ports),
            protocols: self.protocols.or(file.protocols),
            service_rules: vec_or(self.service_rules, file.service_rules),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            stats: self.stats || file.stats,
            ring_buffer_mib: self.ring_buffer_mib.or(file.ring_buffer_mib),
            queue_capacity: self.queue_capacity.or(file.queue_capacity),
            queue_mib: self.queue_mib.or(file.queue_mib),
            batch_size: self.batch_size.or(file.batch_size),
            batch_timeout_ms: self.batch_timeout_ms.or(file.batch_timeout_ms),
            priority: self.priority.or(file.priority),
            netns: self.netns.or(file.netns),
            host_name: self.host_name.or(file.host_name),
            host_id: self.host_id.or(file.host_id),
            trust_context: self.trust_context.or(file.trust_context),
            inject_context: self.inject_context || file.inject_context,
            metrics_only: self.metrics_only || file.metrics_only,
            sample: self.sample.or(file.sample),
            sample_in_kernel: self.sample_in_kernel || file.sample_in_kernel,
            no_tcp_option: self.no_tcp_option || file.no_tcp_option,
            tcp_option_networks: self.tcp_option_networks.or(file.tcp_option_networks),
            no_tls: self.no_tls || file.no_tls,
            clock_shift_ms: self.clock_shift_ms,
            record: self.record,
        })
    }

    /// The share of traces `--sample` keeps, checked: `None` keeps every trace.
    pub fn sample_share(&self) -> anyhow::Result<Option<f64>> {
        if self.metrics_only {
            if self.sample.is_some() || self.inject_context {
                bail!("--metrics-only exports no spans: it goes with neither --sample nor --inject-context");
            }
            return Ok(Some(0.0));
        }
        match self.sample {
            None => Ok(None),
            Some(share) if (0.0..=1.0).contains(&share) => Ok((share < 1.0).then_some(share)),
            Some(share) => bail!("--sample {share}: the share of traces to keep is from 0 to 1"),
        }
    }

    /// The share `--sample-in-kernel` has the probes keep, checked: `None` when sampling is
    /// not done in the kernel (or keeps everything).
    pub fn kernel_sample_share(&self) -> anyhow::Result<Option<f64>> {
        if !self.sample_in_kernel {
            return Ok(None);
        }
        if self.sample.is_none() {
            bail!("--sample-in-kernel needs the share to keep: add --sample SHARE");
        }
        if self.inject_context {
            bail!("--sample-in-kernel does not go with --inject-context (the injector needs every request the probes see)");
        }
        self.sample_share()
    }

    /// Where `--sample-in-kernel`'s TCP option is exchanged: `None` where it is not (without
    /// sampling in the kernel, with `--no-tcp-option` or `--tcp-option-networks none`), else
    /// the networks (`Trust::All`: every address).
    pub fn tcp_option_networks(&self) -> anyhow::Result<Option<Trust>> {
        let list = self
            .tcp_option_networks
            .as_deref()
            .unwrap_or(DEFAULT_TCP_OPTION_NETWORKS);
        let networks = Trust::parse_flag("--tcp-option-networks", list)?;
        if !self.sample_in_kernel || self.no_tcp_option || networks == Trust::Nobody {
            return Ok(None);
        }
        Ok(Some(networks))
    }

    /// The protocols `--protocols` names; all of them by default.
    pub fn protocols(&self) -> anyhow::Result<Protocols> {
        let Some(list) = &self.protocols else {
            return Ok(Protocols::all());
        };
        let mut chosen = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some(p) = Protocol::from_name(name) else {
                let known: Vec<_> = Protocol::ALL.iter().map(|p| p.name()).collect();
                bail!(
                    "--protocols: unknown protocol {name:?} (known: {})",
                    known.join(", ")
                );
            };
            chosen.push(p);
        }
        if chosen.is_empty() {
            bail!("--protocols names no protocol: the agent would trace nothing");
        }
        Ok(Protocols::of(&chosen))
    }

    pub fn export_config(&self) -> anyhow::Result<ExportConfig> {
        let url = match (&self.traces_endpoint, &self.endpoint) {
            (Some(url), _) => url.clone(),
            (None, Some(base)) => export::traces_url(base),
            (None, None) => export::traces_url("http://127.0.0.1:4318"),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("the collector endpoint {url:?} must start with http:// or https://");
        }
        let mut headers = match &self.headers {
            Some(h) => export::parse_headers(h)
                .context("invalid --headers / OTEL_EXPORTER_OTLP_HEADERS")?,
            None => Vec::new(),
        };
        let from_file = match &self.token_file {
            Some(path) => {
                if self.token.is_some() {
                    bail!("both a token and a token file are set: keep one");
                }
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?;
                let token = text.lines().next().unwrap_or("").trim().to_owned();
                if token.is_empty() {
                    bail!("the token file {} is empty", path.display());
                }
                Some(token)
            }
            None => None,
        };
        if let Some(token) = self.token.as_ref().or(from_file.as_ref()) {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        let gzip = match self.compression.as_deref().unwrap_or("none") {
            "gzip" => true,
            "none" => false,
            other => bail!("unknown compression {other:?}: use gzip or none"),
        };
        Ok(ExportConfig {
            url,
            headers,
            protocol: self.protocol.unwrap_or(ExportProtocol::HttpProtobuf),
            gzip,
            batch_size: self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE),
            batch_timeout: Duration::from_millis(self.batch_timeout_ms.unwrap_or(500)),
            queue_capacity: self.queue_capacity.unwrap_or(65536),
            queue_bytes: self.queue_mib.unwrap_or(DEFAULT_QUEUE_MIB) as usize * 1024 * 1024,
            ca_cert: self.ca_cert.clone(),
            shutdown_timeout: Duration::from_secs(5),
        })
    }

    /// The `--also-export` endpoints' settings: the collector's batching, queue and encoding,
    /// their own URL and headers.
    pub fn also_export_configs(&self, primary: &ExportConfig) -> anyhow::Result<Vec<ExportConfig>> {
        let headers = match &self.also_export_headers {
            Some(h) => export::parse_headers(h).context("invalid --also-export-headers")?,
            None => Vec::new(),
        };
        let mut configs: Vec<ExportConfig> = Vec::new();
        for base in &self.also_export {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                bail!("--also-export {base:?} must start with http:// or https://");
            }
            let url = export::traces_url(base);
            // The same endpoint twice would get every span twice.
            if url == primary.url || configs.iter().any(|c| c.url == url) {
                bail!("--also-export {base:?}: {url} is already an endpoint");
            }
            configs.push(ExportConfig {
                url,
                headers: headers.clone(),
                ..primary.clone()
            });
        }
        Ok(configs)
    }

    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.metrics_addr.as_deref().unwrap_or("127.0.0.1:9464") {
            "off" => Ok(None),
            a => Ok(Some(a.parse().with_context(|| {
                format!("--metrics-addr {a:?} is not host:port")
            })?)),
        }
    }

    pub fn adaptive_priority(&self) -> anyhow::Result<bool> {
        match self.priority.as_deref().unwrap_or("adaptive") {
            "normal" => Ok(false),
            "adaptive" => Ok(true),
            other => bail!("unknown priority {other:?}: use normal or adaptive"),
        }
    }

    pub fn ring_buffer_bytes(&self) -> anyhow::Result<u32> {
        let mib = self.ring_buffer_mib.unwrap_or(8);
        if !mib.is_power_of_two() || mib > 1024 {
            bail!("--ring-buffer-mib must be a power of two up to 1024, got {mib}");
        }
        Ok(mib * 1024 * 1024)
    }
}

/// What a service-naming rule matches on.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleMatch {
    Exe(String),
    Pid(u32),
    Cgroup(String),
    Port(u16),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceRule {
    pub matches: RuleMatch,
    pub service: String,
}

pub fn parse_service_rule(s: &str) -> anyhow::Result<ServiceRule> {
    let err =
        || format!("service rule {s:?} is not KIND=VALUE:SERVICE (KIND: exe, pid, cgroup, port)");
    let (kind, rest) = s.split_once('=').with_context(err)?;
    let (value, service) = rest.rsplit_once(':').with_context(err)?;
    if service.is_empty() {
        bail!(err());
    }
    let matches = match kind {
        "exe" => RuleMatch::Exe(value.into()),
        "pid" => RuleMatch::Pid(value.parse().with_context(err)?),
        "cgroup" => RuleMatch::Cgroup(value.into()),
        "port" => RuleMatch::Port(value.parse().with_context(err)?),
        _ => bail!(err()),
    };
    Ok(ServiceRule {
        matches,
        service: service.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_rules_parse() {
        assert_eq!(
            parse_service_rule("exe=nginx:frontend").unwrap(),
            ServiceRule {
                matches: RuleMatch::Exe("nginx".into()),
                service: "frontend".into()
            }
        );
        assert_eq!(
            parse_service_rule("port=6379:cache").unwrap().matches,
            RuleMatch::Port(6379)
        );
        assert!(parse_service_rule("port=x:cache").is_err());
        assert!(parse_service_rule("nginx").is_err());
        assert!(parse_service_rule("user=1:x").is_err());
    }

    #[test]
    fn config_file_fills_what_flags_leave_unset() {
        let dir = std::env::temp_dir().join(format!("tracer-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "endpoint = \"http://file:4318\"\nports = [80]\nprotocol = \"http/json\"\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(path.clone()),
            ports: vec![8080],
            ..Default::default()
        };
        let merged = args.with_config_file().unwrap();
        assert_eq!(merged.endpoint.as_deref(), Some("http://file:4318"));
        assert_eq!(merged.ports, vec![8080]);
        assert_eq!(
            merged.export_config().unwrap().protocol,
            ExportProtocol::HttpJson
        );
        std::fs::write(&path, "endpont = \"typo\"\n").unwrap();
        let err = AgentArgs {
            config: Some(path),
            ..Default::default()
        }
        .with_config_file()
        .unwrap_err();
        assert!(format!("{err:#}").contains("endpont"), "{err:#}");
    }

    /// `--sample-in-kernel`'s TCP option goes to private networks by default, everywhere with
    /// `all`, nowhere with `none` or `--no-tcp-option`, and a bad list names the flag.
    #[test]
    fn the_tcp_option_goes_to_private_networks_by_default() {
        let with = |no_tcp_option: bool, networks: Option<&str>| AgentArgs {
            sample: Some(0.1),
            sample_in_kernel: true,
            no_tcp_option,
            tcp_option_networks: networks.map(str::to_owned),
            ..Default::default()
        };
        let Some(Trust::Networks(nets)) = with(false, None).tcp_option_networks().unwrap() else {
            panic!("the default is a list of networks");
        };
        assert_eq!(nets.len(), 5);
        assert!(nets.contains(&("10.0.0.0".parse().unwrap(), 8)));
        assert_eq!(
            with(false, Some("all")).tcp_option_networks().unwrap(),
            Some(Trust::All)
        );
        assert_eq!(with(true, None).tcp_option_networks().unwrap(), None);
        assert_eq!(
            with(false, Some("none")).tcp_option_networks().unwrap(),
            None
        );
        let err = with(false, Some("10.0.0.0/33"))
            .tcp_option_networks()
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("--tcp-option-networks"),
            "{err:#}"
        );
        let off = AgentArgs {
            sample_in_kernel: false,
            ..with(false, None)
        };
        assert_eq!(off.tcp_option_networks().unwrap(), None);
    }

    /// `--sample-in-kernel` takes its share from `--sample` (flag or file), says what is
    /// missing without it, and refuses `--inject-context`; at a share of 1 nothing is sampled.
    #[test]
    fn sampling_in_the_kernel_needs_a_share() {
        let with = |sample: Option<f64>, inject_context: bool| AgentArgs {
            sample,
            sample_in_kernel: true,
            inject_context,
            ..Default::default()
        };
        assert_eq!(
            with(Some(0.1), false).kernel_sample_share().unwrap(),
            Some(0.1)
        );
        assert_eq!(with(Some(1.0), false).kernel_sample_share().unwrap(), None);
        let err = with(None, false).kernel_sample_share().unwrap_err();
        assert!(format!("{err}").contains("--sample SHARE"), "{err}");
        assert!(with(Some(0.1), true).kernel_sample_share().is_err());
        let off = AgentArgs {
            sample: Some(0.1),
            ..Default::default()
        };
        assert_eq!(off.kernel_sample_share().unwrap(), None);
    }

    /// Other endpoints get their own headers, never the collector's token, and no endpoint
    /// twice (it would get every span twice).
    #[test]
    fn also_export_endpoints_have_their_own_headers_and_are_distinct() {
        let args = AgentArgs {
            endpoint: Some("http://collector:4318".into()),
            token: Some("secret".into()),
            also_export: vec!["http://relay:4318/".into(), "https://vendor.example".into()],
            also_export_headers: Some("x-api-key=k".into()),
            ..Default::default()
        };
        let primary = args.export_config().unwrap();
        let also = args.also_export_configs(&primary).unwrap();
        let urls: Vec<&str> = also.iter().map(|c| c.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://relay:4318/v1/traces",
                "https://vendor.example/v1/traces"
            ]
        );
        for c in &also {
            assert_eq!(c.headers, [("x-api-key".to_owned(), "k".to_owned())]);
        }
        for twice in [
            vec!["http://collector:4318".to_owned()],
            vec![
                "http://relay:4318".to_owned(),
                "http://relay:4318/".to_owned(),
            ],
        ] {
            let args = AgentArgs {
                also_export: twice,
                ..Default::default()
            };
            assert!(args.also_export_configs(&primary).is_err());
        }
    }
}
