//! Stitching across hosts, through the real collector binary and store: OTLP from several
//! "hosts" (resources with their own `host.id`), read back through the query API as one trace
//! per request, with the parents, trace id, clock corrections, warnings and completeness the
//! query-side contract promises.
mod support;

use std::collections::HashMap;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value::Value as Any,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message as _;
use serde_json::Value;
use support::*;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;

/// A host: its agent's resource facts.
#[derive(Clone, Copy)]
struct Host {
    name: &'static str,
    id: &'static str,
}

const A: Host = Host {
    name: "host-a",
    id: "id-a",
};
const B: Host = Host {
    name: "host-b",
    id: "id-b",
};
const C: Host = Host {
    name: "host-c",
    id: "id-c",
};
const D: Host = Host {
    name: "host-d",
    id: "id-d",
};

fn tid(n: u8) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[0] = 0xab;
    t[15] = n;
    t
}

fn sid(n: u8) -> [u8; 8] {
    [0x10, 0, 0, 0, 0, 0, 0, n]
}

/// A span as an agent sends it. `edge` adds `tracer.tcp.edge` and `tracer.tcp.seq` (the
/// number after `#`); `link` adds the agent's `tracer.link.source` / `confidence`.
struct S {
    trace: u8,
    id: u8,
    parent: Option<u8>,
    kind: i32,
    name: &'static str,
    start: u64,
    dur_us: u64,
    edge: Option<String>,
    link: Option<(&'static str, &'static str)>,
    /// A parent in another (stored) trace: a forwarded `traceparent`.
    parent_in: Option<u8>,
    ints: Vec<(&'static str, i64)>,
}

impl S {
    fn new(trace: u8, id: u8, kind: i32, name: &'static str, start: u64, dur_us: u64) -> S {
        S {
            trace,
            id,
            parent: None,
            kind,
            name,
            start,
            dur_us,
            edge: None,
            link: None,
            parent_in: None,
            ints: Vec::new(),
        }
    }
    fn int(mut self, key: &'static str, v: i64) -> S {
        self.ints.push((key, v));
        self
    }
    fn parent(mut self, p: u8) -> S {
        self.parent = Some(p);
        self
    }
    fn edge(mut self, e: &str) -> S {
        self.edge = Some(e.into());
        self
    }
    fn link(mut self, source: &'static str, confidence: &'static str) -> S {
        self.link = Some((source, confidence));
        self
    }

    fn otlp(&self) -> Span {
        let mut attributes = vec![
            kv("http.request.method", s("GET")),
            kv("url.path", s(self.name.trim_start_matches("GET "))),
        ];
        if let Some(e) = &self.edge {
            let seq: i64 = e.rsplit('#').next().unwrap().parse().unwrap();
            attributes.push(kv("tracer.tcp.edge", s(e)));
            attributes.push(kv("tracer.tcp.seq", Any::IntValue(seq)));
        }
        for (k, v) in &self.ints {
            attributes.push(kv(k, Any::IntValue(*v)));
        }
        if let Some((src, conf)) = self.link {
            attributes.push(kv("tracer.link.source", s(src)));
            attributes.push(kv("tracer.link.confidence", s(conf)));
        }
        Span {
            trace_id: tid(self.trace).to_vec(),
            span_id: sid(self.id).to_vec(),
            parent_span_id: self
                .parent
                .or(self.parent_in)
                .map(|p| sid(p).to_vec())
                .unwrap_or_default(),
            name: self.name.into(),
            kind: self.kind,
            start_time_unix_nano: self.start,
            end_time_unix_nano: self.start + self.dur_us * 1000,
            attributes,
            ..Default::default()
        }
    }
}

/// Posts `spans` as one batch from `service` on `host`.
async fn post(c: &Collector, host: Host, service: &str, spans: &[S]) {
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s(service)),
                    kv("host.name", s(host.name)),
                    kv("host.id", s(host.id)),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: spans.iter().map(S::otlp).collect(),
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    };
    let resp = reqwest::Client::new()
        .post(c.http_url())
        .header("content-type", "application/x-protobuf")
        .body(req.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
}

/// One span of a trace as the query API shows it.
#[derive(Debug)]
struct Shown {
    trace: String,
    parent: Option<String>,
    service: String,
    start: u64,
    dur: u64,
    tags: HashMap<String, Value>,
    warnings: Vec<String>,
}

/// A trace from the query API: the JSON and its spans by span id.
struct Trace {
    json: Value,
    spans: HashMap<String, Shown>,
}

impl Trace {
    fn from_json(json: Value) -> Trace {
        let procs = json["processes"].clone();
        let spans = json["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sp| {
                // Left out when empty, as Jaeger does.
                let no_refs = Vec::new();
                let refs = sp["references"].as_array().unwrap_or(&no_refs);
                assert!(refs.len() <= 1, "one parent at most: {sp}");
                let parent = refs.first().map(|r| {
                    assert_eq!(r["traceID"], json["traceID"], "parents are in the trace");
                    r["spanID"].as_str().unwrap().to_owned()
                });
                let tags = sp["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| (t["key"].as_str().unwrap().to_owned(), t["value"].clone()))
                    .collect();
                let warnings = sp["warnings"]
                    .as_array()
                    .map(|w| w.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                let service = procs[sp["processID"].as_str().unwrap()]["serviceName"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                (
                    sp["spanID"].as_str().unwrap().to_owned(),
                    Shown {
                        trace: sp["traceID"].as_str().unwrap().to_owned(),
                        parent,
                        service,
                        start: sp["startTime"].as_u64().unwrap(),
                        dur: sp["duration"].as_u64().unwrap(),
                        tags,
                        warnings,
                    },
                )
            })
            .collect();
        Trace { json, spans }
    }

    fn id(&self) -> &str {
        self.json["traceID"].as_str().unwrap()
    }

    fn span(&self, id: u8) -> &Shown {
        self.spans
            .get(&hex::encode(sid(id)))
            .unwrap_or_else(|| panic!("span {id} not in the trace: {:#}", self.json))
    }

    fn parent_of(&self, id: u8) -> Option<u8> {
        self.span(id)
            .parent
            .as_ref()
            .map(|p| hex::decode(p).unwrap()[7])
    }

    fn tag(&self, id: u8, key: &str) -> Option<&Value> {
        self.span(id).tags.get(key)
    }

    fn incomplete(&self) -> bool {
        self.json["incomplete"].as_bool().unwrap()
    }

    fn reasons(&self) -> Vec<String> {
        self.json["incompleteReasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    }

    fn warnings(&self) -> Vec<String> {
        self.json["warnings"]
            .as_array()
            .map(|w| w.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    /// Every span's trace id is the trace's; no child starts before or ends after its parent.
    fn assert_consistent(&self) {
        for (id, s) in &self.spans {
            assert_eq!(s.trace, self.id(), "span {id}");
            if let Some(p) = &s.parent {
                let p = &self.spans[p];
                assert!(
                    s.start >= p.start && s.start + s.dur <= p.start + p.dur,
                    "span {id} ({} {}+{}) is not inside its parent ({} {}+{})",
                    s.service,
                    s.start,
                    s.dur,
                    p.service,
                    p.start,
                    p.dur
                );
            }
        }
    }
}

async fn trace(c: &Collector, t: u8) -> Trace {
    let (status, body) = c.get(&format!("/api/traces/{}", hex::encode(tid(t)))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    Trace::from_json(body["data"][0].clone())
}

/// A base time a minute ago (inside the API's default search window), on a millisecond.
fn base() -> u64 {
    (now_nanos() - 60_000_000_000) / 1_000_000 * 1_000_000
}

const MS: u64 = 1_000_000;

fn edge(client: &str, server: &str, seq: u32) -> String {
    format!("{client}>{server}#{seq}")
}

#[tokio::test]
async fn keep_alive_requests_join_their_own_server_halves_arriving_first() {
    let c = Collector::start("stitch-keepalive", &[]);
    let t0 = base();
    let conn = |seq| edge("10.200.0.1:40312", "10.200.0.2:8080", seq);
    // Three requests on one connection, close together: only the sequence numbers tell them
    // apart. The server halves arrive first, in their own batch, in another order.
    let seqs = [2_718_281_828u32, 2_718_281_906, 2_718_281_984];
    let servers: Vec<S> = [2usize, 0, 1]
        .iter()
        .map(|&i| {
            S::new(
                10 + i as u8,
                20 + i as u8,
                SERVER,
                "GET /item",
                t0 + i as u64 * MS + 200_000,
                500,
            )
            .edge(&conn(seqs[i]))
        })
        .collect();
    post(&c, B, "api", &servers).await;
    for i in 0..3u8 {
        let client = S::new(
            i + 1,
            i + 1,
            CLIENT,
            "GET /item",
            t0 + u64::from(i) * MS,
            900,
        )
        .edge(&conn(seqs[i as usize]));
        post(&c, A, "web", &[client]).await;
    }
    for i in 0..3u8 {
        let t = trace(&c, i + 1).await;
        assert_eq!(t.id(), hex::encode(tid(i + 1)), "the root's trace id");
        assert_eq!(t.spans.len(), 2, "{:#}", t.json);
        assert_eq!(t.parent_of(20 + i), Some(i + 1));
        assert_eq!(t.parent_of(i + 1), None);
        let tag = |k| t.tag(20 + i, k).and_then(Value::as_str).map(str::to_owned);
        assert_eq!(tag("tracer.link.source").as_deref(), Some("tcp-seq"));
        assert_eq!(tag("tracer.link.confidence").as_deref(), Some("high"));
        assert_eq!(tag("tracer.link.by").as_deref(), Some("collector"));
        assert_eq!(tag("tracer.link.replaced"), None);
        assert_eq!(
            tag("tracer.trace_id.original"),
            Some(hex::encode(tid(10 + i)))
        );
        assert_eq!(t.tag(i + 1, "tracer.trace_id.original"), None);
        assert!(!t.incomplete(), "{:?}", t.reasons());
        t.assert_consistent();
        // Asked for by the server half's stored trace id: the same stitched trace.
        let again = trace(&c, 10 + i).await;
        assert_eq!(again.id(), t.id());
        assert_eq!(again.spans.len(), 2);
    }

    // Searches return each stitched trace once, under its root's id, whichever half matched.
    for q in ["service=api", "service=web", "lookback=2h"] {
        let (status, body) = c.get(&format!("/api/traces?{q}&limit=20")).await;
        assert_eq!(status, 200, "{body}");
        let mut ids: Vec<String> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(t["spans"].as_array().unwrap().len(), 2, "{q}: {t}");
                t["traceID"].as_str().unwrap().to_owned()
            })
            .collect();
        ids.sort();
        let want: Vec<String> = (1..=3).map(|i| hex::encode(tid(i))).collect();
        assert_eq!(ids, want, "{q}");
    }
    // The limit counts stitched traces (six stored traces, three stitched).
    let (_, body) = c.get("/api/traces?service=api&limit=2").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let (_, body) = c.get("/api/traces?lookback=2h&limit=3").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    // The service map has the cross-host edge.
    let (_, deps) = c.get("/api/dependencies").await;
    let edges: Vec<(String, String, u64)> = deps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["parent"].as_str().unwrap().into(),
                d["child"].as_str().unwrap().into(),
                d["callCount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(edges, vec![("web".into(), "api".into(), 3)]);
}

#[tokio::test]
async fn a_three_hop_chain_across_three_hosts_is_one_trace() {
    let c = Collector::start("stitch-chain", &[]);
    let t0 = base();
    let e1 = edge("10.200.0.1:50000", "10.200.0.2:80", 1000);
    let e2 = edge("10.200.0.2:50001", "10.200.0.3:8080", 2000);
    let e3 = edge("10.200.0.3:50002", "10.200.0.1:5432", 3000);
    // Each host's spans in its own stored trace, sent in the order they'd arrive: innermost
    // first.
    post(
        &c,
        A,
        "data",
        &[S::new(4, 7, SERVER, "GET /row", t0 + 4 * MS, 1000).edge(&e3)],
    )
    .await;
    post(
        &c,
        C,
        "service",
        &[
            S::new(3, 5, SERVER, "GET /api", t0 + 2 * MS, 5000).edge(&e2),
            S::new(3, 6, CLIENT, "GET /row", t0 + 3 * MS + 500_000, 2000)
                .parent(5)
                .edge(&e3)
                .link("thread", "medium"),
        ],
    )
    .await;
    post(
        &c,
        B,
        "proxy",
        &[
            S::new(2, 3, SERVER, "GET /api", t0 + MS, 7000).edge(&e1),
            S::new(2, 4, CLIENT, "GET /api", t0 + MS + 500_000, 6000)
                .parent(3)
                .edge(&e2)
                .link("forwarded-request", "medium"),
        ],
    )
    .await;
    post(
        &c,
        A,
        "curl",
        &[S::new(1, 1, CLIENT, "GET /api", t0, 9000).edge(&e1)],
    )
    .await;
    for asked in [1, 2, 3, 4] {
        let t = trace(&c, asked).await;
        assert_eq!(t.id(), hex::encode(tid(1)), "asked for {asked}");
        assert_eq!(t.spans.len(), 6);
        let parents: Vec<Option<u8>> = [1, 3, 4, 5, 6, 7].map(|s| t.parent_of(s)).to_vec();
        assert_eq!(
            parents,
            vec![None, Some(1), Some(3), Some(4), Some(5), Some(6)]
        );
        // Agent links keep their provenance, marked as the agent's.
        assert_eq!(t.tag(6, "tracer.link.source").unwrap(), "thread");
        assert_eq!(t.tag(6, "tracer.link.by").unwrap(), "agent");
        assert_eq!(t.tag(4, "tracer.link.by").unwrap(), "agent");
        assert_eq!(t.tag(7, "tracer.link.by").unwrap(), "collector");
        assert!(!t.incomplete(), "{:?}", t.reasons());
        assert!(t.warnings().is_empty(), "{:?}", t.warnings());
        t.assert_consistent();
    }
    let (_, deps) = c.get("/api/dependencies").await;
    let mut edges: Vec<(String, String)> = deps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["parent"].as_str().unwrap().into(),
                d["child"].as_str().unwrap().into(),
            )
        })
        .collect();
    edges.sort();
    assert_eq!(
        edges,
        vec![
            ("curl".into(), "proxy".into()),
            ("proxy".into(), "service".into()),
            ("service".into(), "data".into()),
        ]
    );
}

#[tokio::test]
async fn a_forwarded_traceparent_gives_way_to_the_tcp_edge() {
    let c = Collector::start("stitch-traceparent", &[]);
    let t0 = base();
    let e_in = edge("10.200.0.1:41000", "10.200.0.2:80", 500);
    let e_out = edge("10.200.0.2:41001", "10.200.0.3:8080", 600);
    // An SDK-instrumented caller (trace 1, span 1) calls a proxy that forwards its
    // `traceparent` as it is: the service behind the proxy honours it too, so both the proxy's
    // and the service's SERVER spans say span 1 is their parent.
    post(
        &c,
        A,
        "caller",
        &[S::new(1, 1, CLIENT, "GET /pay", t0, 10_000)],
    )
    .await;
    post(
        &c,
        B,
        "proxy",
        &[
            S::new(1, 2, SERVER, "GET /pay", t0 + MS, 8000)
                .parent(1)
                .edge(&e_in)
                .link("traceparent", "high"),
            S::new(1, 3, CLIENT, "GET /pay", t0 + 2 * MS, 6000)
                .parent(2)
                .edge(&e_out)
                .link("forwarded-request", "medium"),
        ],
    )
    .await;
    post(
        &c,
        C,
        "payments",
        &[S::new(1, 4, SERVER, "GET /pay", t0 + 3 * MS, 4000)
            .parent(1)
            .edge(&e_out)
            .link("traceparent", "high")],
    )
    .await;
    let t = trace(&c, 1).await;
    assert_eq!(t.spans.len(), 4);
    assert_eq!(
        t.parent_of(4),
        Some(3),
        "the proxy's CLIENT span, not the caller"
    );
    assert_eq!(t.tag(4, "tracer.link.source").unwrap(), "tcp-seq");
    assert_eq!(t.tag(4, "tracer.link.confidence").unwrap(), "high");
    assert_eq!(t.tag(4, "tracer.link.by").unwrap(), "collector");
    assert_eq!(
        t.tag(4, "tracer.link.replaced").unwrap().as_str().unwrap(),
        format!("traceparent:{}", hex::encode(sid(1)))
    );
    // The proxy's own SERVER span keeps the caller as its parent (no CLIENT span of the
    // SDK carries the edge).
    assert_eq!(t.parent_of(2), Some(1));
    assert_eq!(t.tag(2, "tracer.link.by").unwrap(), "agent");
    assert_eq!(t.tag(2, "tracer.link.replaced"), None);
    assert!(!t.incomplete(), "{:?}", t.reasons());
    t.assert_consistent();
}

/// A caller whose agent inserted a `traceparent` (`--inject-context`): the server's agent
/// honoured it, so the server span already names the right parent. The sequence numbers
/// confirm it, and the link says so: tcp-seq, high, by the collector, nothing replaced.
#[tokio::test]
async fn a_header_the_sequence_numbers_confirm_is_shown_as_tcp_seq() {
    let c = Collector::start("stitch-confirmed", &[]);
    let t0 = base();
    let e = edge("10.200.0.1:41000", "10.200.0.2:80", 700);
    post(
        &c,
        A,
        "caller",
        &[S::new(1, 1, CLIENT, "GET /x", t0, 10_000).edge(&e)],
    )
    .await;
    post(
        &c,
        B,
        "server",
        &[S::new(1, 2, SERVER, "GET /x", t0 + MS, 8000)
            .parent(1)
            .edge(&e)
            .link("traceparent", "medium")],
    )
    .await;
    let t = trace(&c, 1).await;
    assert_eq!(t.spans.len(), 2);
    assert_eq!(t.parent_of(2), Some(1));
    assert_eq!(t.tag(2, "tracer.link.source").unwrap(), "tcp-seq");
    assert_eq!(t.tag(2, "tracer.link.confidence").unwrap(), "high");
    assert_eq!(t.tag(2, "tracer.link.by").unwrap(), "collector");
    assert_eq!(t.tag(2, "tracer.link.replaced"), None);
    assert!(!t.incomplete(), "{:?}", t.reasons());
    t.assert_consistent();
}

#[tokio::test]
async fn an_ambiguous_key_links_nothing_and_says_so() {
    let c = Collector::start("stitch-ambiguous", &[]);
    let t0 = base();
    let e = edge("10.200.0.1:42000", "10.200.0.2:80", 777);
    post(
        &c,
        A,
        "web",
        &[S::new(1, 1, CLIENT, "GET /x", t0, 5000).edge(&e)],
    )
    .await;
    post(
        &c,
        B,
        "api",
        &[S::new(2, 2, SERVER, "GET /x", t0 + MS, 1000).edge(&e)],
    )
    .await;
    post(
        &c,
        D,
        "api",
        &[S::new(3, 3, SERVER, "GET /x", t0 + MS, 1000).edge(&e)],
    )
    .await;
    for (asked, own) in [(1, 1), (2, 2), (3, 3)] {
        let t = trace(&c, asked).await;
        assert_eq!(t.spans.len(), 1, "nothing pulled in: {:#}", t.json);
        assert_eq!(t.parent_of(own), None);
        let w = t.warnings();
        assert!(
            w.iter()
                .any(|w| w.contains(&e) && w.contains("1 CLIENT and 2 SERVER spans")),
            "{w:?}"
        );
        // Not "never arrived": it arrived twice.
        assert!(!t.incomplete(), "{:?}", t.reasons());
    }
}

#[tokio::test]
async fn a_host_whose_clock_is_50_ms_ahead_is_corrected() {
    let c = Collector::start("stitch-clock", &[]);
    let t0 = base();
    let ahead = 50 * MS;
    let e1 = edge("10.200.0.1:43000", "10.200.0.2:80", 11);
    let e2 = edge("10.200.0.2:43001", "10.200.0.3:80", 22);
    // Real times: A's client 0-10 ms; B's server 2-8 ms and its client 3-5 ms; C's server
    // 3.5-4.5 ms. B's clock reads 50 ms ahead, so its spans were stored 50 ms late.
    post(
        &c,
        A,
        "front",
        &[S::new(1, 1, CLIENT, "GET /a", t0, 10_000).edge(&e1)],
    )
    .await;
    // A span of another host whose clock is wrong but which has no matched pair: never moved.
    post(
        &c,
        D,
        "sdk",
        &[S::new(1, 9, INTERNAL, "render", t0 - 70 * MS, 100).parent(1)],
    )
    .await;
    post(
        &c,
        B,
        "mid",
        &[
            S::new(2, 2, SERVER, "GET /a", t0 + 2 * MS + ahead, 6000).edge(&e1),
            S::new(2, 3, CLIENT, "GET /b", t0 + 3 * MS + ahead, 2000)
                .parent(2)
                .edge(&e2)
                .link("thread", "medium"),
        ],
    )
    .await;
    post(
        &c,
        C,
        "back",
        &[S::new(3, 4, SERVER, "GET /b", t0 + 3 * MS + 500_000, 1000).edge(&e2)],
    )
    .await;
    let t = trace(&c, 2).await;
    assert_eq!(t.id(), hex::encode(tid(1)));
    assert_eq!(t.spans.len(), 5);
    let us = |ns: u64| ns / 1000;
    for (id, raw) in [(2, t0 + 2 * MS + ahead), (3, t0 + 3 * MS + ahead)] {
        assert_eq!(t.tag(id, "tracer.clock.shift_us").unwrap(), -50_000);
        assert_eq!(t.tag(id, "tracer.clock.raw_start_us").unwrap(), us(raw));
        assert_eq!(
            t.span(id).start,
            us(raw - ahead),
            "span {id} shown in A's time"
        );
        assert_eq!(
            t.span(id).warnings,
            vec!["clock skew: shifted by -50000 µs (host host-b) so it lies inside its parent"]
        );
    }
    // A (the root's host) and C (whose clock agrees with A's, found through B) do not move,
    // nor does the span of the host with no pair.
    for id in [1, 4, 9] {
        assert_eq!(t.tag(id, "tracer.clock.shift_us"), None, "span {id}");
        assert!(t.span(id).warnings.is_empty());
    }
    assert_eq!(t.span(4).start, us(t0 + 3 * MS + 500_000));
    assert_eq!(t.parent_of(4), Some(3));
    // No child before its parent, except the unmatched host's span (its clock is unknown).
    for (id, s) in &t.spans {
        if let Some(p) = &s.parent {
            if id != &hex::encode(sid(9)) {
                let p = &t.spans[p];
                assert!(
                    s.start >= p.start && s.start + s.dur <= p.start + p.dur,
                    "{id}"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_incomplete_trace_is_flagged_until_its_pieces_arrive() {
    let c = Collector::start("stitch-incomplete", &[]);
    let t0 = base();
    let e = edge("10.200.0.1:44000", "10.200.0.2:80", 4242);
    post(
        &c,
        A,
        "web",
        &[
            S::new(1, 1, SERVER, "GET /page", t0, 20_000),
            S::new(1, 2, CLIENT, "GET /api", t0 + MS, 5000)
                .parent(1)
                .edge(&e)
                .link("thread", "medium"),
            // A span whose parent (span 0x99) never arrived.
            S::new(1, 3, INTERNAL, "work", t0 + 10 * MS, 1000).parent(0x99),
        ],
    )
    .await;
    let t = trace(&c, 1).await;
    assert!(t.incomplete());
    let reasons = t.reasons();
    assert_eq!(
        reasons,
        vec![
            format!(
                "CLIENT span {} (web GET /api): its server side never arrived",
                hex::encode(sid(2))
            ),
            format!(
                "span {} (web work): its parent {} is not in the trace",
                hex::encode(sid(3)),
                hex::encode(sid(0x99))
            ),
        ]
    );
    // The server side arrives late, in its own trace: now only the orphan is missing.
    post(
        &c,
        B,
        "api",
        &[S::new(7, 7, SERVER, "GET /api", t0 + 2 * MS, 2000).edge(&e)],
    )
    .await;
    let t = trace(&c, 1).await;
    assert_eq!(t.parent_of(7), Some(2));
    assert_eq!(t.reasons().len(), 1, "{:?}", t.reasons());
    assert!(t.reasons()[0].contains("its parent"));
    // The root is the span with no parent, not the orphan.
    assert_eq!(t.id(), hex::encode(tid(1)));
}

/// An agent reports a second in which it lost records as a `tracer.loss` span of its own: the
/// traces with spans from that host in that second are marked incomplete, others are not.
#[tokio::test]
async fn a_loss_reported_by_a_host_marks_its_traces_of_that_time() {
    let c = Collector::start("stitch-loss", &[]);
    let t0 = base();
    let e = edge("10.200.0.1:44100", "10.200.0.2:80", 77);
    post(
        &c,
        A,
        "web",
        &[S::new(1, 1, CLIENT, "GET /api", t0, 5000).edge(&e)],
    )
    .await;
    post(
        &c,
        B,
        "api",
        &[S::new(2, 2, SERVER, "GET /api", t0 + MS, 2000).edge(&e)],
    )
    .await;
    // Host B's agent lost records in the second around the request; host A's, a minute later.
    post(
        &c,
        B,
        "tracer-agent",
        &[
            S::new(3, 3, INTERNAL, "tracer.loss", t0 - 500 * MS, 1_000_000)
                .int("tracer.loss.records", 12)
                .int("tracer.loss.spans", 0),
        ],
    )
    .await;
    post(
        &c,
        A,
        "tracer-agent",
        &[
            S::new(4, 4, INTERNAL, "tracer.loss", t0 + 60_000 * MS, 1_000_000)
                .int("tracer.loss.records", 5),
        ],
    )
    .await;
    let t = trace(&c, 1).await;
    assert_eq!(t.parent_of(2), Some(1), "stitched");
    let reasons = t.reasons();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("lost 12 records and 0 spans")
            && reasons[0].contains(&hex::encode(sid(3))),
        "{reasons:?}"
    );
    // A trace of host A alone, away from any loss: complete.
    post(
        &c,
        A,
        "web",
        &[S::new(5, 5, SERVER, "GET /solo", t0 + 30_000 * MS, 1000)],
    )
    .await;
    assert!(!trace(&c, 5).await.incomplete());
    // The loss span's own trace is not marked by itself.
    assert!(!trace(&c, 3).await.incomplete());
}

#[tokio::test]
async fn behind_nat_the_sequence_number_alone_links_with_low_confidence() {
    let c = Collector::start("stitch-nat", &[]);
    let t0 = base();
    // The client sees a virtual IP; the server sees the balancer's address and its own port.
    post(
        &c,
        A,
        "web",
        &[
            S::new(1, 1, CLIENT, "GET /cart", t0, 5000).edge(&edge(
                "10.200.0.1:45000",
                "10.96.0.10:80",
                90_001,
            )),
            // Another request whose seq is shared by two server spans: not linked.
            S::new(1, 2, CLIENT, "GET /cart", t0 + 10 * MS, 5000).edge(&edge(
                "10.200.0.1:45001",
                "10.96.0.10:80",
                90_002,
            )),
        ],
    )
    .await;
    post(
        &c,
        B,
        "cart",
        &[
            S::new(2, 3, SERVER, "GET /cart", t0 + MS, 2000).edge(&edge(
                "10.200.0.9:61000",
                "10.200.0.2:8080",
                90_001,
            )),
            S::new(3, 4, SERVER, "GET /cart", t0 + 11 * MS, 2000).edge(&edge(
                "10.200.0.9:61001",
                "10.200.0.2:8080",
                90_002,
            )),
            // Same seq as the first, but another path: not the same request.
            S::new(5, 6, SERVER, "GET /other", t0 + MS, 2000).edge(&edge(
                "10.200.0.9:61002",
                "10.200.0.2:8080",
                90_001,
            )),
        ],
    )
    .await;
    post(
        &c,
        D,
        "cart",
        &[
            S::new(4, 5, SERVER, "GET /cart", t0 + 11 * MS, 2000).edge(&edge(
                "10.200.0.8:62000",
                "10.200.0.4:8080",
                90_002,
            )),
        ],
    )
    .await;
    let t = trace(&c, 1).await;
    assert_eq!(t.spans.len(), 3, "{:#}", t.json);
    assert_eq!(t.parent_of(3), Some(1));
    assert_eq!(t.tag(3, "tracer.link.source").unwrap(), "tcp-seq-nat");
    assert_eq!(t.tag(3, "tracer.link.confidence").unwrap(), "low");
    assert_eq!(t.tag(3, "tracer.link.by").unwrap(), "collector");
    // The second request's server side is ambiguous by seq: the client counts as unanswered.
    assert_eq!(t.reasons().len(), 1, "{:?}", t.reasons());
    assert!(t.reasons()[0].contains(&hex::encode(sid(2))));
    t.assert_consistent();
}

/// The stitcher on a store directly, where a test needs limits other than the binary's.
mod library {
    use std::sync::Arc;

    use tracer_collector::stitch::{self, Limits};
    use tracer_store::{kind, AttrValue, KeyValue, SpanRecord, SpanStore, SqliteStore};

    fn text(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: AttrValue::Str(v.into()),
        }
    }

    fn span(
        trace: u8,
        id: u8,
        parent: Option<u8>,
        kind: i32,
        host: &str,
        start: u64,
        attrs: &[(&str, &str)],
    ) -> SpanRecord {
        SpanRecord {
            trace_id: [trace; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            service: format!("svc-{host}"),
            operation: "GET /".into(),
            kind,
            start_unix_nano: start,
            duration_nano: 1_000_000,
            status_code: 0,
            status_message: String::new(),
            attributes: attrs.iter().map(|(k, v)| text(k, v)).collect(),
            resource: Arc::new(vec![
                text("service.name", &format!("svc-{host}")),
                text("host.id", host),
            ]),
            events: vec![],
            links: vec![],
            scope_name: String::new(),
            scope_version: String::new(),
        }
    }

    fn store(name: &str) -> SqliteStore {
        let d = super::temp_dir(name);
        SqliteStore::open(&d).unwrap()
    }

    #[test]
    fn a_chain_longer_than_the_limit_is_truncated_and_says_so() {
        let store = store("stitch-limit");
        let t0 = super::now_nanos();
        // Trace k: a SERVER span answering trace k-1's CLIENT span, and a CLIENT span of its
        // own to trace k+1; five traces in a row.
        let edge = |k: u8| format!("10.0.0.{k}:1000>10.0.0.{}:80#{k}", k + 1);
        let mut spans = Vec::new();
        for k in 1..=5u8 {
            let at = t0 + u64::from(k) * 1000;
            if k > 1 {
                spans.push(span(
                    k,
                    10 + k,
                    None,
                    kind::SERVER,
                    &format!("h{k}"),
                    at,
                    &[("tracer.tcp.edge", &edge(k - 1))],
                ));
            }
            if k < 5 {
                let parent = (k > 1).then_some(10 + k);
                spans.push(span(
                    k,
                    20 + k,
                    parent,
                    kind::CLIENT,
                    &format!("h{k}"),
                    at + 10,
                    &[("tracer.tcp.edge", &edge(k))],
                ));
            }
        }
        // Each span inside its parent: later spans shorter.
        for s in &mut spans {
            s.duration_nano = 1_000_000 - 2 * (s.start_unix_nano - t0);
        }
        store.write(&spans).unwrap();
        let whole = stitch::trace(&store, &[3; 16], Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(whole.members.len(), 5);
        assert_eq!(whole.spans.len(), 8);
        assert_eq!(whole.trace_id, [1; 16]);
        assert!(!whole.incomplete(), "{:?}", whole.incomplete_reasons);
        assert!(whole.warnings.is_empty(), "{:?}", whole.warnings);
        for s in &whole.spans {
            let by = s
                .span
                .attributes
                .iter()
                .find(|kv| kv.key == "tracer.link.by");
            assert_eq!(
                (s.span.parent_span_id.is_some(), s.warnings.len()),
                (s.span.span_id != [21; 8], 0)
            );
            if s.span.kind == kind::SERVER {
                assert_eq!(by.unwrap().value, AttrValue::Str("collector".into()));
            }
        }
        let limits = Limits {
            max_traces: 3,
            ..Limits::default()
        };
        let cut = stitch::trace(&store, &[1; 16], limits).unwrap().unwrap();
        assert_eq!(cut.members, vec![[1; 16], [2; 16], [3; 16]]);
        assert!(
            cut.warnings.iter().any(|w| w.starts_with("truncated")),
            "{:?}",
            cut.warnings
        );
        assert!(cut.incomplete());
        let limits = Limits {
            max_spans: 4,
            ..Limits::default()
        };
        let cut = stitch::trace(&store, &[1; 16], limits).unwrap().unwrap();
        assert!(cut.spans.len() <= 4, "{}", cut.spans.len());
        assert!(cut.warnings.iter().any(|w| w.contains("more than 4 spans")));
    }

    #[test]
    fn a_link_that_would_make_a_cycle_is_refused() {
        let store = store("stitch-cycle");
        let t0 = super::now_nanos();
        // Bad data: a CLIENT span that carries the edge of its own ancestor SERVER span.
        let e = "10.0.0.1:5000>10.0.0.2:80#7";
        store
            .write(&[
                span(1, 1, None, kind::SERVER, "h", t0, &[("tracer.tcp.edge", e)]),
                span(
                    1,
                    2,
                    Some(1),
                    kind::CLIENT,
                    "h",
                    t0 + 10,
                    &[("tracer.tcp.edge", e)],
                ),
            ])
            .unwrap();
        let t = stitch::trace(&store, &[1; 16], Limits::default())
            .unwrap()
            .unwrap();
        let parent_of = |id: u8| {
            t.spans
                .iter()
                .find(|s| s.span.span_id == [id; 8])
                .unwrap()
                .span
                .parent_span_id
        };
        assert_eq!((parent_of(1), parent_of(2)), (None, Some([1; 8])));
        assert!(
            t.warnings.iter().any(|w| w.contains("would make a cycle")),
            "{:?}",
            t.warnings
        );
    }

    #[test]
    fn a_link_the_agent_made_on_one_host_stays_the_agents() {
        let store = store("stitch-same-host");
        let t0 = super::now_nanos();
        let e = "127.0.0.1:5000>127.0.0.1:80#99";
        store
            .write(&[
                span(1, 1, None, kind::CLIENT, "h", t0, &[("tracer.tcp.edge", e)]),
                span(
                    1,
                    2,
                    Some(1),
                    kind::SERVER,
                    "h",
                    t0 + 10,
                    &[
                        ("tracer.tcp.edge", e),
                        ("tracer.link.source", "tcp-seq"),
                        ("tracer.link.confidence", "high"),
                    ],
                ),
            ])
            .unwrap();
        let t = stitch::trace(&store, &[1; 16], Limits::default())
            .unwrap()
            .unwrap();
        let server = &t
            .spans
            .iter()
            .find(|s| s.span.span_id == [2; 8])
            .unwrap()
            .span;
        assert_eq!(server.parent_span_id, Some([1; 8]));
        let tag = |k: &str| {
            server
                .attributes
                .iter()
                .find(|kv| kv.key == k)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(tag("tracer.link.by"), Some(AttrValue::Str("agent".into())));
        assert_eq!(tag("tracer.link.replaced"), None);
        assert!(!t.incomplete(), "{:?}", t.incomplete_reasons);
    }
}
