//! The agent's pipeline, record by record: connections announced by the probes, their data
//! through the connection layer and the protocols (`pairing`, `protocol`), each exchange linked
//! (`link`), given its process's resource and sent to the outbox; losses reported as spans of
//! the agent's own. `tracer agent` feeds it from the ring buffer, `tracer replay` from a
//! recording.
mod filters;
mod outbox;

use std::{
    collections::HashMap,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use tracer_common::{
    data_flags, inject_flags, red, ConnTuple, InjectedRecord, RedCounts, RedKey, RedRecord,
};

use self::outbox::Outbox;
pub use self::{filters::Filters, outbox::Sink};
use crate::{
    context::Trust,
    export::ExportResource,
    kernel_red::{self, KernelRed},
    link::{ConnView, Injection, Linker},
    loss::LossWatch,
    pairing::{Chunk, ConnId, ConnMap, Exchange, Observer, Pairer, RequestStart, Role, SpanKey},
    probes::{self, Connections},
    protocol::Protocols,
    recording,
    records::{self, Record},
    resource::{self, HostFacts, KernelNames, ProcessCache, ProcessFacts},
    settings::{AgentArgs, RuleMatch, ServiceRule},
    spans::{self, Endpoints, Span},
    stats::{count, Stats},
};

/// How long a response with no length may stay open after its last byte.
const IDLE_TIMEOUT: Duration = Duration::from_millis(500);
struct ConnMeta {
    tgid: u32,
    fd: u32,
    kernel_conn_id: u64,
    ends: Arc<Endpoints>,
    names: KernelNames,
    ignored: bool,
    /// The TLS library's plaintext of the connection: a stream of its own (`data_flags::TLS`).
    tls: bool,
    /// The other end is on this host (`peer_on_host`), decided once: asked at every head.
    peer_on_host: bool,
    last_seen: u64,
    /// The resource of this connection's spans, found on its first span (a connection keeps
    /// its process and its role).
    resource: Option<(Role, Arc<ExportResource>)>,
}

pub struct Pipeline {
    pairer: Pairer,
    conns: ConnMap<ConnMeta>,
    processes: ProcessCache,
    /// By process (pid, start time) and which service rule named it (`None`: its executable).
    resources: crate::hashing::FxMap<(u32, u64, Option<usize>), Arc<ExportResource>>,
    pub(crate) host: HostFacts,
    rules: Vec<ServiceRule>,
    filters: Filters,
    out: Outbox,
    /// The probes' connection table, to mute connections; none when replaying a recording.
    pub(crate) kernel_conns: Option<Connections>,
    /// `--metrics-only`: the exchanges the probes count, and when they were last read.
    pub(crate) kernel_red: Option<KernelRed>,
    kernel_red_read_ns: u64,
    /// `--record`: every record is appended here too.
    pub(crate) recording: Option<std::io::BufWriter<std::fs::File>>,
    stats: Arc<Stats>,
    clock_offset: i128,
    /// `--clock-shift-ms`, in ns: added to every timestamp (tests of clock-skew correction).
    clock_shift_ns: i128,
    exchanges: Vec<Exchange>,
    pub(crate) linker: Linker,
    /// `traceparent` insertions the probes reported, until their connection's data record
    /// (the next one of the same syscall; records of other CPUs may come between).
    injections: ConnMap<InjectedRecord>,
    /// `--sample`: which traces' spans are exported (all without it).
    pub(crate) sample: Option<Sampler>,
}

/// Keeps the traces whose id's low 64 bits fall below a share of 2^64: the rule of the
/// OpenTelemetry SDKs' `TraceIdRatioBased` sampler, so that agents and SDKs with the same share
/// keep the same traces, and every span of a kept trace is kept wherever its id is known.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sampler {
    bound: u64,
}

impl Sampler {
    pub(crate) fn new(share: f64) -> Self {
        // `as` saturates: a share of 1 would be 2^64.
        Sampler {
            bound: (share * 2f64.powi(64)) as u64,
        }
    }

    /// Trace ids whose low 64 bits are below this are kept.
    pub(crate) fn bound(self) -> u64 {
        self.bound
    }

    pub(crate) fn keeps(self, trace_id: &[u8; 16]) -> bool {
        let low = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default());
        low < self.bound
    }
}

/// What the pairer tells the linker about one record's connection goes through here: the
/// linker needs the request's process and connection ends, which the pipeline keeps per
/// connection (and has already looked up for the record).
struct LinkObserver<'a> {
    meta: &'a ConnMeta,
    linker: &'a mut Linker,
    /// `data_flags::DECIDED` of the record being handled.
    decided: u32,
}

impl Observer for LinkObserver<'_> {
    fn request(&mut self, _conn: ConnId, role: Role, req: &RequestStart<'_>) -> SpanKey {
        let view = ConnView {
            tgid: self.meta.tgid,
            local: self.meta.ends.local,
            remote: self.meta.ends.remote,
            decided: self.decided,
        };
        self.linker.request(&view, role, req)
    }

    fn answered(&mut self, _conn: ConnId, _role: Role, span: SpanKey) {
        self.linker.answered(span);
    }

    fn peer_on_host(&self) -> bool {
        self.meta.peer_on_host
    }
}

/// The remote end of a connection is on this host: loopback, or the local address itself.
/// Unmapped: a dual-stack server sees a local IPv4 client as `::ffff:127.0.0.1`.
fn peer_on_host(local: std::net::IpAddr, remote: std::net::IpAddr) -> bool {
    let unmap = crate::context::unmap;
    let (local, remote) = (unmap(local), unmap(remote));
    remote.is_loopback() || remote == local
}

/// The ids of an inserted `traceparent`, if its hex is well formed (the probes write it).
fn injection_of(rec: &InjectedRecord) -> Option<Injection> {
    Some(Injection {
        trace_id: crate::context::hex_bytes(&rec.trace_id_hex)?,
        span_id: crate::context::hex_bytes(&rec.span_id_hex)?,
        from_served_request: rec.flags & inject_flags::FROM_SERVED_REQUEST != 0,
    })
}

/// The id of a connection's TLS plaintext stream (its `ConnId` with the top bit flipped: the
/// pairer and the linker see it as a connection of its own).
fn tls_conn_id(base: ConnId) -> ConnId {
    base ^ (1 << 63)
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
            resources: HashMap::default(),
            host,
            rules,
            filters,
            out: Outbox {
                sink,
                batches: Vec::new(),
                name: String::new(),
            },
            kernel_conns: None,
            kernel_red: None,
            kernel_red_read_ns: 0,
            recording: None,
            stats,
            clock_offset: spans::monotonic_to_unix_offset(),
            clock_shift_ns: 0,
            exchanges: Vec::new(),
            linker: Linker::new(Trust::All),
            injections: ConnMap::default(),
            sample: None,
        }
    }

    /// The first service rule that names the process, if any (else its executable names it).
    fn service_rule(&self, p: &ProcessFacts, local_port: Option<u16>) -> Option<usize> {
        self.rules.iter().position(|rule| match &rule.matches {
            RuleMatch::Exe(e) => &p.executable_name == e,
            RuleMatch::Pid(pid) => p.pid == *pid,
            RuleMatch::Cgroup(c) => p.cgroup.contains(c.as_str()),
            RuleMatch::Port(port) => local_port == Some(*port),
        })
    }

    pub(crate) fn handle(&mut self, bytes: &[u8]) {
        count(&self.stats.agent.records);
        if let Some(file) = &mut self.recording {
            if let Err(e) = recording::write_record(file, bytes) {
                log::error!("recording stopped: {e}");
                self.recording = None;
            }
        }
        match records::decode(bytes) {
            Some(Record::Connection(rec)) => {
                let h = &rec.header;
                let names = KernelNames::of_record(&rec);
                self.track(h.tgid, h.fd, h.conn_id, &rec.tuple, &names);
                return;
            }
            Some(Record::Data { record, payload }) => {
                let h = &record.header;
                let base = conn_id(h.tgid, h.fd, h.conn_id);
                let tls = record.flags & data_flags::TLS != 0;
                let id = if tls { tls_conn_id(base) } else { base };
                if tls && !self.conns.contains_key(&id) {
                    self.track_tls(base, h.tgid, h.fd, h.conn_id);
                }
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
                        let names = KernelNames::of_state(&state);
                        self.track(h.tgid, h.fd, h.conn_id, &state.tuple, &names);
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
                let mut chunk = Chunk {
                    direction: record.direction,
                    ts_enter: h.ts_enter,
                    ts_exit: h.ts_exit,
                    len: record.len,
                    payload,
                    tid: h.tid,
                    tcp_seq: (record.flags & data_flags::TCP_SEQ != 0).then_some(record.tcp_seq),
                    inserted: 0,
                };
                let injected = !self.injections.is_empty()
                    && self.injections.remove(&id).is_some_and(|inj| {
                        let same_call = inj.header.tid == h.tid && inj.header.ts_exit == h.ts_exit;
                        if same_call {
                            chunk.inserted = inj.inserted;
                            if let Some(injection) = injection_of(&inj) {
                                self.linker.expect_injection(h.tid, h.ts_enter, injection);
                            }
                        }
                        same_call
                    });
                let mut observer = LinkObserver {
                    meta,
                    linker: &mut self.linker,
                    decided: record.flags & data_flags::DECIDED,
                };
                self.pairer
                    .on_chunk(id, &chunk, &mut self.exchanges, &mut observer);
                if injected {
                    self.linker.clear_injection();
                }
                if self.pairer.is_muted(id) {
                    meta.ignored = true;
                    if let Some(k) = &mut self.kernel_conns {
                        k.mute(meta.tgid, meta.fd, meta.kernel_conn_id, meta.tls);
                    }
                    self.pairer.forget(id);
                    count(&self.stats.agent.connections_muted);
                }
            }
            Some(Record::Injected(rec)) => {
                let h = &rec.header;
                self.injections
                    .insert(conn_id(h.tgid, h.fd, h.conn_id), rec);
                return;
            }
            Some(Record::Red(rec)) => {
                self.kernel_red_record(&rec);
                return;
            }
            Some(Record::Close { header }) => {
                let id = conn_id(header.tgid, header.fd, header.conn_id);
                self.injections.remove(&id);
                for id in [id, tls_conn_id(id)] {
                    self.pairer
                        .on_close(id, header.ts_exit, &mut self.exchanges);
                }
                // Before the connections' facts go: the exchanges the close ended need them.
                self.flush_exchanges();
                for id in [id, tls_conn_id(id)] {
                    self.conns.remove(&id);
                }
                return;
            }
            None => {
                count(&self.stats.agent.undecodable_records);
            }
        }
        self.flush_exchanges();
    }

    /// Starts following the TLS plaintext of connection `base`: the same process, ends and
    /// verdict of the filters, marked TLS.
    fn track_tls(&mut self, base: ConnId, tgid: u32, fd: u32, kernel_conn_id: u64) {
        if !self.conns.contains_key(&base) {
            // Its connection record was lost (ring full): the probes still know it.
            let known = (self.kernel_conns.as_ref()).and_then(|k| k.get(tgid, fd, kernel_conn_id));
            let Some(state) = known else {
                return;
            };
            let names = KernelNames::of_state(&state);
            self.track(tgid, fd, kernel_conn_id, &state.tuple, &names);
        }
        let Some(meta) = self.conns.get(&base) else {
            return;
        };
        let (local, remote, names, last_seen) = (
            meta.ends.local,
            meta.ends.remote,
            meta.names,
            meta.last_seen,
        );
        // The filters' verdict, not the ciphertext's: that one is muted as TLS.
        let process = self.processes.get(tgid, &names);
        let plain = ConnMeta {
            tgid,
            fd,
            kernel_conn_id,
            ends: Arc::new(Endpoints::new(local, remote).tls()),
            names,
            ignored: !self.filters.wants(&process, local, remote),
            tls: true,
            peer_on_host: peer_on_host(local.ip(), remote.ip()),
            last_seen,
            resource: None,
        };
        self.conns.insert(tls_conn_id(base), plain);
    }

    /// Starts following a connection the probes announced: decides whether it is wanted, and
    /// mutes it in the probes if not.
    fn track(
        &mut self,
        tgid: u32,
        fd: u32,
        kernel_conn_id: u64,
        tuple: &ConnTuple,
        names: &KernelNames,
    ) {
        let local = records::local_addr(tuple);
        let remote = records::remote_addr(tuple);
        let process = self.processes.get(tgid, names);
        let ignored = !self.filters.wants(&process, local, remote);
        if ignored {
            // Ask the probes to stop, once (a map update is a syscall); the records already
            // in the ring are skipped in `handle`.
            if let Some(k) = &mut self.kernel_conns {
                k.mute(tgid, fd, kernel_conn_id, false);
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
                names: *names,
                ignored,
                tls: false,
                peer_on_host: peer_on_host(local.ip(), remote.ip()),
                // The probes' connection id is the time they first saw it.
                last_seen: kernel_conn_id,
                resource: None,
            },
        );
    }

    /// A path the probes counted under (its first use by a process), or an exchange their
    /// table had no room for.
    fn kernel_red_record(&mut self, rec: &RedRecord) {
        let Some(k) = &mut self.kernel_red else {
            return;
        };
        if rec.what == red::PATH {
            k.learn(rec);
            return;
        }
        let mut counts = RedCounts::default();
        counts.buckets[crate::red::bucket_of(rec.duration_ns)] = 1;
        counts.sum_ns = rec.duration_ns;
        let path = k.tally.path(&rec.key).to_owned();
        self.count_kernel_red(rec.key, &path, &counts);
    }

    /// Reads the probes' counts (`--metrics-only`) into the RED histograms, once a second.
    fn read_kernel_red(&mut self, now: u64) {
        if self.kernel_red.is_none() || now.saturating_sub(self.kernel_red_read_ns) < 1_000_000_000
        {
            return;
        }
        self.kernel_red_read_ns = now;
        let Some(mut k) = self.kernel_red.take() else {
            return;
        };
        k.read(|g| self.count_kernel_red(g.key, g.path, &g.counts));
        self.kernel_red = Some(k);
    }

    fn count_kernel_red(&mut self, key: RedKey, path: &str, counts: &RedCounts) {
        let server = key.role == red::SERVER;
        let role = if server { Role::Server } else { Role::Client };
        let process = self.processes.get(key.tgid, &KernelNames::default());
        if !self.filters.wants_port(&process, key.port) {
            return;
        }
        let resource = self.resource_of(key.tgid, &KernelNames::default(), role, key.port);
        kernel_red::name_into(&key, path, &mut self.out.name);
        self.stats.red.record_counts(
            &resource,
            server,
            &self.out.name,
            key.status,
            &counts.buckets,
            counts.sum_ns,
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
                let (tgid, names, port) = (meta.tgid, meta.names, meta.ends.local.port());
                let resource = self.resource_of(tgid, &names, role, port);
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
        let decided = ids.map_or(0, |i| i.decided);
        if let Some(link) = ids.and_then(|i| i.link) {
            count(&self.stats.agent.links[link.source.index()]);
        }
        let span = Span::new(ex, ends, ids, |mono| {
            (i128::from(mono) + offset).max(0) as u64
        });
        count(&self.stats.agent.spans);
        // A span whose exchange the probes kept is kept (its trace id may be an SDK's).
        let kept = decided & data_flags::KEPT != 0;
        if kept || self.sample.is_none_or(|s| s.keeps(&span.trace_id)) {
            // `send` leaves the span's name in `out.name`.
            self.out.send(resource, &span);
        } else {
            count(&self.stats.agent.spans_unsampled);
            span.name_into(&mut self.out.name);
        }
        // Every request, sampled or not; once: the probes counted those they framed.
        if decided & data_flags::RED_COUNTED == 0 {
            self.stats.red.record(resource, &span, &self.out.name);
        }
    }

    /// The resource of a process's spans in `role`: looked up once per connection.
    fn resource_of(
        &mut self,
        tgid: u32,
        names: &KernelNames,
        role: Role,
        local_port: u16,
    ) -> Arc<ExportResource> {
        let process = self.processes.get(tgid, names);
        let local_port = (role == Role::Server).then_some(local_port);
        // No allocation to look up: this runs for every new connection.
        let rule = self.service_rule(&process, local_port);
        let key = (process.pid, process.start_time, rule);
        if let Some(r) = self.resources.get(&key) {
            return r.clone();
        }
        let service = rule.map_or(&process.executable_name, |i| &self.rules[i].service);
        let r = Arc::new(ExportResource::new(resource::resource(
            &self.host, &process, service,
        )));
        self.resources.insert(key, r.clone());
        r
    }

    /// Takes the sink out (leaving one that holds nothing): dropping it closes the exporter's
    /// queue, which then sends what it holds and ends.
    /// The records come from a recording (`tracer replay`): their pids are not this machine's
    /// now, so processes are named from the records alone.
    pub(crate) fn replaying(mut self) -> Self {
        self.processes = ProcessCache::recorded();
        self
    }

    pub(crate) fn take_sink(&mut self) -> Sink {
        std::mem::replace(&mut self.out.sink, Sink::Stdout)
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
    pub(crate) fn unix_now(&self) -> u64 {
        (i128::from(monotonic_now()) + self.unix_offset()).max(0) as u64
    }

    /// Reports what was lost since the last call as a `tracer.loss` span of the agent's own.
    pub(crate) fn report_losses(&mut self, loss: &mut LossWatch, kernel: &probes::KernelCounters) {
        let now = self.unix_now();
        let lost = {
            let sink = &self.out.sink;
            let can_send = |endpoint: usize| match sink {
                Sink::Otlp(..) => sink.endpoint(endpoint).is_some_and(|tx| tx.has_room()),
                Sink::Stdout | Sink::Discard(..) => true,
            };
            loss.check(kernel, &self.stats, now, can_send)
        };
        if lost.is_empty() {
            return;
        }
        let process = self
            .processes
            .get(std::process::id(), &KernelNames::comm_only("tracer"));
        let resource = Arc::new(ExportResource::new(resource::resource(
            &self.host,
            &process,
            "tracer-agent",
        )));
        for (endpoint, span, encoded) in lost {
            self.out.send_encoded(endpoint, &resource, &span, &encoded);
        }
    }

    /// This agent's identity and link settings (`--host-name`, `--host-id`, `--trust-context`,
    /// `--clock-shift-ms`).
    pub(crate) fn configure(&mut self, args: &AgentArgs, trust: Trust, protocols: Protocols) {
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
    pub(crate) fn tick(&mut self) {
        self.tick_at(monotonic_now());
    }

    /// `tick` at `now` (monotonic ns): a replay ticks on the recording's clock.
    pub(crate) fn tick_at(&mut self, now: u64) {
        self.read_kernel_red(now);
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
            .heads_reused
            .store(self.pairer.heads_reused(), Relaxed);
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
        self.stats
            .agent
            .injected_mismatch
            .store(self.linker.injected_mismatch, Relaxed);
    }

    pub(crate) fn housekeeping(&mut self) {
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
        // The counts of processes that ended are read while their facts are still cached.
        self.kernel_red_read_ns = 0;
        self.read_kernel_red(now);
        if let Some(k) = &mut self.kernel_red {
            k.forget_ended();
        }
        self.processes.prune();
        self.resources.retain(|(pid, start, _), _| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok() && *start > 0
        });
        self.clock_offset = spans::monotonic_to_unix_offset();
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{direction, kind, ConnRecord, DataRecord, RecordHeader};

    use super::*;
    use crate::records::AlignedRecord;

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

        // A response whose end only the close tells (no length): its span still has the
        // connection's facts when the close reports it.
        data(&mut pipeline, direction::EGRESS, 50, request);
        data(
            &mut pipeline,
            direction::INGRESS,
            60,
            b"HTTP/1.0 200 OK\r\n\r\nbody",
        );
        assert_eq!(stats.agent.spans.load(Relaxed), 1);
        let close = tracer_common::CloseRecord {
            header: header(kind::CLOSE, 70),
        };
        pipeline.handle(AlignedRecord::new(&close, &[]).bytes());
        assert_eq!(stats.agent.exchanges.load(Relaxed), 2);
        assert_eq!(stats.agent.spans.load(Relaxed), 2);
    }

    #[test]
    fn peers_on_this_host() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(peer_on_host(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(peer_on_host(ip("::ffff:10.0.0.5"), ip("::ffff:127.0.0.1")));
        assert!(peer_on_host(ip("::1"), ip("::1")));
        assert!(peer_on_host(ip("10.0.0.5"), ip("10.0.0.5")));
        assert!(peer_on_host(ip("::ffff:10.0.0.5"), ip("10.0.0.5")));
        assert!(!peer_on_host(ip("10.0.0.5"), ip("10.0.0.6")));
        assert!(!peer_on_host(ip("fd00::2"), ip("fd00::3")));
    }

    #[test]
    fn the_sampler_keeps_the_sdks_traces() {
        let id = |low: u64| {
            let mut t = [0xffu8; 16];
            t[8..].copy_from_slice(&low.to_be_bytes());
            t
        };
        let half = Sampler::new(0.5);
        assert!(half.keeps(&id(0)) && half.keeps(&id((1 << 63) - 1)));
        assert!(!half.keeps(&id(1 << 63)) && !half.keeps(&id(u64::MAX)));
        assert!(!Sampler::new(0.0).keeps(&id(0)));
        let tenth = Sampler::new(0.1);
        let kept = (0..10_000u64)
            .filter(|i| tenth.keeps(&id(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))))
            .count();
        assert!((900..1100).contains(&kept), "{kept}");
    }

    /// Unsampled spans are not exported but still counted, and still in the RED metrics.
    #[test]
    fn unsampled_spans_are_counted_not_sent() {
        let stats = Arc::new(Stats::default());
        let mut pipeline = Pipeline::new(
            Vec::new(),
            Filters::only_ports(vec![]),
            Sink::discard(),
            stats.clone(),
        );
        pipeline.sample = Some(Sampler::new(0.0));
        let mut conn = ConnRecord {
            header: header(kind::CONNECTION, 5),
            comm: *b"client\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        conn.tuple.family = libc::AF_INET as u16;
        conn.tuple.remote_port = 80;
        pipeline.handle(AlignedRecord::new(&conn, &[]).bytes());
        data(
            &mut pipeline,
            direction::EGRESS,
            30,
            b"GET /a HTTP/1.1\r\n\r\n",
        );
        data(
            &mut pipeline,
            direction::INGRESS,
            40,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        pipeline.flush_outbox();
        assert_eq!(stats.agent.spans.load(Relaxed), 1);
        assert_eq!(stats.agent.spans_unsampled.load(Relaxed), 1);
        let mut metrics = String::new();
        stats.red.render(&mut metrics);
        assert!(
            metrics.contains("http_client_request_duration_seconds_count{"),
            "{metrics}"
        );
    }
}
