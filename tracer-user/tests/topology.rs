//! Whole traces across hosts: four network-namespace hosts (client, proxy, service, data), one
//! agent each (the service host's clock shifted by 50 ms on purpose), one collector. A load
//! client with three keep-alive connections → nginx (upstream keep-alive) → a thread-per-request
//! Python service → a Python data service, with errors and a slow hop; then the exact trace tree
//! of every request is checked in the collector's Jaeger API: one trace per client request, the
//! right parent of every span, links with their provenance, children inside their parents after
//! the clock correction, statuses through every hop.
mod support;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use support::{collector_bin, Agent, OtlpReceiver};
use tracer_test_support::{
    free_port,
    netns::Hosts,
    require_root, temp_dir,
    topology::{self, peers_dir, Arch, Found, JSpan, LoadSpec, Options, Topology, TREE},
    wait_for, Proc,
};

/// How far a server span's end may pass its client's on one clock: the write's exit probe runs
/// after the bytes were delivered, and the reader's read may return first.
const END_RACE_US: i64 = 20;

/// Each client's requests: r normal, e a 500 from the data service, s a 50 ms data hop.
const PATTERN: &str = "rsrerr";
const CLIENTS: usize = 3;
const SHIFT_MS: i64 = 50;

fn rid_kind(rid: &str) -> char {
    rid.chars().next().unwrap()
}

fn show(f: &Found) -> String {
    let mut out = format!("request {} (status {}):\n", f.request.rid, f.request.status);
    for (hop, s) in TREE.iter().zip(&f.spans) {
        match s {
            Some(s) => out.push_str(&format!(
                "  {} {} {}: span {} trace {} parent {:?} start {} dur {} link {:?}/{:?}/{:?} edge {:?} shift {:?}\n",
                hop.host,
                hop.kind,
                s.path,
                s.span_id,
                s.trace_id,
                s.parent,
                s.start_us,
                s.duration_us,
                s.str_tag("tracer.link.source"),
                s.str_tag("tracer.link.confidence"),
                s.str_tag("tracer.link.by"),
                s.str_tag("tracer.tcp.edge"),
                s.int_tag("tracer.clock.shift_us"),
            )),
            None => out.push_str(&format!("  {} {}: MISSING\n", hop.host, hop.kind)),
        }
    }
    out
}

/// The connection part of an edge (`a:p>b:q`, without `#seq`).
fn connection(s: &JSpan) -> Option<String> {
    Some(s.str_tag("tracer.tcp.edge")?.split('#').next()?.to_owned())
}

#[test]
fn every_request_is_one_exact_trace_across_four_hosts() {
    four_hosts(false);
}

/// The same with `--inject-context` on every agent: the headers the probes insert (into the
/// first request of each new connection) must change no tree, no edge and no status.
#[test]
fn every_request_is_one_exact_trace_with_context_injected() {
    four_hosts(true);
}

fn four_hosts(inject: bool) {
    require_root();
    let tracer = Path::new(env!("CARGO_BIN_EXE_tracer"));
    let collector = collector_bin();
    let mut agent_args = vec![(
        "service".to_owned(),
        vec!["--clock-shift-ms".to_owned(), SHIFT_MS.to_string()],
    )];
    if inject {
        for host in ["client", "proxy", "service", "data"] {
            agent_args.push((host.to_owned(), vec!["--inject-context".to_owned()]));
        }
    }
    let opts = Options {
        tracer: tracer.to_path_buf(),
        collector,
        scratch: temp_dir(if inject {
            "topology-inject"
        } else {
            "topology"
        }),
        agent_args,
        echo_logs: true,
    };
    let mut topo = Topology::start(&opts);
    topo.start_peers(Arch::Threaded);
    let load = topo.run_load(&LoadSpec {
        concurrency: CLIENTS,
        rate: 0.0,
        seconds: 0.0,
        count: PATTERN.len(),
        pattern: PATTERN.to_owned(),
        tag: "t".to_owned(),
    });

    // What the client saw: every request answered, the data service's 500 as nginx's 502, one
    // keep-alive connection a client.
    assert!(load.errors.is_empty(), "client errors: {:?}", load.errors);
    assert_eq!(load.requests.len(), CLIENTS * PATTERN.len());
    for r in &load.requests {
        let want = if rid_kind(&r.rid) == 'e' { 502 } else { 200 };
        assert_eq!(r.status, want, "{}", r.rid);
    }
    for c in 0..CLIENTS {
        let ports: HashSet<u16> = load
            .requests
            .iter()
            .filter(|r| r.thread == c)
            .map(|r| r.local_port)
            .collect();
        assert_eq!(ports.len(), 1, "client {c} kept one connection: {ports:?}");
    }

    let traces = topology::wait_for_traces(
        topo.query_port,
        &load,
        (SHIFT_MS as u64) * 2000,
        Duration::from_secs(10),
        Duration::from_secs(40),
        &mut |have, want, took| eprintln!("spans {have}/{want} (read in {took:?})"),
    );
    let score = topology::score(&load, &traces);
    for f in score.found.iter().take(4) {
        eprint!("{}", show(f));
    }
    let mut problems: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };

    check(
        score.other == 0,
        format!(
            "{} spans about no request of this test: {:?}",
            score.other,
            traces
                .iter()
                .flat_map(|t| &t.spans)
                .filter(|s| topology::rid_of(&s.path).is_none())
                .map(JSpan::describe)
                .collect::<Vec<_>>()
        ),
    );
    let mut trace_of_request: HashMap<String, String> = HashMap::new();
    for f in &score.found {
        let rid = &f.request.rid;
        let kind = rid_kind(rid);
        let all_there = f.spans.iter().all(Option::is_some);
        check(all_there, format!("spans missing:\n{}", show(f)));
        check(
            f.duplicates.is_empty(),
            format!(
                "{rid}: duplicate spans {:?}",
                f.duplicates.iter().map(JSpan::describe).collect::<Vec<_>>()
            ),
        );
        if !all_there {
            continue;
        }
        let s: Vec<&JSpan> = f.spans.iter().map(|s| s.as_ref().unwrap()).collect();
        // One trace, the exact tree.
        check(
            s[0].parent.is_none(),
            format!("{rid}: the client's span has a parent:\n{}", show(f)),
        );
        check(
            s.iter().all(|x| x.trace_id == s[0].trace_id),
            format!("{rid}: not one trace:\n{}", show(f)),
        );
        for i in 1..TREE.len() {
            check(
                f.parent_right(i),
                format!(
                    "{rid}: {} has the wrong parent:\n{}",
                    s[i].describe(),
                    show(f)
                ),
            );
            // Children inside their parents, after the collector's clock correction. A server
            // span ends at its last write's exit, which can come a few µs after the client's
            // read of those bytes returned (docs/ARCHITECTURE.md, "One record per data
            // syscall"): the end may overhang by that much, the start never.
            check(
                s[i].start_us >= s[i - 1].start_us
                    && s[i].end_us() <= s[i - 1].end_us() + END_RACE_US,
                format!(
                    "{rid}: {} [{}, {}] not inside {} [{}, {}]",
                    s[i].describe(),
                    s[i].start_us,
                    s[i].end_us(),
                    s[i - 1].describe(),
                    s[i - 1].start_us,
                    s[i - 1].end_us()
                ),
            );
        }
        trace_of_request.insert(rid.clone(), s[0].trace_id.clone());

        // Statuses through every hop: the data service's 500 becomes the service's 502.
        let want: [i64; 6] = if kind == 'e' {
            [502, 502, 502, 502, 500, 500]
        } else {
            [200; 6]
        };
        for (x, w) in s.iter().zip(want) {
            check(
                x.status() == Some(w),
                format!("{rid}: {} status {:?}, want {w}", x.describe(), x.status()),
            );
        }
        // The slow hop shows in the data span and in every span above it.
        if kind == 's' {
            for x in &s {
                check(
                    x.duration_us >= 50_000,
                    format!(
                        "{rid}: {} lasted {} µs, the data hop sleeps 50 ms",
                        x.describe(),
                        x.duration_us
                    ),
                );
            }
        }
        // Each hop across hosts: both ends name the same request in the TCP stream, and the
        // collector joined them by it.
        for (c, sv) in [(0, 1), (2, 3), (4, 5)] {
            let (ce, se) = (
                s[c].str_tag("tracer.tcp.edge"),
                s[sv].str_tag("tracer.tcp.edge"),
            );
            check(
                ce.is_some() && ce == se,
                format!(
                    "{rid}: tracer.tcp.edge {ce:?} on {} vs {se:?} on {}",
                    s[c].describe(),
                    s[sv].describe()
                ),
            );
            let link = (
                s[sv].str_tag("tracer.link.source"),
                s[sv].str_tag("tracer.link.confidence"),
                s[sv].str_tag("tracer.link.by"),
            );
            check(
                link == (Some("tcp-seq"), Some("high"), Some("collector")),
                format!(
                    "{rid}: {} linked by {link:?}, want tcp-seq/high/collector",
                    s[sv].describe()
                ),
            );
        }
        // Inside nginx and inside the service the agent made the link, and says how.
        for i in [2, 4] {
            let source = s[i].str_tag("tracer.link.source");
            check(
                matches!(
                    source,
                    Some(
                        "tcp-seq"
                            | "thread"
                            | "forwarded-request"
                            | "sole-request"
                            | "traceparent"
                            | "b3"
                            | "forwarded-header"
                    )
                ) && s[i].str_tag("tracer.link.confidence").is_some()
                    && s[i].str_tag("tracer.link.by") == Some("agent"),
                format!(
                    "{rid}: {} link source {source:?}, confidence {:?}, by {:?}",
                    s[i].describe(),
                    s[i].str_tag("tracer.link.confidence"),
                    s[i].str_tag("tracer.link.by")
                ),
            );
        }
        // The service host's clock runs 50 ms ahead; the collector shifts it back relative to
        // its neighbours (whichever host it takes as the reference) and keeps the raw time. Any
        // shift that puts the server inside its client is right, so it is exact only up to the
        // hop's slack (the client's time around the server's: well under 10 ms here).
        let shift = |x: &JSpan| x.int_tag("tracer.clock.shift_us").unwrap_or(0);
        let want_us = -SHIFT_MS * 1000;
        for (a, b, want) in [(2, 3, want_us), (4, 5, -want_us), (0, 1, 0)] {
            let rel = shift(s[b]) - shift(s[a]);
            check(
                (rel - want).abs() <= 10_000,
                format!(
                    "{rid}: {} is shifted {rel} µs relative to {}, want {want} ± 10000",
                    s[b].describe(),
                    s[a].describe()
                ),
            );
        }
        for x in &s {
            if let Some(sh) = x.int_tag("tracer.clock.shift_us") {
                let raw = x.int_tag("tracer.clock.raw_start_us");
                check(
                    raw.map(|r| r + sh) == Some(x.start_us),
                    format!(
                        "{rid}: {} start {} != raw {raw:?} + shift {sh}",
                        x.describe(),
                        x.start_us
                    ),
                );
                check(
                    x.warnings
                        .iter()
                        .any(|w| w.starts_with("clock skew: shifted by")),
                    format!(
                        "{rid}: {} shifted without a warning: {:?}",
                        x.describe(),
                        x.warnings
                    ),
                );
            }
        }
    }
    // One trace per client request, holding only that request's six spans.
    let distinct: HashSet<&String> = trace_of_request.values().collect();
    check(
        distinct.len() == trace_of_request.len(),
        format!("requests share traces: {trace_of_request:?}"),
    );
    for t in traces.iter().filter(|t| distinct.contains(&t.trace_id)) {
        check(
            t.spans.len() == TREE.len(),
            format!(
                "trace {} has {} spans: {:?}",
                t.trace_id,
                t.spans.len(),
                t.spans.iter().map(JSpan::describe).collect::<Vec<_>>()
            ),
        );
        check(
            t.incomplete == Some(false),
            format!(
                "trace {}: incomplete {:?} ({:?})",
                t.trace_id, t.incomplete, t.incomplete_reasons
            ),
        );
    }
    // Keep-alive upstream: nginx and the service each reused their connections.
    for (hop, what) in [(2, "nginx → service"), (4, "service → data")] {
        let conns: HashSet<String> = score
            .found
            .iter()
            .filter_map(|f| f.spans[hop].as_ref().and_then(connection))
            .collect();
        check(
            !conns.is_empty() && conns.len() < load.requests.len(),
            format!(
                "{what}: {} connections for {} requests",
                conns.len(),
                load.requests.len()
            ),
        );
    }
    check(
        score.shifted > 0,
        "no span carries tracer.clock.shift_us: the 50 ms skew was not corrected".to_owned(),
    );

    let logs: Vec<(String, String)> = topo.agents.drain(..).map(|(h, a)| (h, a.stop())).collect();
    for (host, log) in &logs {
        assert!(
            log.contains("counters:"),
            "agent {host} did not stop cleanly:\n{log}"
        );
    }
    assert!(
        problems.is_empty(),
        "{} problems (complete {}/{}, linked {}/{}, wrong {}, orphans {}, missing {}):\n{}",
        problems.len(),
        score.complete,
        score.requests,
        score.linked,
        score.links_expected,
        score.wrong,
        score.orphans,
        score.missing,
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(score.complete, score.requests);
    if inject {
        // The headers were there: the first request of each client connection carried one,
        // and the client's span names its ids.
        let injected = score
            .found
            .iter()
            .filter(|f| {
                f.spans[0]
                    .as_ref()
                    .is_some_and(|s| s.str_tag("tracer.context.injected") == Some("traceparent"))
            })
            .count();
        assert_eq!(
            injected, CLIENTS,
            "client spans with an injected traceparent"
        );
        let client_log = &logs.iter().find(|(h, _)| h == "client").unwrap().1;
        assert!(
            client_log.contains(&format!("context_injected={CLIENTS} ")),
            "the client's agent counts {CLIENTS} injections:\n{client_log}"
        );
    }
}

/// `--sample-in-kernel` on every host: a call's decision travels to its server on the next
/// host in a TCP option, so a request is kept whole or dropped whole. Deciding alone, each
/// host after the first would keep a request's part by its own number: at 0.5, 0.5³ of the
/// requests whole and most of the others in pieces.
#[test]
fn sampled_in_the_kernel_requests_are_kept_whole_across_four_hosts() {
    let run = sampled_in_the_kernel(&[]);
    let n = run.score.requests;
    // About half kept whole (the client's own number decides); the binomial's spread at 240
    // requests is ±8%.
    assert!(
        (n * 3 / 10..=n * 7 / 10).contains(&run.score.complete),
        "{} of {n} requests whole at a share of {SHARE}",
        run.score.complete
    );
    assert!(
        run.partial * 20 <= n,
        "{} of {n} requests kept in pieces",
        run.partial
    );
    // The decisions that differ from the next host's own number crossed in the option, each
    // read where it was sent to.
    for (from, to) in [("proxy", "service"), ("service", "data")] {
        let (sent, received) = (
            run.counter(from, "decisions_sent"),
            run.counter(to, "decisions_received"),
        );
        assert!(
            sent > 0 && sent == received,
            "{from} sent {sent} decisions, {to} received {received}"
        );
    }
}

/// Outside `--tcp-option-networks` (the test's hosts are in 10.201.0.0/16) nothing is written
/// or read, and each host decides alone: pieces, never a wrong parent.
#[test]
fn the_tcp_option_stays_within_its_networks() {
    let run = sampled_in_the_kernel(&["--tcp-option-networks", "192.168.0.0/16"]);
    for host in ["proxy", "service", "data"] {
        for name in ["decisions_sent", "decisions_received"] {
            assert_eq!(run.counter(host, name), 0, "{host}: {name}");
        }
    }
    assert!(
        run.partial > run.score.requests / 5,
        "{} of {} requests in pieces with each host deciding alone",
        run.partial,
        run.score.requests
    );
}

const SHARE: &str = "0.5";

/// One run of eight clients × 30 requests through the four hosts, every agent with
/// `--sample SHARE --sample-in-kernel` and `extra`.
struct SampledRun {
    score: topology::Score,
    /// Requests with some of their six spans but not all.
    partial: usize,
    /// Each agent's last log lines (its counters).
    logs: Vec<(String, String)>,
}

impl SampledRun {
    /// A counter from the agent's exit line (`name=N`; 0 when absent).
    fn counter(&self, host: &str, name: &str) -> u64 {
        let log = &self.logs.iter().find(|(h, _)| h == host).unwrap().1;
        log.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn sampled_in_the_kernel(extra: &[&str]) -> SampledRun {
    require_root();
    let tracer = Path::new(env!("CARGO_BIN_EXE_tracer"));
    let args: Vec<String> = ["--sample", SHARE, "--sample-in-kernel"]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
    let opts = Options {
        tracer: tracer.to_path_buf(),
        collector: collector_bin(),
        scratch: temp_dir("topology-sample-in-kernel"),
        agent_args: ["client", "proxy", "service", "data"]
            .iter()
            .map(|h| (h.to_string(), args.clone()))
            .collect(),
        echo_logs: false,
    };
    let mut topo = Topology::start(&opts);
    topo.start_peers(Arch::Threaded);
    let load = topo.run_load(&LoadSpec {
        concurrency: 8,
        rate: 0.0,
        seconds: 0.0,
        count: 30,
        pattern: "r".to_owned(),
        tag: "k".to_owned(),
    });
    assert!(load.errors.is_empty(), "client errors: {:?}", load.errors);
    let traces = topology::wait_for_traces(
        topo.query_port,
        &load,
        0,
        Duration::from_secs(6),
        Duration::from_secs(40),
        &mut |have, want, took| eprintln!("spans {have}/{want} (read in {took:?})"),
    );
    let score = topology::score(&load, &traces);
    let present = |f: &Found| f.spans.iter().filter(|s| s.is_some()).count();
    let pieces: Vec<&Found> = score
        .found
        .iter()
        .filter(|f| (1..TREE.len()).contains(&present(f)))
        .collect();
    for f in pieces.iter().take(3) {
        eprint!("{}", show(f));
    }
    let partial = pieces.len();
    let logs = topo.agents.drain(..).map(|(h, a)| (h, a.stop())).collect();
    let run = SampledRun {
        score,
        partial,
        logs,
    };
    eprintln!(
        "{extra:?}: {} requests, {} whole, {} in pieces, {} wrong parents, {} orphans; decisions \
         sent proxy {} service {}, received service {} data {}",
        run.score.requests,
        run.score.complete,
        run.partial,
        run.score.wrong,
        run.score.orphans,
        run.counter("proxy", "decisions_sent"),
        run.counter("service", "decisions_sent"),
        run.counter("service", "decisions_received"),
        run.counter("data", "decisions_received"),
    );
    assert_eq!(run.score.wrong, 0, "a wrong parent is worse than none");
    run
}

/// The option over IPv6: a thread-per-request Python service in one namespace calling a
/// server in another at fd00:201::2 (in the default networks, fc00::/7). Every call the caller's
/// agent exported has its server span in the callee's export, and no other.
#[test]
fn the_tcp_option_crosses_ipv6() {
    require_root();
    let hosts = Hosts::create(&["caller", "callee"]);
    let (a, b) = (hosts.host("caller"), hosts.host("callee"));
    for (h, n) in [(a, 1), (b, 2)] {
        let ok = Command::new("ip")
            .args(["-n", &h.netns, "addr", "add", &format!("fd00:201::{n}/64")])
            .args(["dev", "eth0", "nodad"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "adding an IPv6 address to {}", h.name);
    }
    let receiver = OtlpReceiver::start(free_port());
    let endpoint = receiver.endpoint();
    let agents: Vec<Agent> = [a, b]
        .iter()
        .map(|h| {
            let netns = h.netns_path();
            Agent::start(&[
                "--netns",
                netns.to_str().unwrap(),
                "--endpoint",
                &endpoint,
                "--metrics-addr",
                "off",
                "--batch-timeout-ms",
                "100",
                "--sample",
                SHARE,
                "--sample-in-kernel",
            ])
        })
        .collect();
    let quiet = |mut c: Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Proc(c.spawn().expect("starting a peer"))
    };
    // The files the calls ask for (urllib raises on a 404, and the caller answers nothing).
    let files = temp_dir("ipv6-files");
    std::fs::create_dir_all(files.join("v6")).unwrap();
    for i in 0..40 {
        std::fs::write(files.join("v6").join(i.to_string()), b"ok").unwrap();
    }
    let mut server = b.command("python3");
    server
        .args([
            "-m",
            "http.server",
            "--bind",
            "fd00:201::2",
            "8081",
            "--directory",
        ])
        .arg(&files);
    let _server = quiet(server);
    let mut caller = a.command("python3");
    caller
        .arg(peers_dir().join("plain_caller.py"))
        .args(["8080", "http://[fd00:201::2]:8081"]);
    let _caller = quiet(caller);
    b.wait_listening("[fd00:201::2]:8081".parse().unwrap(), "the IPv6 server");
    a.wait_listening("127.0.0.1:8080".parse().unwrap(), "the caller");
    for i in 0..40 {
        let ok = a
            .command("curl")
            .args(["-sSf", "-o", "/dev/null", "-m", "5"])
            .arg(format!("http://127.0.0.1:8080/v6/{i}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "request {i}");
    }
    let edges = |kind: i32, side: &str| -> HashSet<String> {
        receiver
            .spans()
            .iter()
            .filter(|s| {
                s.span.kind == kind
                    && s.str_attr(side).as_deref() == Some("fd00:201::2")
                    && s.str_attr("url.path")
                        .is_some_and(|p| p.starts_with("/v6/"))
            })
            .filter_map(|s| s.str_attr("tracer.tcp.edge"))
            .collect()
    };
    // CLIENT spans name the callee as their peer, SERVER spans as their own address.
    let (mut calls, mut served) = (HashSet::new(), HashSet::new());
    wait_for("both agents' spans", Duration::from_secs(10), || {
        calls = edges(3, "network.peer.address");
        served = edges(2, "network.local.address");
        !calls.is_empty() && calls == served
    });
    let logs: Vec<String> = agents.into_iter().map(Agent::stop).collect();
    let counter = |log: &str, name: &str| -> u64 {
        log.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (sent, received) = (
        counter(&logs[0], "decisions_sent"),
        counter(&logs[1], "decisions_received"),
    );
    eprintln!(
        "IPv6: {} calls kept, their server spans {}; decisions sent {sent}, received {received}",
        calls.len(),
        served.len()
    );
    assert!(
        sent > 0 && sent == received,
        "sent {sent}, received {received}"
    );
    assert!(
        calls.len() < 40,
        "{} of 40 calls kept at {SHARE}",
        calls.len()
    );
}
