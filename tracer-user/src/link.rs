//! Which span is whose parent, decided on this host as requests begin.
//!
//! Two kinds of link are made here, each recorded with how it was made and how sure it is
//! (`tracer.link.source`, `tracer.link.confidence`), because a wrong parent is worse than none:
//!
//! - **Inside a process**: a client request a process writes is a child of the server request
//!   it is handling at that moment. Candidates are the server requests of the process that were
//!   read and not yet answered; the rules, in order, are: it forwards the `traceparent` of
//!   exactly one of them; the writing thread is serving exactly one (thread per request, a
//!   blocking worker); its request line equals exactly one of them (a reverse proxy such as
//!   nginx forwards it); the process has exactly one in flight; its path carries an id (a path
//!   segment that span names template as `{id}`) found in exactly one of them (a service that
//!   calls `/stock/42` while serving `/orders/42`). Otherwise the client span stays a root: an
//!   event loop serving many requests at once, or a hand-off to another thread while others are
//!   in flight, cannot be told apart from the syscalls alone.
//! - **Across one TCP connection seen from both ends on this host**: the client and server
//!   spans of one request carry the same TCP sequence number of the request's first byte (the
//!   probes read it at each message start). Across hosts the collector joins the two halves by
//!   the same key, `tracer.tcp.edge`.
//!
//! Every decision is made when a request's head is parsed, in record order, so that a span's
//! trace id is fixed before any child uses it: a server span takes its trace id from its
//! client's span if that is already known (same host), else from a trusted incoming
//! `traceparent`/B3, else the id is drawn when first needed (its first child, or its export),
//! which gives a client span seen a little late (records of different CPUs interleave) one more
//! chance.
use std::{hash::BuildHasherDefault, net::SocketAddr};

use tracer_common::data_flags;

use crate::{
    context::{self, ContextHeader, RemoteContext, Trust},
    hashing::{FxHasher, FxMap},
    pairing::{RequestStart, Role, SpanKey},
    spans::random_ids,
};

/// How a parent link was made (`tracer.link.source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Both ends of the connection seen by this agent, same TCP sequence number.
    TcpSeq,
    /// The writing thread was serving exactly one request.
    Thread,
    /// The outgoing request line equals exactly one incoming request in flight.
    ForwardedRequest,
    /// The process had exactly one request in flight.
    SoleRequest,
    /// The outgoing path carries an id found in exactly one incoming request in flight.
    SharedId,
    /// The outgoing request carries the trace context of exactly one incoming request.
    ForwardedHeader,
    /// The caller's `traceparent` header.
    Traceparent,
    /// The caller's B3 headers.
    B3,
}

impl Source {
    /// Every source, in the order of their counters (`AgentStats::links`).
    pub const ALL: [Source; 8] = [
        Source::TcpSeq,
        Source::Thread,
        Source::ForwardedRequest,
        Source::SoleRequest,
        Source::SharedId,
        Source::ForwardedHeader,
        Source::Traceparent,
        Source::B3,
    ];

    pub fn index(self) -> usize {
        Source::ALL.iter().position(|&s| s == self).unwrap_or(0)
    }

    pub fn name(self) -> &'static str {
        match self {
            Source::TcpSeq => "tcp-seq",
            Source::Thread => "thread",
            Source::ForwardedRequest => "forwarded-request",
            Source::SoleRequest => "sole-request",
            Source::SharedId => "shared-id",
            Source::ForwardedHeader => "forwarded-header",
            Source::Traceparent => "traceparent",
            Source::B3 => "b3",
        }
    }
}

/// How sure a link is (`tracer.link.confidence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confidence {
    /// Exact, or a rule that the workloads it was measured on never got wrong.
    High,
    /// Right when the assumption behind it holds (one request at a time; a header not forged
    /// and not forwarded by an untraced proxy).
    Medium,
}

impl Confidence {
    pub fn name(self) -> &'static str {
        match self {
            Confidence::High => "high",
            Confidence::Medium => "medium",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub parent: [u8; 8],
    pub source: Source,
    pub confidence: Confidence,
}

/// A span's final ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub link: Option<Link>,
    /// The trace id of the `traceparent` the probes inserted into this (client) request, if
    /// they did (`--inject-context`).
    pub injected: Option<[u8; 16]>,
    /// What the probes decided for its exchange (`data_flags::DECIDED`, `--sample-in-kernel`).
    pub decided: u32,
}

/// A `traceparent` the probes inserted into a client request (`--inject-context`): the client
/// span takes its span id, and its trace id where the linker has not fixed another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The writing thread made the call while serving its sole request (the trace id is that
    /// request's, as far as the probes could tell).
    pub from_served_request: bool,
}

/// One request on one TCP connection, as both ends can name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub seq: u32,
}

impl Edge {
    /// The edge of a request of this role on a connection with these ends. Addresses are
    /// unmapped (a dual-stack server sees `::ffff:10.0.0.1` where its client sees `10.0.0.1`).
    pub fn of(role: Role, local: SocketAddr, remote: SocketAddr, seq: u32) -> Edge {
        let unmap = |a: SocketAddr| SocketAddr::new(context::unmap(a.ip()), a.port());
        let (client, server) = match role {
            Role::Client => (local, remote),
            Role::Server => (remote, local),
        };
        Edge {
            client: unmap(client),
            server: unmap(server),
            seq,
        }
    }
}

struct SpanState {
    tgid: u32,
    tid: u32,
    role: Role,
    /// `None` until fixed (a server span whose parent is not known yet).
    trace_id: Option<[u8; 16]>,
    link: Option<Link>,
    edge: Option<Edge>,
    /// Hash of the request's method and path, for the forwarded-request rule.
    request_line: u64,
    /// Hashes of the first id-like segments of its path, for the shared-id rule.
    path_ids: [u64; 2],
    /// The context the request came with (servers) or carries (clients).
    context: Option<RemoteContext>,
    /// The trace id the probes put on the wire with this request (`--inject-context`).
    injected: Option<[u8; 16]>,
    created_ns: u64,
    /// `data_flags::DECIDED` of its request's records (`--sample-in-kernel`).
    decided: u32,
}

/// A client request by its edge: what a server span on this host adopts.
#[derive(Clone, Copy)]
struct ClientEdge {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

/// Finished client requests stay adoptable for one to two of these (a server span whose
/// records come after its client's, on another CPU, within the same drain or the next): they
/// move to a generation that is dropped whole, so expiry costs nothing per request (a scan of
/// every entry each tick was 4% of the agent's instructions at 30k requests/s). Every client
/// request is kept so, since its server may be on this host: at a second a generation the
/// agent peaked at 65-70 MiB at saturation (84k requests/s), past its 64 MiB budget.
const CLIENT_EDGE_GENERATION_NS: u64 = 100_000_000;
/// A request never exported (its connection was muted or forgotten) is dropped after this;
/// looked for at most once per `SWEEP_INTERVAL_NS`.
const SPAN_STATE_MAX_AGE_NS: u64 = 600_000_000_000;
const SWEEP_INTERVAL_NS: u64 = 30_000_000_000;

pub struct Linker {
    spans: FxMap<SpanKey, SpanState>,
    /// Server requests read and not yet answered, per process.
    in_flight: FxMap<u32, Vec<SpanKey>>,
    clients: ClientEdges,
    last_sweep_ns: u64,
    trust: Trust,
    /// Calls made while the process served requests, none of which a rule singled out: left
    /// without a parent (`tracer_calls_unattributed_total`).
    pub unattributed: u64,
    /// The injection the probes reported for the next client request of this thread (tid)
    /// whose first byte was written at this time (ns).
    injection: Option<(u32, u64, Injection)>,
    /// Injected calls whose trace the linker had already fixed to another id: what the callee
    /// does under the header lands in the header's trace (`tracer_context_trace_mismatch_total`).
    pub injected_mismatch: u64,
    /// `--sample-in-kernel`: the agent's sampler keeps trace ids whose low 64 bits are below
    /// this. A trace a kept exchange starts gets such an id, so that its spans the probes did
    /// not decide on (other protocols, marked calls) are kept with it.
    pub keep_below: Option<u64>,
}

/// The endpoints of the connection a request came on, and its process.
pub struct ConnView {
    pub tgid: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `data_flags::DECIDED` of the record the request's head was parsed from: what the probes
    /// decided for this exchange (`--sample-in-kernel`; 0 otherwise).
    pub decided: u32,
}

impl Linker {
    pub fn new(trust: Trust) -> Self {
        Linker {
            spans: FxMap::default(),
            in_flight: FxMap::default(),
            clients: ClientEdges::default(),
            last_sweep_ns: 0,
            trust,
            unattributed: 0,
            injection: None,
            injected_mismatch: 0,
            keep_below: None,
        }
    }

    /// The probes inserted a `traceparent` into the request thread `tid` began writing at
    /// `start_ns`: its span takes these ids when its head is parsed (in the same record).
    pub fn expect_injection(&mut self, tid: u32, start_ns: u64, injection: Injection) {
        self.injection = Some((tid, start_ns, injection));
    }

    /// Forgets an injection whose request was not parsed from its record.
    pub fn clear_injection(&mut self) {
        self.injection = None;
    }

    /// A fresh key: the span id (random, never 0; two requests in flight with the same 64-bit
    /// id are as likely as in any OpenTelemetry SDK).
    fn new_key() -> SpanKey {
        crate::spans::random_span_id()
    }

    /// A request's head was parsed: its span's key, and its parent if one can be told now.
    pub fn request(&mut self, conn: &ConnView, role: Role, req: &RequestStart<'_>) -> SpanKey {
        let injected = match self.injection {
            Some((tid, ns, i)) if role == Role::Client && tid == req.tid && ns == req.start_ns => {
                self.injection = None;
                Some(i)
            }
            _ => None,
        };
        let key = match injected {
            Some(i) if !self.spans.contains_key(&u64::from_be_bytes(i.span_id)) => {
                u64::from_be_bytes(i.span_id)
            }
            _ => Self::new_key(),
        };
        let edge = req
            .tcp_seq
            .map(|seq| Edge::of(role, conn.local, conn.remote, seq));
        let request_line = request_line_hash(req.operation, req.target);
        let path_ids = path_id_hashes(req.target);
        let mut state = SpanState {
            tgid: conn.tgid,
            tid: req.tid,
            role,
            trace_id: None,
            link: None,
            edge,
            request_line,
            path_ids,
            context: req.context,
            injected: injected.map(|i| i.trace_id),
            created_ns: req.start_ns,
            decided: conn.decided,
        };
        match role {
            Role::Client => {
                let parent = self.parent_in_process(&state);
                let trace_id = match parent {
                    Some((parent_key, source, confidence)) => {
                        // A parent whose trace is not fixed yet takes the one on the wire.
                        if let Some(i) = injected {
                            if let Some(p) = self.spans.get_mut(&parent_key) {
                                if p.trace_id.is_none() && !adopt_client(&self.clients, p) {
                                    p.trace_id = Some(i.trace_id);
                                }
                            }
                        }
                        let trace_id = self.fix(parent_key);
                        state.link = Some(Link {
                            parent: parent_key.to_be_bytes(),
                            source,
                            confidence,
                        });
                        trace_id
                    }
                    None => {
                        if self
                            .in_flight
                            .get(&conn.tgid)
                            .is_some_and(|v| !v.is_empty())
                        {
                            self.unattributed += 1;
                        }
                        injected.map_or_else(|| self.new_trace_id(&state), |i| i.trace_id)
                    }
                };
                if injected.is_some_and(|i| i.trace_id != trace_id) {
                    self.injected_mismatch += 1;
                }
                state.trace_id = Some(trace_id);
                if let Some(edge) = edge {
                    self.clients.open.insert(
                        edge,
                        ClientEdge {
                            trace_id,
                            span_id: key.to_be_bytes(),
                        },
                    );
                }
            }
            Role::Server => {
                if !adopt_client(&self.clients, &mut state) {
                    if let Some(ctx) = req.context.filter(|_| self.trust.trusts(conn.remote.ip())) {
                        state.trace_id = Some(ctx.trace_id);
                        state.link = Some(Link {
                            parent: ctx.span_id,
                            source: match ctx.header {
                                ContextHeader::Traceparent => Source::Traceparent,
                                ContextHeader::B3 => Source::B3,
                            },
                            confidence: Confidence::Medium,
                        });
                    }
                }
                self.in_flight.entry(conn.tgid).or_default().push(key);
            }
        }
        self.spans.insert(key, state);
        key
    }

    /// The response to a request began: a server request stops being a candidate parent.
    pub fn answered(&mut self, key: SpanKey) {
        let Some(state) = self.spans.get(&key) else {
            return;
        };
        if state.role == Role::Server {
            let tgid = state.tgid;
            self.leave_flight(tgid, key);
        }
    }

    /// The span is exported: its final ids. `None` for a key this linker does not know (0, or
    /// expired), for which the caller draws fresh ids.
    pub fn finish(&mut self, key: SpanKey) -> Option<SpanIds> {
        let mut state = self.spans.remove(&key)?;
        let trace_id = fix_trace_id(&self.clients, &mut state, self.keep_below);
        if state.role == Role::Server {
            self.leave_flight(state.tgid, key);
        } else if let Some(edge) = state.edge {
            self.clients.finish(edge);
        }
        Some(SpanIds {
            trace_id,
            span_id: key.to_be_bytes(),
            link: state.link,
            injected: state.injected,
            decided: state.decided,
        })
    }

    /// Ages out finished client edges (a generation a second) and, every 30 s, requests never
    /// exported.
    pub fn expire(&mut self, now_ns: u64) {
        self.clients.age(now_ns);
        if now_ns.saturating_sub(self.last_sweep_ns) < SWEEP_INTERVAL_NS {
            return;
        }
        self.last_sweep_ns = now_ns;
        let old: Vec<SpanKey> = self
            .spans
            .iter()
            .filter(|(_, s)| now_ns.saturating_sub(s.created_ns) > SPAN_STATE_MAX_AGE_NS)
            .map(|(k, _)| *k)
            .collect();
        for key in old {
            if let Some(state) = self.spans.remove(&key) {
                self.leave_flight(state.tgid, key);
                if let Some(edge) = state.edge {
                    self.clients.open.remove(&edge);
                }
            }
        }
        self.in_flight.retain(|_, v| !v.is_empty());
    }

    /// Requests being followed.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.spans.len()
    }

    fn leave_flight(&mut self, tgid: u32, key: SpanKey) {
        if let Some(list) = self.in_flight.get_mut(&tgid) {
            list.retain(|&k| k != key);
        }
    }

    /// A span's trace id (of a parent about to get a child), fixed now if it was not yet.
    fn fix(&mut self, key: SpanKey) -> [u8; 16] {
        match self.spans.get_mut(&key) {
            Some(state) => fix_trace_id(&self.clients, state, self.keep_below),
            None => random_ids().0,
        }
    }

    /// A new trace's id for the span of `state`.
    fn new_trace_id(&self, state: &SpanState) -> [u8; 16] {
        new_trace_id(state, self.keep_below)
    }

    /// The server request of the same process this client request is made for, if the rules
    /// in the module comment single one out.
    fn parent_in_process(&self, client: &SpanState) -> Option<(SpanKey, Source, Confidence)> {
        let candidates = self.in_flight.get(&client.tgid)?;
        // A call the probes marked was made while requests this agent never saw were in flight
        // (`--sample-in-kernel`): only a header naming its parent cannot be fooled by them.
        let marked = client.decided & data_flags::MARKED != 0;
        let spans = &self.spans;
        let only = |keys: &mut dyn Iterator<Item = SpanKey>| {
            let first = keys.next()?;
            keys.next().is_none().then_some(first)
        };
        if let Some(ctx) = client.context {
            let forwarded = candidates.iter().copied().filter(|k| {
                spans
                    .get(k)
                    .and_then(|s| s.context)
                    .is_some_and(|c| c.trace_id == ctx.trace_id && c.span_id == ctx.span_id)
            });
            if let Some(k) = only(&mut { forwarded }) {
                return Some((k, Source::ForwardedHeader, Confidence::High));
            }
        }
        if marked {
            return None;
        }
        if client.decided & data_flags::BY_LINE != 0 {
            // The probes found one request in flight with this method and path, and none the
            // agent never saw: that one, if its whole request line is the call's.
            let same_line = candidates.iter().copied().filter(|k| {
                spans
                    .get(k)
                    .is_some_and(|s| s.request_line == client.request_line)
            });
            return only(&mut { same_line })
                .map(|k| (k, Source::ForwardedRequest, Confidence::High));
        }
        // No allocation: this runs for every client request.
        let on_thread = |k: &SpanKey| spans.get(k).is_some_and(|s| s.tid == client.tid);
        let mut serving = candidates.iter().filter(|k| on_thread(k));
        let (first, second) = (serving.next(), serving.next());
        if let (Some(&k), None) = (first, second) {
            return Some((k, Source::Thread, Confidence::High));
        }
        // The thread's own requests if it serves any (an event loop), else the process's (a
        // hand-off to a worker thread).
        let thread_serves = first.is_some();
        let in_pool = |k: &SpanKey| !thread_serves || on_thread(k);
        let pool = || candidates.iter().copied().filter(in_pool);
        let same_line = pool().filter(|k| {
            spans
                .get(k)
                .is_some_and(|s| s.request_line == client.request_line)
        });
        if let Some(k) = only(&mut { same_line }) {
            return Some((k, Source::ForwardedRequest, Confidence::High));
        }
        if candidates.len() == 1 {
            return Some((candidates[0], Source::SoleRequest, Confidence::Medium));
        }
        let ids = client.path_ids;
        if ids[0] != 0 {
            let sharing = pool().filter(|k| {
                spans.get(k).is_some_and(|s| {
                    s.path_ids
                        .iter()
                        .any(|&id| id != 0 && (id == ids[0] || id == ids[1]))
                })
            });
            if let Some(k) = only(&mut { sharing }) {
                return Some((k, Source::SharedId, Confidence::Medium));
            }
        }
        None
    }
}

/// Hashes (never 0) of the first two path segments that look like ids, as span names template
/// them (`spans::is_id_segment`); zeros where there are fewer.
fn path_id_hashes(path: &str) -> [u64; 2] {
    use std::hash::BuildHasher as _;
    let hasher = BuildHasherDefault::<FxHasher>::default();
    let mut out = [0u64; 2];
    let ids = crate::protocol::http::path_segments(path)
        .filter(|seg| crate::protocol::http::is_id_segment(seg));
    for (slot, seg) in out.iter_mut().zip(ids) {
        *slot = hasher.hash_one(seg) | 1;
    }
    out
}

/// Client requests by edge, for their server spans on this host to adopt: open ones, then
/// finished ones of this and the last generation.
#[derive(Default)]
struct ClientEdges {
    open: FxMap<Edge, ClientEdge>,
    finished: FxMap<Edge, ClientEdge>,
    finished_before: FxMap<Edge, ClientEdge>,
    generation_start_ns: u64,
}

impl ClientEdges {
    fn get(&self, edge: &Edge) -> Option<&ClientEdge> {
        self.open
            .get(edge)
            .or_else(|| self.finished.get(edge))
            .or_else(|| self.finished_before.get(edge))
    }

    /// The client span was exported: adoptable for one or two more generations.
    fn finish(&mut self, edge: Edge) {
        if let Some(c) = self.open.remove(&edge) {
            self.finished.insert(edge, c);
        }
    }

    /// Starts a new generation every `CLIENT_EDGE_GENERATION_NS`, dropping the oldest whole.
    /// The dropped generation's table is cleared and reused: a fresh one regrew through a dozen
    /// rehashes and page faults each generation at saturation (~3% of the agent's CPU, perf).
    /// It is shrunk when it had room for over four times what the last generation held, so a
    /// burst's tables do not stay.
    fn age(&mut self, now_ns: u64) {
        if now_ns.saturating_sub(self.generation_start_ns) >= CLIENT_EDGE_GENERATION_NS {
            std::mem::swap(&mut self.finished_before, &mut self.finished);
            self.finished.clear();
            let needed = self.finished_before.len();
            if self.finished.capacity() > 4 * needed.max(1024) {
                self.finished.shrink_to(needed);
            }
            self.generation_start_ns = now_ns;
        }
    }
}

/// A span's trace id, drawn now if nothing decided it yet (a server span: after one more look
/// for its client on this host).
fn fix_trace_id(clients: &ClientEdges, state: &mut SpanState, keep_below: Option<u64>) -> [u8; 16] {
    if state.trace_id.is_none() && !adopt_client(clients, state) {
        state.trace_id = Some(new_trace_id(state, keep_below));
    }
    state.trace_id.unwrap_or_default()
}

/// A random trace id; one the agent's sampler keeps when the probes kept this span's exchange
/// (`--sample-in-kernel`): its low 64 bits brought below the sampler's bound.
fn new_trace_id(state: &SpanState, keep_below: Option<u64>) -> [u8; 16] {
    let mut id = random_ids().0;
    if let Some(bound) = keep_below.filter(|&b| b > 0) {
        if state.decided & data_flags::KEPT != 0 {
            let low = u64::from_be_bytes(id[8..].try_into().unwrap_or_default()) % bound;
            id[8..].copy_from_slice(&low.to_be_bytes());
        }
    }
    id
}

/// A server request takes its client's trace as the child of the client span, when this host
/// saw the client write the same bytes.
fn adopt_client(clients: &ClientEdges, state: &mut SpanState) -> bool {
    let Some(client) = state.edge.and_then(|e| clients.get(&e)) else {
        return false;
    };
    state.trace_id = Some(client.trace_id);
    state.link = Some(Link {
        parent: client.span_id,
        source: Source::TcpSeq,
        confidence: Confidence::High,
    });
    true
}

fn request_line_hash(method: &str, path: &str) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut h = BuildHasherDefault::<FxHasher>::default().build_hasher();
    method.hash(&mut h);
    path.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NGINX: u32 = 100;

    fn view(tgid: u32, local: &str, remote: &str) -> ConnView {
        ConnView {
            tgid,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            decided: 0,
        }
    }

    fn start<'a>(
        tid: u32,
        seq: Option<u32>,
        path: &'a str,
        context: Option<RemoteContext>,
    ) -> RequestStart<'a> {
        RequestStart {
            tid,
            tcp_seq: seq,
            start_ns: 1,
            operation: "GET",
            target: path,
            context,
        }
    }

    fn text(path: &str) -> String {
        path.to_owned()
    }

    /// A call the probes put a `traceparent` into takes the header's span id; its parent, if
    /// its trace is not fixed yet, takes the header's trace id; a parent already in another
    /// trace keeps it, and the span says which trace the header named.
    #[test]
    fn injected_calls_take_the_headers_ids() {
        let mut l = Linker::new(Trust::All);
        let inbound = view(7, "10.0.0.2:80", "10.0.0.1:4000");
        let outbound = view(7, "10.0.0.2:5000", "10.0.0.3:80");
        let inj = |t: u8, s: u8| Injection {
            trace_id: [t; 16],
            span_id: [s; 8],
            from_served_request: true,
        };
        // A plain client: the header's trace and span.
        l.expect_injection(9, 1, inj(1, 2));
        let root = l.request(&outbound, Role::Client, &start(9, None, "/x", None));
        let ids = l.finish(root).unwrap();
        assert_eq!((ids.trace_id, ids.span_id), ([1; 16], [2; 8]));
        assert_eq!(ids.injected, Some([1; 16]));
        assert!(ids.link.is_none());

        // Thread per request: the served request takes the header's trace.
        let a = l.request(&inbound, Role::Server, &start(71, Some(1), "/a", None));
        l.expect_injection(71, 1, inj(3, 4));
        let call = l.request(&outbound, Role::Client, &start(71, Some(5), "/db", None));
        let call_ids = l.finish(call).unwrap();
        let a_ids = l.finish(a).unwrap();
        assert_eq!(call_ids.span_id, [4; 8]);
        assert_eq!(call_ids.link.unwrap().parent, a_ids.span_id);
        assert_eq!((call_ids.trace_id, a_ids.trace_id), ([3; 16], [3; 16]));
        assert_eq!(l.injected_mismatch, 0);

        // The served request's trace is fixed already (an earlier call): kept, mismatch said.
        let b = l.request(&inbound, Role::Server, &start(72, Some(9), "/b", None));
        let first = l.request(&outbound, Role::Client, &start(72, Some(6), "/db", None));
        l.expect_injection(72, 1, inj(5, 6));
        let second = l.request(&outbound, Role::Client, &start(72, Some(7), "/db", None));
        let (first, second, b) = (
            l.finish(first).unwrap(),
            l.finish(second).unwrap(),
            l.finish(b).unwrap(),
        );
        assert_eq!(second.span_id, [6; 8]);
        assert_eq!(second.trace_id, b.trace_id);
        assert_eq!(first.trace_id, b.trace_id);
        assert_ne!(second.trace_id, [5; 16]);
        assert_eq!(second.injected, Some([5; 16]));
        assert_eq!(l.injected_mismatch, 1);

        // An injection is used only by the request of the same thread and start.
        l.expect_injection(9, 2, inj(7, 8));
        let other = l.request(&outbound, Role::Client, &start(9, None, "/y", None));
        let other = l.finish(other).unwrap();
        assert_ne!(other.span_id, [8; 8]);
        assert_eq!(other.injected, None);
    }

    /// A thread serving one request: its outgoing call is that request's child.
    #[test]
    fn thread_per_request() {
        let mut l = Linker::new(Trust::All);
        let inbound = view(7, "10.0.0.2:80", "10.0.0.1:4000");
        let outbound = view(7, "10.0.0.2:5000", "10.0.0.3:80");
        let a = l.request(
            &inbound,
            Role::Server,
            &start(71, Some(1), &text("/a"), None),
        );
        let b = l.request(
            &inbound,
            Role::Server,
            &start(72, Some(9), &text("/b"), None),
        );
        let call_b = l.request(
            &outbound,
            Role::Client,
            &start(72, Some(5), &text("/db"), None),
        );
        let call_a = l.request(
            &outbound,
            Role::Client,
            &start(71, Some(6), &text("/db"), None),
        );
        let ids_b = l.finish(call_b).unwrap();
        let ids_a = l.finish(call_a).unwrap();
        let server_a = l.finish(a).unwrap();
        let server_b = l.finish(b).unwrap();
        let link = ids_a.link.unwrap();
        assert_eq!(link.parent, server_a.span_id);
        assert_eq!(
            (link.source, link.confidence),
            (Source::Thread, Confidence::High)
        );
        assert_eq!(ids_a.trace_id, server_a.trace_id);
        assert_eq!(ids_b.link.unwrap().parent, server_b.span_id);
        assert_eq!(ids_b.trace_id, server_b.trace_id);
        assert_ne!(server_a.trace_id, server_b.trace_id);
    }

    /// One event-loop thread with several requests in flight: only a request line that matches
    /// exactly one of them links; otherwise nothing (never a guess).
    #[test]
    fn event_loop_links_forwarded_request_lines_only() {
        let mut l = Linker::new(Trust::All);
        let down = view(NGINX, "10.0.0.2:80", "10.0.0.1:4000");
        let up = view(NGINX, "10.0.0.2:5000", "10.0.0.3:80");
        let x = l.request(&down, Role::Server, &start(1, None, &text("/x"), None));
        let _y1 = l.request(&down, Role::Server, &start(1, None, &text("/y"), None));
        let _y2 = l.request(&down, Role::Server, &start(1, None, &text("/y"), None));
        let to_x = l.request(&up, Role::Client, &start(1, None, &text("/x"), None));
        let to_y = l.request(&up, Role::Client, &start(1, None, &text("/y"), None));
        let to_z = l.request(&up, Role::Client, &start(1, None, &text("/z"), None));
        let x_ids = l.finish(x).unwrap();
        let link = l.finish(to_x).unwrap().link.unwrap();
        assert_eq!(link.parent, x_ids.span_id);
        assert_eq!(link.source, Source::ForwardedRequest);
        assert_eq!(l.finish(to_y).unwrap().link, None, "two /y in flight");
        assert_eq!(l.finish(to_z).unwrap().link, None);
        assert_eq!(l.unattributed, 2);
    }

    /// `--sample-in-kernel`: a call the probes marked (its process also served requests this
    /// agent never saw) is linked by no rule those could fool: not by its thread, its request
    /// line or the sole request in sight; only by a header naming its parent.
    #[test]
    fn marked_calls_link_only_by_a_forwarded_header() {
        let mut l = Linker::new(Trust::All);
        let down = view(NGINX, "10.0.0.2:80", "10.0.0.1:4000");
        let mut up = view(NGINX, "10.0.0.2:5000", "10.0.0.3:80");
        up.decided = data_flags::RED_COUNTED | data_flags::MARKED;
        let ctx = RemoteContext {
            trace_id: [7; 16],
            span_id: [8; 8],
            header: ContextHeader::Traceparent,
        };
        let x = l.request(&down, Role::Server, &start(1, None, &text("/x"), Some(ctx)));
        // Same thread, same request line, the sole request in flight: all unusable here.
        let guessed = l.request(&up, Role::Client, &start(1, None, &text("/x"), None));
        let forwarded = l.request(&up, Role::Client, &start(1, None, &text("/x"), Some(ctx)));
        let x_ids = l.finish(x).unwrap();
        assert_eq!(l.finish(guessed).unwrap().link, None);
        let link = l.finish(forwarded).unwrap().link.unwrap();
        assert_eq!(
            (link.parent, link.source),
            (x_ids.span_id, Source::ForwardedHeader)
        );
    }

    /// `--sample-in-kernel`: a call the probes kept because one request in flight had its
    /// method and path (`BY_LINE`) is linked by its request line only: not by its thread or
    /// the sole request in sight, which requests the agent never saw could make wrong.
    #[test]
    fn calls_kept_by_their_line_link_by_that_line_only() {
        let mut l = Linker::new(Trust::All);
        let down = view(NGINX, "10.0.0.2:80", "10.0.0.1:4000");
        let mut up = view(NGINX, "10.0.0.2:5000", "10.0.0.3:80");
        up.decided = data_flags::RED_COUNTED | data_flags::KEPT | data_flags::BY_LINE;
        let x = l.request(&down, Role::Server, &start(1, None, &text("/x"), None));
        // The sole request in flight, on the same thread, but another line: no link.
        let other = l.request(&up, Role::Client, &start(1, None, &text("/y"), None));
        let forwarded = l.request(&up, Role::Client, &start(1, None, &text("/x"), None));
        let x_ids = l.finish(x).unwrap();
        assert_eq!(l.finish(other).unwrap().link, None);
        let link = l.finish(forwarded).unwrap().link.unwrap();
        assert_eq!(
            (link.parent, link.source),
            (x_ids.span_id, Source::ForwardedRequest)
        );
    }

    /// `--sample-in-kernel`: a trace a kept exchange starts gets an id the agent's sampler keeps
    /// (so the spans in it the probes did not decide on are kept too); others are drawn freely.
    #[test]
    fn kept_exchanges_start_traces_the_sampler_keeps() {
        let mut l = Linker::new(Trust::All);
        let bound = u64::MAX / 100;
        l.keep_below = Some(bound);
        let mut kept = view(NGINX, "10.0.0.2:80", "10.0.0.1:4000");
        kept.decided = data_flags::RED_COUNTED | data_flags::KEPT;
        let free = view(NGINX, "10.0.0.2:81", "10.0.0.1:4001");
        let low = |ids: SpanIds| u64::from_be_bytes(ids.trace_id[8..].try_into().unwrap());
        let mut above = 0;
        for _ in 0..200 {
            let k = l.request(&kept, Role::Server, &start(1, None, &text("/k"), None));
            let ids = l.finish(k).unwrap();
            assert_eq!(ids.decided, kept.decided);
            assert!(low(ids) < bound);
            let c = l.request(&kept, Role::Client, &start(2, None, &text("/c"), None));
            assert!(low(l.finish(c).unwrap()) < bound);
            let f = l.request(&free, Role::Server, &start(3, None, &text("/f"), None));
            above += usize::from(low(l.finish(f).unwrap()) >= bound);
        }
        assert!(above > 150, "{above} of 200 free ids above the bound");
    }

    /// Answered requests are no longer candidates; a process with one request in flight links
    /// a call made from another thread, at medium confidence.
    #[test]
    fn sole_request_and_answered() {
        let mut l = Linker::new(Trust::All);
        let inbound = view(9, "10.0.0.2:80", "10.0.0.1:4000");
        let outbound = view(9, "10.0.0.2:5000", "10.0.0.3:80");
        let a = l.request(&inbound, Role::Server, &start(1, None, &text("/a"), None));
        let call = l.request(&outbound, Role::Client, &start(2, None, &text("/db"), None));
        let link = l.finish(call).unwrap().link.unwrap();
        assert_eq!(
            (link.source, link.confidence),
            (Source::SoleRequest, Confidence::Medium)
        );
        l.answered(a);
        let late = l.request(&outbound, Role::Client, &start(1, None, &text("/db"), None));
        assert_eq!(l.finish(late).unwrap().link, None);
    }

    /// Both ends on this host: the server span is the client span's child, whichever of the
    /// two requests was parsed first.
    #[test]
    fn same_host_edge_by_sequence_number() {
        let mut l = Linker::new(Trust::All);
        let client = view(1, "127.0.0.1:4000", "127.0.0.1:80");
        let server = view(2, "127.0.0.1:80", "127.0.0.1:4000");
        let c = l.request(&client, Role::Client, &start(1, Some(77), &text("/"), None));
        let s = l.request(&server, Role::Server, &start(2, Some(77), &text("/"), None));
        let other = l.request(&server, Role::Server, &start(2, Some(78), &text("/"), None));
        let s_ids = l.finish(s).unwrap();
        let c_ids = l.finish(c).unwrap();
        let link = s_ids.link.unwrap();
        assert_eq!((link.parent, link.source), (c_ids.span_id, Source::TcpSeq));
        assert_eq!(s_ids.trace_id, c_ids.trace_id);
        assert_eq!(l.finish(other).unwrap().link, None);

        // The server's request parsed before the client's: adopted when its id is needed.
        let s = l.request(
            &server,
            Role::Server,
            &start(2, Some(500), &text("/"), None),
        );
        let c = l.request(
            &client,
            Role::Client,
            &start(1, Some(500), &text("/"), None),
        );
        let s_ids = l.finish(s).unwrap();
        assert_eq!(s_ids.link.unwrap().parent, c.to_be_bytes());
        // A mapped IPv6 address names the same edge.
        assert_eq!(
            Edge::of(
                Role::Server,
                "[::ffff:127.0.0.1]:80".parse().unwrap(),
                "[::ffff:127.0.0.1]:4000".parse().unwrap(),
                5
            ),
            Edge::of(
                Role::Client,
                "127.0.0.1:4000".parse().unwrap(),
                "127.0.0.1:80".parse().unwrap(),
                5
            ),
        );
    }

    /// An incoming traceparent is honoured from trusted peers only, and a proxy's outgoing
    /// request that forwards it is the child of the request it came with.
    #[test]
    fn traceparent_trust_and_forwarding() {
        let ctx =
            context::parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let mut l = Linker::new(Trust::parse("10.0.0.0/8").unwrap());
        let trusted = view(5, "10.0.0.2:80", "10.0.0.1:4000");
        let outsider = view(5, "10.0.0.2:80", "192.0.2.1:4000");
        let up = view(5, "10.0.0.2:5000", "10.0.0.3:80");
        let s = l.request(&trusted, Role::Server, &start(1, None, &text("/a"), ctx));
        let _other = l.request(&trusted, Role::Server, &start(1, None, &text("/a"), None));
        let fwd = l.request(&up, Role::Client, &start(1, None, &text("/a"), ctx));
        let s_ids = l.finish(s).unwrap();
        let link = s_ids.link.unwrap();
        assert_eq!(s_ids.trace_id, ctx.unwrap().trace_id);
        assert_eq!(
            (link.parent, link.source),
            (ctx.unwrap().span_id, Source::Traceparent)
        );
        let f = l.finish(fwd).unwrap();
        assert_eq!(f.link.unwrap().parent, s_ids.span_id);
        assert_eq!(f.link.unwrap().source, Source::ForwardedHeader);
        let forged = l.request(&outsider, Role::Server, &start(1, None, &text("/a"), ctx));
        let forged = l.finish(forged).unwrap();
        assert_eq!(forged.link, None);
        assert_ne!(forged.trace_id, ctx.unwrap().trace_id);
    }

    /// An event loop calling elsewhere with an id from the request it serves: linked when the
    /// id is in exactly one request in flight, at medium confidence.
    #[test]
    fn shared_ids_in_paths() {
        let mut l = Linker::new(Trust::All);
        let down = view(3, "10.0.0.2:80", "10.0.0.1:4000");
        let up = view(3, "10.0.0.2:5000", "10.0.0.3:80");
        let a = l.request(
            &down,
            Role::Server,
            &start(1, None, &text("/api/r-1234"), None),
        );
        let _b = l.request(
            &down,
            Role::Server,
            &start(1, None, &text("/api/r-5678"), None),
        );
        let _c = l.request(
            &down,
            Role::Server,
            &start(1, None, &text("/api/4242"), None),
        );
        let _d = l.request(
            &down,
            Role::Server,
            &start(1, None, &text("/other/4242"), None),
        );
        let call = l.request(
            &up,
            Role::Client,
            &start(1, None, &text("/data/r-1234"), None),
        );
        let twice = l.request(
            &up,
            Role::Client,
            &start(1, None, &text("/data/4242"), None),
        );
        let none = l.request(
            &up,
            Role::Client,
            &start(1, None, &text("/data/list"), None),
        );
        let a_ids = l.finish(a).unwrap();
        let link = l.finish(call).unwrap().link.unwrap();
        assert_eq!(link.parent, a_ids.span_id);
        assert_eq!(
            (link.source, link.confidence),
            (Source::SharedId, Confidence::Medium)
        );
        assert_eq!(
            l.finish(twice).unwrap().link,
            None,
            "4242 is in two requests"
        );
        assert_eq!(l.finish(none).unwrap().link, None);
    }

    /// A finished client stays adoptable for one to two generations, then is gone; requests
    /// never exported go at the next sweep after their maximum age.
    #[test]
    fn expiry_forgets_old_state() {
        let mut l = Linker::new(Trust::All);
        let client = view(1, "127.0.0.1:4000", "127.0.0.1:80");
        let server = view(2, "127.0.0.1:80", "127.0.0.1:4000");
        let c = l.request(&client, Role::Client, &start(1, Some(1), &text("/"), None));
        let c_ids = l.finish(c).unwrap();
        l.expire(CLIENT_EDGE_GENERATION_NS);
        let late = l.request(&server, Role::Server, &start(2, Some(1), &text("/"), None));
        assert_eq!(l.finish(late).unwrap().link.unwrap().parent, c_ids.span_id);
        l.expire(2 * CLIENT_EDGE_GENERATION_NS);
        let too_late = l.request(&server, Role::Server, &start(2, Some(1), &text("/"), None));
        assert_eq!(l.finish(too_late).unwrap().link, None);

        let s = l.request(&client, Role::Server, &start(1, None, &text("/"), None));
        assert_eq!(l.len(), 1);
        l.expire(SPAN_STATE_MAX_AGE_NS);
        assert_eq!(l.len(), 1, "swept at most every 30 s");
        l.expire(SPAN_STATE_MAX_AGE_NS + SWEEP_INTERVAL_NS);
        assert_eq!(l.len(), 0);
        assert!(l.finish(s).is_none());
        assert!(l.in_flight.is_empty());
    }

    /// Generations reuse their tables, but a burst's do not stay once traffic falls.
    #[test]
    fn client_generations_reuse_and_then_shrink_their_tables() {
        let mut clients = ClientEdges::default();
        let edge = |seq: u32| Edge {
            client: "127.0.0.1:4000".parse().unwrap(),
            server: "127.0.0.1:80".parse().unwrap(),
            seq,
        };
        let finish_many = |clients: &mut ClientEdges, n: u32| {
            for seq in 0..n {
                clients.open.insert(
                    edge(seq),
                    ClientEdge {
                        trace_id: [1; 16],
                        span_id: [1; 8],
                    },
                );
                clients.finish(edge(seq));
            }
        };
        let mut now = 0;
        let mut age = |clients: &mut ClientEdges| {
            now += CLIENT_EDGE_GENERATION_NS;
            clients.age(now);
        };
        finish_many(&mut clients, 50_000);
        age(&mut clients);
        finish_many(&mut clients, 50_000);
        let burst = clients.finished.capacity();
        age(&mut clients);
        assert!(clients.finished.is_empty());
        assert_eq!(
            clients.finished.capacity(),
            burst,
            "the dropped generation's table is reused"
        );
        assert!(
            clients.get(&edge(7)).is_some(),
            "the last generation is still adoptable"
        );
        for _ in 0..3 {
            finish_many(&mut clients, 10);
            age(&mut clients);
        }
        let held = clients.finished.capacity() + clients.finished_before.capacity();
        assert!(held < 10_000, "{held} entries' room held after the burst");
    }
}
