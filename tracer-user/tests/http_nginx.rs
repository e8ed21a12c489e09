//! End to end with real peers: the agent's probes loaded into this kernel trace nginx (apt), a
//! Python upstream, curl and this test's own client; spans arrive over OTLP/HTTP and are checked
//! one by one (count, kinds, names, attributes, peers, durations against what the client timed).
mod support;

use std::{io::Write as _, net::TcpStream, process::Command, time::Duration};

use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use support::*;

struct Expect {
    method: &'static str,
    path: &'static str,
    status: u16,
}

const KEEPALIVE: &[Expect] = &[
    Expect {
        method: "GET",
        path: "/ok",
        status: 200,
    },
    Expect {
        method: "POST",
        path: "/created",
        status: 201,
    },
    Expect {
        method: "GET",
        path: "/notfound",
        status: 404,
    },
    Expect {
        method: "DELETE",
        path: "/fail",
        status: 503,
    },
    Expect {
        method: "GET",
        path: "/slow/150",
        status: 200,
    },
];

fn raw_request(e: &Expect, port: u16) -> String {
    let query = if e.path == "/ok" {
        "?token=secret-value"
    } else {
        ""
    };
    let body = if e.method == "POST" {
        "hello=world"
    } else {
        ""
    };
    format!(
        "{} {}{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: tracer-test\r\nContent-Length: {}\r\n\r\n{body}",
        e.method,
        e.path,
        query,
        body.len()
    )
}

#[test]
fn nginx_server_and_client_spans_arrive_over_otlp() {
    require_root();
    let (nginx_port, upstream_port, otlp_port) = (free_port(), free_port(), free_port());
    let _upstream = start_slow_upstream(upstream_port);
    let _nginx = start_nginx(nginx_port, upstream_port);
    let receiver = OtlpReceiver::start(otlp_port);

    // A connection that exists before the agent starts must be traced too.
    let mut early = TcpStream::connect(addr(nginx_port)).unwrap();
    assert_eq!(
        request(&mut early, &raw_request(&KEEPALIVE[0], nginx_port)).status,
        200
    );

    let nginx_s = nginx_port.to_string();
    let upstream_s = upstream_port.to_string();
    let rule = format!("port={upstream_port}:slow-upstream");
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &nginx_s,
        "--port",
        &upstream_s,
        "--service-rule",
        &rule,
        "--batch-timeout-ms",
        "100",
        "--metrics-addr",
        "off",
    ]);

    // 1. keep-alive: five requests on one connection, client-timed.
    let mut conn = TcpStream::connect(addr(nginx_port)).unwrap();
    let client_port = local_port(&conn);
    let mut timings = Vec::new();
    for e in KEEPALIVE {
        let t = request(&mut conn, &raw_request(e, nginx_port));
        assert_eq!(t.status, e.status, "nginx answered {} {}", e.method, e.path);
        timings.push(t.elapsed);
    }
    // 2. pipelining: three requests in one write, three responses.
    let mut piped = TcpStream::connect(addr(nginx_port)).unwrap();
    let three: String = (0..3)
        .map(|_| raw_request(&KEEPALIVE[0], nginx_port))
        .collect();
    piped.write_all(three.as_bytes()).unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        assert_eq!(read_response(&mut piped, &mut buf), 200);
    }
    // 3. the pre-existing connection.
    assert_eq!(
        request(&mut early, &raw_request(&KEEPALIVE[2], nginx_port)).status,
        404
    );
    // 4. curl, a real client program.
    let curl = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{nginx_port}/ok"),
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    drop(conn);
    drop(piped);
    drop(early);

    // 5 keep-alive + 3 pipelined + 1 early, each seen by nginx and by this client; curl's
    // request by nginx and curl; the proxied one by nginx (client) and the upstream (server).
    let expected = 9 * 2 + 2 + 2;
    wait_for("all spans at the receiver", Duration::from_secs(20), || {
        receiver.spans().len() >= expected
    });
    std::thread::sleep(Duration::from_millis(700));
    let spans = receiver.spans();
    let log = agent.stop();
    for s in &spans {
        eprintln!(
            "{} {} {:?} {:?}",
            s.service(),
            s.span.name,
            s.span.kind,
            s.duration()
        );
    }
    assert_eq!(spans.len(), expected, "exactly the expected spans, no more");
    assert!(
        log.contains("counters:"),
        "the agent logs its counters on exit:\n{log}"
    );
    // Both ends of every connection here are on this host: each head is parsed at one end and
    // taken at the other (the span checks below hold for both ends' parses).
    let reused: u64 = log
        .split("heads_reused=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no heads_reused in the counters:\n{log}"));
    assert!(
        reused >= 10,
        "heads of loopback connections parsed once for both ends, {reused} reused:\n{log}"
    );

    let me = std::fs::read_link("/proc/self/exe").unwrap();
    let me = me.file_name().unwrap().to_string_lossy().to_string();
    let server = |s: &&Received| s.span.kind == SpanKind::Server as i32;
    let client = |s: &&Received| s.span.kind == SpanKind::Client as i32;
    let nginx_server: Vec<&Received> = spans
        .iter()
        .filter(server)
        .filter(|s| s.service() == "nginx")
        .collect();
    let ours: Vec<&Received> = spans
        .iter()
        .filter(client)
        .filter(|s| s.service() == me)
        .collect();
    assert_eq!(nginx_server.len(), 10, "nginx SERVER spans");
    assert_eq!(ours.len(), 9, "this test's CLIENT spans");

    // The keep-alive connection: names, attributes, peers, statuses, durations.
    for (e, elapsed) in KEEPALIVE.iter().zip(&timings) {
        let name = format!("{} {}", e.method, e.path.replace("150", "{id}"));
        let on_conn =
            |s: &&&Received| s.int_attr("network.peer.port") == Some(i64::from(client_port));
        let srv = nginx_server
            .iter()
            .filter(on_conn)
            .find(|s| s.span.name == name)
            .unwrap_or_else(|| panic!("no nginx SERVER span {name} for client port {client_port}"));
        assert_eq!(
            srv.str_attr("http.request.method").as_deref(),
            Some(e.method)
        );
        assert_eq!(
            srv.str_attr("url.path").as_deref(),
            Some(e.path),
            "path without the query string"
        );
        assert_eq!(
            srv.int_attr("http.response.status_code"),
            Some(i64::from(e.status))
        );
        assert_eq!(srv.str_attr("server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(srv.int_attr("server.port"), Some(i64::from(nginx_port)));
        assert_eq!(
            srv.str_attr("network.peer.address").as_deref(),
            Some("127.0.0.1")
        );
        let want_error = e.status >= 500;
        assert_eq!(
            srv.span.status.as_ref().unwrap().code == StatusCode::Error as i32,
            want_error,
            "{name}"
        );
        assert!(
            srv.duration() <= *elapsed,
            "{name}: server span {:?} longer than the client saw {elapsed:?}",
            srv.duration()
        );

        let cli = ours
            .iter()
            .find(|s| {
                s.span.name == name
                    && s.int_attr("network.local.port") == Some(i64::from(client_port))
            })
            .unwrap_or_else(|| panic!("no CLIENT span {name} from this test"));
        assert_eq!(
            cli.int_attr("network.peer.port"),
            Some(i64::from(nginx_port))
        );
        assert_eq!(
            cli.int_attr("http.response.status_code"),
            Some(i64::from(e.status))
        );
        let (span, seen) = (cli.duration().as_secs_f64(), elapsed.as_secs_f64());
        assert!(
            span <= seen && span >= seen * 0.5 - 0.000_5,
            "{name}: client span {span:.6}s vs measured {seen:.6}s"
        );
        // Both ends of the connection are on this host: the server span is the client's child.
        assert_eq!(
            srv.span.trace_id, cli.span.trace_id,
            "{name}: one trace for both ends"
        );
        assert_eq!(
            srv.span.parent_span_id, cli.span.span_id,
            "{name}: server span is the client span's child"
        );
        assert_eq!(
            srv.str_attr("tracer.link.source").as_deref(),
            Some("tcp-seq")
        );
        assert_eq!(
            srv.str_attr("tracer.link.confidence").as_deref(),
            Some("high")
        );
        // The key the collector joins the two ends by across hosts: the same on both.
        let edge = cli.str_attr("tracer.tcp.edge");
        assert!(
            edge.as_deref().is_some_and(
                |e| e.starts_with(&format!("127.0.0.1:{client_port}>127.0.0.1:{nginx_port}#"))
            ),
            "{name}: edge {edge:?}"
        );
        assert_eq!(
            srv.str_attr("tracer.tcp.edge"),
            edge,
            "{name}: both ends' edge"
        );
        assert!(
            cli.span.start_time_unix_nano <= srv.span.start_time_unix_nano,
            "{name}: client starts before server"
        );
        // Each end ends at its last syscall's exit. Over loopback the client's read is completed
        // inside nginx's write (the receive runs in the sender's syscall), and the client's
        // thread, woken on the other CPU, can return before nginx's write does: the server may
        // end a little after the client. The edge above already pins both to one request.
        const EXIT_ORDER_SLACK_NS: u64 = 500_000;
        assert!(
            cli.span.end_time_unix_nano + EXIT_ORDER_SLACK_NS >= srv.span.end_time_unix_nano,
            "{name}: client ends after server (within its write's return): client {}, server {}",
            cli.span.end_time_unix_nano,
            srv.span.end_time_unix_nano
        );
    }
    let slow = nginx_server
        .iter()
        .find(|s| s.span.name == "GET /slow/{id}")
        .unwrap();
    assert!(
        slow.duration() >= Duration::from_millis(150),
        "the proxied request took the upstream's 150 ms: {:?}",
        slow.duration()
    );

    // nginx as a client of the upstream, and the upstream's own SERVER span (named by rule).
    let proxied = spans
        .iter()
        .filter(client)
        .find(|s| s.service() == "nginx")
        .expect("nginx CLIENT span to the upstream");
    assert_eq!(
        proxied.int_attr("network.peer.port"),
        Some(i64::from(upstream_port))
    );
    assert_eq!(proxied.str_attr("url.path").as_deref(), Some("/slow/150"));
    let up = spans
        .iter()
        .filter(server)
        .find(|s| s.service() == "slow-upstream")
        .expect("upstream SERVER span");
    assert_eq!(up.int_attr("http.response.status_code"), Some(200));
    assert!(up.duration() >= Duration::from_millis(150) && up.duration() <= proxied.duration());
    assert_eq!(
        up.span.parent_span_id, proxied.span.span_id,
        "the upstream's span is nginx's client span's child"
    );
    // Inside nginx: the call to the upstream is the child of the request it serves, so the
    // test's client, nginx and the upstream make one trace.
    assert_eq!(
        proxied.span.parent_span_id, slow.span.span_id,
        "nginx's upstream call is the child of its /slow/150 SERVER span"
    );
    assert_eq!(proxied.span.trace_id, slow.span.trace_id);
    assert_eq!(up.span.trace_id, slow.span.trace_id);
    let how = proxied.str_attr("tracer.link.source");
    assert!(
        matches!(how.as_deref(), Some("thread" | "forwarded-request")),
        "in-process link made by {how:?}"
    );
    // Every server span found its client on this host.
    assert!(
        spans
            .iter()
            .filter(server)
            .all(|s| !s.span.parent_span_id.is_empty()),
        "unlinked server spans"
    );

    // curl's CLIENT span, with its process facts.
    let c = spans
        .iter()
        .filter(client)
        .find(|s| s.service() == "curl")
        .expect("curl CLIENT span");
    assert_eq!(c.str_attr("url.path").as_deref(), Some("/ok"));
    assert!(c
        .str_attr("user_agent.original")
        .unwrap_or_default()
        .starts_with("curl/"));
    // Host facts on every resource.
    for key in [
        "host.name",
        "host.id",
        "os.type",
        "os.version",
        "process.pid",
        "process.executable.name",
        "process.command_line",
        "host.cpu.count",
        "host.memory.total",
    ] {
        assert!(c.res(key).is_some(), "resource attribute {key} missing");
    }
    // Pipelined and pre-existing connections were traced (keep-alive 1 + pipelined 3 + curl 1 "GET /ok"; keep-alive 1 + early 1 "GET /notfound").
    assert_eq!(
        nginx_server
            .iter()
            .filter(|s| s.span.name == "GET /ok")
            .count(),
        5
    );
    assert_eq!(
        nginx_server
            .iter()
            .filter(|s| s.span.name == "GET /notfound")
            .count(),
        2
    );
}

/// A thread's scheduling policy, from field 41 of /proc/PID/task/TID/stat (after the
/// parenthesized command name, which may hold spaces).
fn policy(pid: u32, tid: &str) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(38).unwrap().parse().unwrap()
}

/// The default `--priority adaptive`: with little traffic the agent's threads (all but its
/// watchdog) run idle-only (SCHED_IDLE, policy 5), and the spans still arrive, all of them.
#[test]
fn by_default_the_agent_idles_while_it_has_room_and_still_delivers() {
    require_root();
    let (nginx_port, receiver, agent, _nginx) = traced_nginx();
    let pid = agent.proc.0.id();
    let mut conn = TcpStream::connect(addr(nginx_port)).unwrap();
    for _ in 0..20 {
        assert_eq!(
            request(&mut conn, &raw_request(&KEEPALIVE[0], nginx_port)).status,
            200
        );
    }
    drop(conn);
    // 20 requests, each seen by nginx (server) and by this test (client).
    wait_for("40 spans at the receiver", Duration::from_secs(20), || {
        receiver.spans().len() >= 40
    });
    let threads: Vec<(String, String, u32)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| {
            let tid = e.unwrap().file_name().to_string_lossy().to_string();
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
            let p = policy(pid, &tid);
            (tid, name.trim().to_string(), p)
        })
        .collect();
    eprintln!("agent threads (tid, name, policy): {threads:?}");
    let log = agent.stop();
    assert_eq!(receiver.spans().len(), 40, "every span, no more");
    for (tid, name, p) in &threads {
        let want = if name == "priority" { 0 } else { 5 };
        assert_eq!(*p, want, "thread {tid} ({name}) policy");
    }
    assert!(
        threads.iter().any(|(tid, _, _)| *tid == pid.to_string()),
        "the main thread was checked"
    );
    assert!(!log.contains("normal priority throughout"), "{log}");
}
