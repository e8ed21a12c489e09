//! The agent's main loop: drain the ring buffer, pair requests with responses, build spans with
//! resource facts, hand them to the exporter (or stdout), and keep the counters.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::io::{unix::AsyncFd, Interest};
use tracer_common::{data_flags, ConnTuple};

use crate::{
    btf,
    context::Trust,
    export::{self, ExportResource, ExportStats, SpanBatch, SpanSender, OUTBOX_BYTES},
    link::{ConnView, Linker},
    loss::LossWatch,
    metrics,
    pairing::{Chunk, ConnId, ConnMap, Exchange, Observer, Pairer, RequestStart, Role, SpanKey},
    priority,
    probes::{self, Connections, Counters, LoadOptions, Probes},
    protocol::Protocols,
    records::{self, Record},
    replay,
    resource::{self, HostFacts, ProcessCache, ProcessFacts},
    ring::{self, Ring},
    settings::{parse_service_rule, AgentArgs, RuleMatch, ServiceRule},
    spans::{self, Endpoints, Span},
};

/// Counters of the agent's own work (the probes and the exporter keep theirs). Written by the
/// pipeline's thread alone (see [`count`]).
#[derive(Default, Debug)]
pub struct AgentStats {
    pub records: AtomicU64,
    pub undecodable_records: AtomicU64,
    /// Records of a connection whose `ConnRecord` was lost and whose probe state is gone.
    pub unknown_connection_records: AtomicU64,
    pub exchanges: AtomicU64,
    pub spans: AtomicU64,
    pub connections_muted: AtomicU64,
    pub parse_failures: AtomicU64,
    /// Switches of the agent from idle-only to normal priority (see priority.rs).
    pub priority_boosts: AtomicU64,
    /// Parent links the agent made, by `link::Source::index`.
    pub links: [AtomicU64; 8],
    /// Calls left without a parent while their process served requests (`Linker::unattributed`).
    pub calls_unattributed: AtomicU64,
    /// Gauges: connections the pairer follows, processes whose facts are cached.
    pub connections: AtomicU64,
    pub processes: AtomicU64,
}

/// Adds one to a counter of [`AgentStats`]. Only the pipeline's thread writes them (the metrics
/// endpoint reads), so a plain load and store do. A locked add, on x86, first waits for all the
/// thread's earlier stores to reach the cache; perf put 4% of the agent on the one done for
/// every record, though swapping it made no difference beyond the noise of an A/B (4 rounds).
fn count(counter: &AtomicU64) {
    counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
}

/// Everything the metrics endpoint and the exit summary report.
#[derive(Default)]
pub struct Stats {
    pub agent: AgentStats,
    pub export: Arc<ExportStats>,
    pub kernel: std::sync::Mutex<probes::KernelCounters>,
    /// Every request's duration by service, route and status (`red.rs`).
    pub red: crate::red::RedMetrics,
}

/// How long a response with no length may stay open after its last byte.
const IDLE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the kernel's counters are read for the metrics.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the ring buffer is drained when the probes did not wake us. Each drain starts with
/// the agent's working set (connections, pairing state, code) evicted by the traced processes
/// while it slept; fewer, larger drains pay that less often. Measured at 10k requests/s
/// (3 alternated runs): 10 ms 8.2 µs of agent CPU a request, 25 ms 6.5, 50 ms 6.0, 100 ms 5.8.
/// At saturation 100 ms raised wrk's p99 by 1-3 ms (the agent's longer bursts on a shared
/// CPU); 50 ms stayed within noise of 10 ms.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// The longest wait between drains while records trickle in (spans wait up to the export batch
/// timeout, 500 ms, anyway), and when there are none: the wait doubles from `DRAIN_INTERVAL`
/// at each drain that finds nothing. A wake-up is ~40 µs of CPU on a VM whose idle CPUs halt
/// (measured on this project's machine): 20 a second were most of an idle agent's CPU, and a
/// microsecond a request at 1k requests/s.
const TRICKLE_DRAIN_INTERVAL: Duration = Duration::from_millis(200);
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// The wait before the next timer drain, after one that found `bytes` of records written in
/// `elapsed`: long enough for a quarter of what the probes' wake-up asks for (the drains stay
/// large at low rates), within `DRAIN_INTERVAL` and `TRICKLE_DRAIN_INTERVAL`; after a drain that
/// found nothing, twice the last wait, up to `IDLE_DRAIN_INTERVAL`.
fn next_drain_wait(last: Duration, bytes: u64, elapsed: Duration) -> Duration {
    if bytes == 0 {
        return (last * 2).clamp(DRAIN_INTERVAL, IDLE_DRAIN_INTERVAL);
    }
    ring::quarter_wakeup_time(bytes, elapsed).clamp(DRAIN_INTERVAL, TRICKLE_DRAIN_INTERVAL)
}

struct ConnMeta {
    tgid: u32,
    fd: u32,
    kernel_conn_id: u64,
    ends: Arc<Endpoints>,
    comm: [u8; 16],
    ignored: bool,
    last_seen: u64,
    /// The resource of this connection's spans, found on its first span (a connection keeps
    /// its process and its role).
    resource: Option<(Role, Arc<ExportResource>)>,
}

pub(crate) enum Sink {
    Otlp(SpanSender),
    Stdout,
    /// `tracer replay`: each drain's spans are laid out into a request as the exporter would
    /// (heads around the batches), then dropped.
    Discard(export::Encoder, Vec<u8>, export::Recycler),
}

impl Sink {
    /// For `tracer replay`.
    pub(crate) fn discard() -> Self {
        Sink::Discard(
            export::Encoder::default(),
            Vec::new(),
            export::Recycler::default(),
        )
    }
}

/// Spans on their way out: encoded into a batch per resource, and handed to the sink once per
/// drain, or as soon as a batch holds `OUTBOX_BYTES`.
struct Outbox {
    sink: Sink,
    batches: Vec<SpanBatch>,
    /// Scratch space for span names.
    name: String,
}

impl Outbox {
    /// Encodes a final span for the exporter (by reference: moving a span is a `memcpy` call,
    /// which was 4% of the agent's time).
    fn send(&mut self, resource: &Arc<ExportResource>, span: &Span) {
        let recycler = match &self.sink {
            Sink::Otlp(tx) => &tx.recycler,
            Sink::Discard(_, _, recycler) => recycler,
            Sink::Stdout => {
                println!("{}", stdout_line(&resource.proto, &span.to_proto()));
                span.name_into(&mut self.name);
                return;
            }
        };
        // A drain sees a few processes: a scan beats a hash.
        let i = match self.batches.iter().position(|b| b.is_for(resource)) {
            Some(i) => i,
            None => {
                self.batches.push(recycler.batch(resource));
                self.batches.len() - 1
            }
        };
        let batch = &mut self.batches[i];
        batch.push(span, &mut self.name);
        if batch.bytes_len() >= OUTBOX_BYTES {
            let full = self.batches.swap_remove(i);
            self.hand_over(full);
        }
    }

    /// Sends one of the agent's own spans, already encoded (rare: the `tracer.loss` spans).
    fn send_encoded(
        &mut self,
        resource: &Arc<ExportResource>,
        span: &opentelemetry_proto::tonic::trace::v1::Span,
        encoded: &[u8],
    ) {
        let recycler = match &self.sink {
            Sink::Otlp(tx) => &tx.recycler,
            Sink::Discard(_, _, recycler) => recycler,
            Sink::Stdout => {
                println!("{}", stdout_line(&resource.proto, span));
                return;
            }
        };
        let mut batch = recycler.batch(resource);
        batch.push_encoded(encoded);
        self.hand_over(batch);
    }

    fn flush(&mut self) {
        let mut batches = std::mem::take(&mut self.batches);
        for batch in batches.drain(..) {
            self.hand_over(batch);
        }
        self.batches = batches;
    }

    fn hand_over(&mut self, batch: SpanBatch) {
        match &mut self.sink {
            Sink::Otlp(tx) => tx.send(batch),
            Sink::Discard(encoder, heads, recycler) => {
                heads.clear();
                let pieces = encoder.layout(std::slice::from_ref(&batch), heads);
                std::hint::black_box(&pieces);
                recycler.return_batches(std::iter::once(batch));
            }
            Sink::Stdout => {}
        }
    }
}

pub(crate) struct Filters {
    pids: Vec<u32>,
    executables: Vec<String>,
    cgroups: Vec<String>,
    ports: Vec<u16>,
    /// The collector we export to: its traffic is never traced, at either end, or every export
    /// would create spans that are exported in turn.
    export_addrs: Vec<SocketAddr>,
}

impl Filters {
    /// Only connections with one of `ports` at either end (`tracer replay --port`).
    pub(crate) fn only_ports(ports: Vec<u16>) -> Self {
        Filters {
            pids: Vec::new(),
            executables: Vec::new(),
            cgroups: Vec::new(),
            ports,
            export_addrs: Vec::new(),
        }
    }

    fn wants(&self, p: &ProcessFacts, local: SocketAddr, remote: SocketAddr) -> bool {
        if self
            .export_addrs
            .iter()
            .any(|a| same_endpoint(*a, remote) || same_endpoint(*a, local))
        {
            return false;
        }
        (self.pids.is_empty() || self.pids.contains(&p.pid))
            && (self.executables.is_empty() || self.executables.contains(&p.executable_name))
            && (self.cgroups.is_empty()
                || self.cgroups.iter().any(|c| p.cgroup.contains(c.as_str())))
            && (self.ports.is_empty()
                || self.ports.contains(&local.port())
                || self.ports.contains(&remote.port()))
    }
}

/// Loopback and wildcard addresses of one port count as the same endpoint.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.ip().is_loopback() && b.ip().is_loopback())
            || a.ip().is_unspecified())
}

pub struct Pipeline {
    pairer: Pairer,
    conns: ConnMap<ConnMeta>,
    processes: ProcessCache,
    resources: HashMap<(u32, u64, String), Arc<ExportResource>>,
    host: HostFacts,
    rules: Vec<ServiceRule>,
    filters: Filters,
    out: Outbox,
    /// The probes' connection table, to mute connections; none when replaying a recording.
    kernel_conns: Option<Connections>,
    /// `--record`: every record is appended here too.
    recording: Option<std::io::BufWriter<std::fs::File>>,
    stats: Arc<Stats>,
    clock_offset: i128,
    /// `--clock-shift-ms`, in ns: added to every timestamp (tests of clock-skew correction).
    clock_shift_ns: i128,
    exchanges: Vec<Exchange>,
    linker: Linker,
}

/// What the pairer tells the linker about one record's connection goes through here: the
/// linker needs the request's process and connection ends, which the pipeline keeps per
/// connection (and has already looked up for the record).
struct LinkObserver<'a> {
    meta: &'a ConnMeta,
    linker: &'a mut Linker,
}

impl Observer for LinkObserver<'_> {
    fn request(&mut self, _conn: ConnId, role: Role, req: &RequestStart<'_>) -> SpanKey {
        let view = ConnView {
            tgid: self.meta.tgid,
            local: self.meta.ends.local,
            remote: self.meta.ends.remote,
        };
        self.linker.request(&view, role, req)
    }

    fn answered(&mut self, _conn: ConnId, _role: Role, span: SpanKey) {
        self.linker.answered(span);
    }
}

/// One id per connection: the probes' (tgid, fd, first-seen time) folded into 64 bits.
fn conn_id(tgid: u32, fd: u32, kernel_conn_id: u64) -> ConnId {
    let mut x = kernel_conn_id
        ^ ((u64::from(tgid) << 32) | u64::from(fd)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser: spreads the bits so HashMap buckets stay even.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub fn monotonic_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Pipeline {
    pub(crate) fn new(
        rules: Vec<ServiceRule>,
        filters: Filters,
        sink: Sink,
        stats: Arc<Stats>,
    ) -> Self {
        let host = HostFacts::read();
        Pipeline {
            pairer: Pairer::new(IDLE_TIMEOUT.as_nanos() as u64, Protocols::all()),
            conns: ConnMap::default(),
            processes: ProcessCache::default(),
            resources: HashMap::new(),
            host,
            rules,
            filters,
            out: Outbox {
                sink,
                batches: Vec::new(),
                name: String::new(),
            },
            kernel_conns: None,
            recording: None,
            stats,
            clock_offset: spans::monotonic_to_unix_offset(),
            clock_shift_ns: 0,
            exchanges: Vec::new(),
            linker: Linker::new(Trust::All),
        }
    }

    fn service_name(&self, p: &ProcessFacts, local_port: Option<u16>) -> String {
        for rule in &self.rules {
            let hit = match &rule.matches {
                RuleMatch::Exe(e) => &p.executable_name == e,
                RuleMatch::Pid(pid) => p.pid == *pid,
                RuleMatch::Cgroup(c) => p.cgroup.contains(c.as_str()),
                RuleMatch::Port(port) => local_port == Some(*port),
            };
            if hit {
                return rule.service.clone();
            }
        }
        p.executable_name.clone()
    }

    pub(crate) fn handle(&mut self, bytes: &[u8]) {
        count(&self.stats.agent.records);
        if let Some(file) = &mut self.recording {
            if let Err(e) = replay::write_record(file, bytes) {
                log::error!("recording stopped: {e}");
                self.recording = None;
            }
        }
        match records::decode(bytes) {
            Some(Record::Connection(rec)) => {
                let h = &rec.header;
                self.track(h.tgid, h.fd, h.conn_id, &rec.tuple, &rec.comm);
                return;
            }
            Some(Record::Data { record, payload }) => {
                let h = &record.header;
                let id = conn_id(h.tgid, h.fd, h.conn_id);
                let meta = match self.conns.get_mut(&id) {
                    Some(meta) => meta,
                    None => {
                        // Its connection record was lost (ring full): the probes still know it.
                        let known = (self.kernel_conns.as_ref())
                            .and_then(|k| k.get(h.tgid, h.fd, h.conn_id));
                        let Some(state) = known else {
                            count(&self.stats.agent.unknown_connection_records);
                            return;
                        };
                        self.track(h.tgid, h.fd, h.conn_id, &state.tuple, &state.comm);
                        let Some(meta) = self.conns.get_mut(&id) else {
                            return;
                        };
                        meta
                    }
                };
                meta.last_seen = h.ts_exit;
                if meta.ignored {
                    return;
                }
                let chunk = Chunk {
                    direction: record.direction,
                    ts_enter: h.ts_enter,
                    ts_exit: h.ts_exit,
                    len: record.len,
                    payload,
                    tid: h.tid,
                    tcp_seq: (record.flags & data_flags::TCP_SEQ != 0).then_some(record.tcp_seq),
                };
                let mut observer = LinkObserver {
                    meta,
                    linker: &mut self.linker,
                };
                self.pairer
                    .on_chunk(id, &chunk, &mut self.exchanges, &mut observer);
                if self.pairer.is_muted(id) {
                    meta.ignored = true;
                    if let Some(k) = &mut self.kernel_conns {
                        k.mute(meta.tgid, meta.fd, meta.kernel_conn_id);
                    }
                    self.pairer.forget(id);
                    count(&self.stats.agent.connections_muted);
                }
            }
            Some(Record::Close { header }) => {
                let id = conn_id(header.tgid, header.fd, header.conn_id);
                self.pairer
                    .on_close(id, header.ts_exit, &mut self.exchanges);
                self.flush_exchanges();
                self.conns.remove(&id);
                return;
            }
            None => {
                count(&self.stats.agent.undecodable_records);
            }
        }
        self.flush_exchanges();
    }

    /// Starts following a connection the probes announced: decides whether it is wanted, and
    /// mutes it in the probes if not.
    fn track(
        &mut self,
        tgid: u32,
        fd: u32,
        kernel_conn_id: u64,
        tuple: &ConnTuple,
        comm: &[u8; 16],
    ) {
        let local = records::local_addr(tuple);
        let remote = records::remote_addr(tuple);
        let process = self.processes.get(tgid, comm);
        let ignored = !self.filters.wants(&process, local, remote);
        if ignored {
            // Ask the probes to stop, once (a map update is a syscall); the records already
            // in the ring are skipped in `handle`.
            if let Some(k) = &mut self.kernel_conns {
                k.mute(tgid, fd, kernel_conn_id);
            }
        }
        let id = conn_id(tgid, fd, kernel_conn_id);
        self.conns.insert(
            id,
            ConnMeta {
                tgid,
                fd,
                kernel_conn_id,
                ends: Arc::new(Endpoints::new(local, remote)),
                comm: *comm,
                ignored,
                // The probes' connection id is the time they first saw it.
                last_seen: kernel_conn_id,
                resource: None,
            },
        );
    }

    fn flush_exchanges(&mut self) {
        if self.exchanges.is_empty() {
            return;
        }
        let mut exchanges = std::mem::take(&mut self.exchanges);
        for ex in exchanges.drain(..) {
            self.emit(ex);
        }
        self.exchanges = exchanges;
    }

    fn emit(&mut self, ex: Exchange) {
        count(&self.stats.agent.exchanges);
        let role = ex.role;
        let meta = match self.conns.get(&ex.conn) {
            Some(meta) if matches!(&meta.resource, Some((r, _)) if *r == role) => meta,
            // First span of the connection (one map lookup more, once per connection).
            Some(meta) => {
                let (tgid, comm, port) = (meta.tgid, meta.comm, meta.ends.local.port());
                let resource = self.resource_of(tgid, &comm, role, port);
                if let Some(meta) = self.conns.get_mut(&ex.conn) {
                    meta.resource = Some((role, resource));
                }
                match self.conns.get(&ex.conn) {
                    Some(meta) => meta,
                    None => return,
                }
            }
            None => return,
        };
        // Borrowed, not cloned: an `Arc` clone and drop a span, atomic operations right after
        // the span's stores, were a measurable share of the agent's time.
        let Some((_, resource)) = &meta.resource else {
            return;
        };
        let ends = meta.ends.clone();
        let offset = self.unix_offset();
        let ids = self.linker.finish(ex.span);
        if let Some(link) = ids.and_then(|i| i.link) {
            count(&self.stats.agent.links[link.source.index()]);
        }
        let span = Span::new(ex, ends, ids, |mono| {
            (i128::from(mono) + offset).max(0) as u64
        });
        count(&self.stats.agent.spans);
        self.out.send(resource, &span);
        // After `send`, which left the span's name in `out.name`.
        self.stats.red.record(resource, &span, &self.out.name);
    }

    /// The resource of a process's spans in `role`: looked up once per connection.
    fn resource_of(
        &mut self,
        tgid: u32,
        comm: &[u8],
        role: Role,
        local_port: u16,
    ) -> Arc<ExportResource> {
        let process = self.processes.get(tgid, comm);
        let local_port = (role == Role::Server).then_some(local_port);
        let service = self.service_name(&process, local_port);
        let key = (process.pid, process.start_time, service);
        if let Some(r) = self.resources.get(&key) {
            return r.clone();
        }
        let r = Arc::new(ExportResource::new(resource::resource(
            &self.host, &process, &key.2,
        )));
        self.resources.insert(key, r.clone());
        r
    }

    /// Hands the spans of this drain (or `OUTBOX_BYTES` of them) to the exporter in one go.
    pub(crate) fn flush_outbox(&mut self) {
        self.out.flush();
    }

    /// What to add to the probes' monotonic times for the Unix times spans report.
    fn unix_offset(&self) -> i128 {
        self.clock_offset + self.clock_shift_ns
    }

    /// Now, on the clock spans report (Unix ns).
    fn unix_now(&self) -> u64 {
        (i128::from(monotonic_now()) + self.unix_offset()).max(0) as u64
    }

    /// Reports what was lost since the last call as a `tracer.loss` span of the agent's own.
    fn report_losses(&mut self, loss: &mut LossWatch, kernel: &probes::KernelCounters) {
        let now = self.unix_now();
        let can_send = match &self.out.sink {
            Sink::Otlp(tx) => tx.has_room(),
            Sink::Stdout | Sink::Discard(..) => true,
        };
        let Some((span, encoded)) = loss.check(kernel, &self.stats, now, can_send) else {
            return;
        };
        let process = self.processes.get(std::process::id(), b"tracer");
        let resource = Arc::new(ExportResource::new(resource::resource(
            &self.host,
            &process,
            "tracer-agent",
        )));
        self.out.send_encoded(&resource, &span, &encoded);
    }

    /// This agent's identity and link settings (`--host-name`, `--host-id`, `--trust-context`,
    /// `--clock-shift-ms`).
    fn configure(&mut self, args: &AgentArgs, trust: Trust, protocols: Protocols) {
        self.pairer = Pairer::new(IDLE_TIMEOUT.as_nanos() as u64, protocols);
        if let Some(name) = &args.host_name {
            self.host.name.clone_from(name);
        }
        if let Some(id) = &args.host_id {
            self.host.id.clone_from(id);
        }
        self.linker = Linker::new(trust);
        self.clock_shift_ns = i128::from(args.clock_shift_ms.unwrap_or(0)) * 1_000_000;
    }

    /// Periodic work: time out responses without a length, forget dead connections/processes.
    fn tick(&mut self) {
        self.tick_at(monotonic_now());
    }

    /// `tick` at `now` (monotonic ns): a replay ticks on the recording's clock.
    pub(crate) fn tick_at(&mut self, now: u64) {
        self.pairer.tick(now, &mut self.exchanges);
        self.flush_exchanges();
        self.linker.expire(now);
        self.flush_outbox();
        self.stats
            .agent
            .parse_failures
            .store(self.pairer.parse_failures(), Relaxed);
        self.stats
            .agent
            .connections
            .store(self.pairer.connections() as u64, Relaxed);
        self.stats
            .agent
            .processes
            .store(self.processes.len() as u64, Relaxed);
        self.stats
            .agent
            .calls_unattributed
            .store(self.linker.unattributed, Relaxed);
    }

    fn housekeeping(&mut self) {
        let now = monotonic_now();
        // Connections whose close we never saw (killed processes) age out after 10 minutes idle.
        let stale = 600 * 1_000_000_000;
        let pairer = &mut self.pairer;
        self.conns.retain(|id, m| {
            let keep = now.saturating_sub(m.last_seen) < stale;
            if !keep {
                pairer.forget(*id);
            }
            keep
        });
        self.processes.prune();
        self.resources.retain(|(pid, start, _), _| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok() && *start > 0
        });
        self.clock_offset = spans::monotonic_to_unix_offset();
    }
}

/// `--stdout`: one JSON object a line, with the service and attributes flattened for reading.
fn stdout_line(
    resource: &opentelemetry_proto::tonic::resource::v1::Resource,
    span: &opentelemetry_proto::tonic::trace::v1::Span,
) -> String {
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
    fn json(v: &Value) -> serde_json::Value {
        match v {
            Value::StringValue(s) => s.clone().into(),
            Value::IntValue(i) => (*i).into(),
            Value::BoolValue(b) => (*b).into(),
            Value::DoubleValue(d) => (*d).into(),
            Value::ArrayValue(a) => a
                .values
                .iter()
                .filter_map(|v| v.value.as_ref())
                .map(json)
                .collect(),
            other => format!("{other:?}").into(),
        }
    }
    fn flat(kvs: &[KeyValue]) -> serde_json::Map<String, serde_json::Value> {
        kvs.iter()
            .filter_map(|kv| Some((kv.key.clone(), json(kv.value.as_ref()?.value.as_ref()?))))
            .collect()
    }
    let hex = spans::hex;
    let kind = match span.kind {
        2 => "SERVER",
        3 => "CLIENT",
        _ => "INTERNAL",
    };
    let res = flat(&resource.attributes);
    // Span names and attributes come from the network: a terminal must not receive their escapes.
    crate::client::json_for_terminal(&serde_json::json!({
        "service": res.get("service.name"),
        "name": span.name,
        "kind": kind,
        "trace_id": hex(&span.trace_id),
        "span_id": hex(&span.span_id),
        "start_unix_nano": span.start_time_unix_nano,
        "duration_us": (span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano)) as f64 / 1000.0,
        "status": span.status.as_ref().map_or(0, |s| s.code),
        "attributes": flat(&span.attributes),
        "resource": res,
    }))
}

fn filters(args: &AgentArgs, export_addrs: Vec<SocketAddr>) -> Filters {
    Filters {
        pids: args.pids.clone(),
        executables: args.executables.clone(),
        cgroups: args.cgroups.clone(),
        ports: args.ports.clone(),
        export_addrs,
    }
}

fn drain(ring: &mut Ring, pipeline: &mut Pipeline) {
    ring.drain(|record| pipeline.handle(record));
    pipeline.flush_outbox();
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let args = args.with_config_file()?;
    let rules = args
        .service_rules
        .iter()
        .map(|r| parse_service_rule(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let export_config = args.export_config()?;
    let metrics_addr = args.metrics_addr()?;
    let adaptive_priority = args.adaptive_priority()?;
    let trust = match &args.trust_context {
        Some(t) => Trust::parse(t)?,
        None => Trust::All,
    };
    let protocols = args.protocols()?;

    // The agent's memory is many small short-lived allocations: transparent huge pages would
    // make each touched 2 MiB of heap resident (measured: +32 MiB of RSS, no speed-up).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    raise_file_limit();
    probes::preflight()?;
    let netns = match &args.netns {
        Some(path) => netns_inode(path)?,
        None => 0,
    };
    let offsets = btf::kernel_offsets().context("reading kernel structure offsets from BTF")?;
    let mut probes = Probes::load(
        &offsets,
        &LoadOptions {
            ring_buffer_bytes: args.ring_buffer_bytes()?,
            max_connections: 65536,
            netns,
        },
    )?;
    let ring = probes.take_ring_buffer()?;
    let counters: Counters = probes.take_counters()?;
    let kernel_conns = probes.take_connections()?;

    let stats = Arc::new(Stats::default());
    let (sink, exporter) = if args.stdout {
        (Sink::Stdout, None)
    } else {
        let (tx, handle) = export::spawn(export_config.clone(), stats.export.clone())?;
        (Sink::Otlp(tx), Some(handle))
    };
    let export_addrs = if args.stdout {
        Vec::new()
    } else {
        resolve_endpoint(&export_config.url).await
    };
    if let Some(addr) = metrics_addr {
        metrics::serve(addr, stats.clone()).await?;
    }

    let mut pipeline = Pipeline::new(rules, filters(&args, export_addrs), sink, stats.clone());
    pipeline.configure(&args, trust, protocols);
    if let Some(path) = &args.netns {
        pipeline.host.ips = resource::host_ips_in(path)?;
    }
    pipeline.kernel_conns = Some(kernel_conns);
    if let Some(path) = &args.record {
        pipeline.recording = Some(replay::create_recording(path)?);
    }
    log::info!(
        "tracing TCP/HTTP on {}{} (kernel {}): {} probes attached; {}",
        pipeline.host.name,
        match &args.netns {
            Some(path) => format!(" (network namespace {}, inode {netns})", path.display()),
            None => String::new(),
        },
        probes::kernel_release(),
        probes.attached,
        if args.stdout {
            "printing spans to stdout".to_string()
        } else {
            format!("exporting to {}", export_config.url)
        }
    );
    eprintln!("tracer: ready");

    let priority_watchdog = if adaptive_priority {
        let stats = stats.clone();
        let on_boost = move || {
            stats.agent.priority_boosts.fetch_add(1, Relaxed);
        };
        let watched = priority::RingWakeups::new(ring.as_fd())
            .map_err(|e| format!("cannot wait on the ring buffer: {e}"))
            .and_then(|wakeups| priority::watch(ring.fill(), wakeups, on_boost));
        match watched {
            Ok(watchdog) => Some(watchdog),
            Err(why) => {
                log::info!("the agent runs at normal priority throughout: {why}");
                None
            }
        }
    } else {
        None
    };

    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    // The next drain the probes did not ask for. Every drain pushes it back: with traffic, the
    // probes' wake-ups (one per 256 KiB of records) do the draining, and the timer only catches
    // what stays below that.
    let mut drain_every = DRAIN_INTERVAL;
    let drain_timer = tokio::time::sleep(drain_every);
    tokio::pin!(drain_timer);
    let fill = ring.get_ref().fill();
    let (mut produced, mut last_drain) = (fill.produced(), Instant::now());
    let mut last_tick = Instant::now();
    // Both streams are made once, before the loop. `tokio::signal::ctrl_c()` inside the
    // `select!` made a new listener each iteration, and a listener only hears signals sent
    // after it exists: a Ctrl-C that arrived while the loop was draining (most of its time
    // under load) was lost, and the agent ignored it (1 in 4 under wrk in a review).
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_housekeeping = Instant::now();
    let mut last_counters = Instant::now();
    let mut losses = LossWatch::new(pipeline.unix_now());
    let mut last_stats = Instant::now();
    loop {
        let woken = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut pipeline);
                guard.clear_ready();
                true
            }
            _ = &mut drain_timer => {
                drain(ring.get_mut(), &mut pipeline);
                false
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let now_produced = fill.produced();
        drain_every = if woken {
            DRAIN_INTERVAL
        } else {
            next_drain_wait(drain_every, now_produced - produced, last_drain.elapsed())
        };
        (produced, last_drain) = (now_produced, Instant::now());
        drain_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + drain_every);
        // The periodic work (timeouts, held spans, counters) at the drain interval, whichever
        // kind of drain comes first.
        if last_tick.elapsed() >= DRAIN_INTERVAL {
            last_tick = Instant::now();
            pipeline.tick();
            // A syscall per counter: once a second is plenty for metrics, and every drain
            // it was a measurable share of the agent's CPU at 10k requests/s.
            if last_counters.elapsed() >= COUNTERS_INTERVAL {
                let kernel = counters.read();
                *stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = kernel;
                pipeline.report_losses(&mut losses, &kernel);
                last_counters = Instant::now();
            }
            if last_housekeeping.elapsed() > Duration::from_secs(30) {
                pipeline.housekeeping();
                last_housekeeping = Instant::now();
            }
            if args.stats && last_stats.elapsed() > Duration::from_secs(10) {
                log::info!("{}", summary(&stats));
                last_stats = Instant::now();
            }
        }
    }

    log::info!("stopping: detaching probes and flushing spans");
    // Back to normal priority first: the last drain and the flush must not wait for idle CPU.
    drop(priority_watchdog);
    drain(ring.get_mut(), &mut pipeline);
    pipeline.flush_outbox();
    *stats.kernel.lock().unwrap_or_else(|e| e.into_inner()) = counters.read();
    // Detach before flushing: nothing new comes in while we wait on the collector.
    drop(ring);
    drop(probes);
    let sink = std::mem::replace(&mut pipeline.out.sink, Sink::Stdout);
    drop(pipeline);
    drop(sink);
    if let Some(handle) = exporter {
        let _ = handle.await;
    }
    log::info!("{}", summary(&stats));
    Ok(())
}

/// One line with every counter: what was seen, sent, and lost where.
pub fn summary(stats: &Stats) -> String {
    use tracer_common::counter as c;
    let k = *stats.kernel.lock().unwrap_or_else(|e| e.into_inner());
    let a = &stats.agent;
    let e = &stats.export;
    format!(
        "counters: syscalls={} records={} ringbuf_drops={} conn_table_drops={} entry_time_missed={} \
         exchanges={} spans={} spans_sent={} export_dropped={} (queue_full={} rejected={} shutdown={}) \
         parse_failures={} muted_connections={}",
        k.get(c::DATA_SYSCALLS),
        a.records.load(Relaxed),
        k.get(c::RINGBUF_FULL),
        k.get(c::CONN_TABLE_FULL),
        k.get(c::ENTRY_TIME_MISSED),
        a.exchanges.load(Relaxed),
        a.spans.load(Relaxed),
        e.spans_sent.load(Relaxed),
        e.dropped(),
        e.dropped_queue_full.load(Relaxed),
        e.dropped_rejected.load(Relaxed),
        e.dropped_shutdown.load(Relaxed),
        a.parse_failures.load(Relaxed),
        a.connections_muted.load(Relaxed),
    )
}

/// Raises the open-file soft limit to the hard limit: the usual soft 1024 is few for a daemon
/// that follows a host's connections, serves metrics to any local user and exports over a pool.
fn raise_file_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                log::warn!(
                    "cannot raise the open-file limit from {}: {}",
                    limit.rlim_cur,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// The inode number of a network namespace file: how the probes name the namespace.
fn netns_inode(path: &std::path::Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "--netns {}: no such namespace file (use /run/netns/NAME from `ip netns add NAME`, \
             or /proc/PID/ns/net of a process inside it)",
            path.display()
        )
    })?;
    // A namespace file lives on nsfs (a bind mount of one under /run/netns, or the magic link
    // in /proc, whose target names the namespace type).
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let on_nsfs = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .ok()
        .is_some_and(|c| {
            // SAFETY: a valid C string and an out-pointer to a zeroed statfs.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC }
        });
    let other_type =
        std::fs::read_link(path).is_ok_and(|t| !t.to_string_lossy().starts_with("net:["));
    match u32::try_from(meta.ino()) {
        Ok(ino) if on_nsfs && !other_type => Ok(ino),
        _ => anyhow::bail!(
            "--netns {}: not a network namespace file (expected /run/netns/NAME or /proc/PID/ns/net)",
            path.display()
        ),
    }
}

async fn resolve_endpoint(url: &str) -> Vec<SocketAddr> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Vec::new();
    };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return Vec::new();
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .map(|a| a.collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tracer_common::{
        direction, kind, ConnRecord, DataRecord, RecordHeader, WAKEUP_THRESHOLD_BYTES,
    };

    use super::*;
    use crate::records::AlignedRecord;

    /// Busy: every 50 ms; a trickle: drains of a quarter threshold, up to 200 ms apart; nothing:
    /// the wait doubles up to a second; traffic again: back at once.
    #[test]
    fn the_drain_timer_slows_down_with_the_traffic() {
        let ms = Duration::from_millis;
        let quarter = WAKEUP_THRESHOLD_BYTES / 4;
        assert_eq!(next_drain_wait(ms(50), 10 * quarter, ms(50)), ms(50));
        assert_eq!(next_drain_wait(ms(50), quarter / 2, ms(50)), ms(100));
        assert_eq!(next_drain_wait(ms(100), 100, ms(100)), ms(200));
        let mut wait = ms(200);
        for want in [400, 800, 1000, 1000] {
            wait = next_drain_wait(wait, 0, wait);
            assert_eq!(wait, ms(want));
        }
        assert_eq!(next_drain_wait(wait, 100 * quarter, wait), ms(50));
    }

    fn header(k: u32, ts: u64) -> RecordHeader {
        RecordHeader {
            kind: k,
            // A pid that cannot exist: the process facts fall back to the command name.
            tgid: u32::MAX - 1,
            fd: 7,
            conn_id: 1000,
            ts_enter: ts,
            ts_exit: ts,
            ..Default::default()
        }
    }

    fn data(pipeline: &mut Pipeline, dir: u32, ts: u64, payload: &[u8]) {
        let rec = DataRecord {
            header: header(kind::DATA, ts),
            len: payload.len() as u64,
            direction: dir,
            captured: payload.len() as u32,
            message_seq: dir,
            ..Default::default()
        };
        pipeline.handle(AlignedRecord::new(&rec, payload).bytes());
    }

    /// Data records follow the `ConnRecord` that announced their connection; without one (it
    /// was lost and the probes' state is gone) they are counted, not guessed at.
    #[test]
    fn connections_are_announced_once_and_unannounced_data_is_counted() {
        let stats = Arc::new(Stats::default());
        let sink = Sink::discard();
        let mut pipeline =
            Pipeline::new(Vec::new(), Filters::only_ports(vec![]), sink, stats.clone());
        let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

        data(&mut pipeline, direction::EGRESS, 10, request);
        data(&mut pipeline, direction::INGRESS, 20, response);
        assert_eq!(stats.agent.unknown_connection_records.load(Relaxed), 2);
        assert_eq!(stats.agent.exchanges.load(Relaxed), 0);

        let mut conn = ConnRecord {
            header: header(kind::CONNECTION, 5),
            comm: *b"client\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        conn.tuple.family = libc::AF_INET as u16;
        conn.tuple.local_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        conn.tuple.remote_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        conn.tuple.local_port = 40000;
        conn.tuple.remote_port = 80;
        pipeline.handle(AlignedRecord::new(&conn, &[]).bytes());
        data(&mut pipeline, direction::EGRESS, 30, request);
        data(&mut pipeline, direction::INGRESS, 40, response);
        assert_eq!(stats.agent.unknown_connection_records.load(Relaxed), 2);
        assert_eq!(stats.agent.exchanges.load(Relaxed), 1);
        assert_eq!(stats.agent.spans.load(Relaxed), 1);
        assert_eq!(stats.agent.undecodable_records.load(Relaxed), 0);
    }
}
