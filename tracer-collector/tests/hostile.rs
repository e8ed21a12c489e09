//! Hostile clients against the real collector, its memory read from /proc: bodies sent without
//! the token cost nothing on either port or protocol, what a JSON body may cost is bounded by the
//! in-flight budget, and idle or excess connections cannot starve other clients.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use prost::Message as _;
use support::*;

const TOKEN: &str = "hostile-test-token";
const MIB: usize = 1024 * 1024;

/// A process's resident size and its peak, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap()
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pid(c: &Collector) -> u32 {
    c.child.as_ref().unwrap().id()
}

/// A gRPC `Export` call's body: the 5-byte length prefix, then `message`.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// An export of `spans` small spans, protobuf.
fn spans(n: usize) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    let now = now_nanos();
    request(
        "hostile",
        (0..n as u64)
            .map(|i| {
                let mut trace = [0u8; 16];
                trace[..8].copy_from_slice(&(i + 1).to_be_bytes());
                span(trace, 1, None, "GET /a", now, 0, 1000)
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_without_the_token_cost_nothing_and_json_is_bounded() {
    let c = Collector::start(
        "hostile-memory",
        &[
            "--token",
            TOKEN,
            "--max-body-bytes",
            &(32 * MIB).to_string(),
            "--max-in-flight-mib",
            "64",
        ],
    );
    let pid = pid(&c);
    let (base, _) = memory_mib(pid);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let h1 = reqwest::Client::new();

    // gRPC: 4 calls at once, each 16 MiB, no token. Before the gate, tonic decoded every one
    // (2 MiB took the collector from 13 to 544 MiB).
    let big = vec![0u8; 16 * MIB];
    let grpc_body = grpc_frame(&big);
    let calls = (0..4).map(|_| {
        h2.post(format!(
            "http://127.0.0.1:{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            c.grpc_port
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(grpc_body.clone())
        .send()
    });
    for result in futures_join(calls).await {
        let response = result.expect("the collector answers");
        assert_eq!(
            response
                .headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap()),
            Some("16"),
            "UNAUTHENTICATED"
        );
    }
    // OTLP/JSON over HTTP/1.1: 4 at once, 16 MiB each, no token.
    let json_junk = format!("{{\"resourceSpans\":[{}]}}", "{},".repeat(16 * MIB / 3));
    let posts = (0..4).map(|_| {
        h1.post(c.http_url())
            .header("content-type", "application/json")
            .body(json_junk.clone())
            .send()
    });
    // Refused on its head: the client sees the 401, or, still writing the body the collector
    // will not read, the connection closed under it.
    for result in futures_join(posts).await {
        match result {
            Ok(response) => assert_eq!(response.status().as_u16(), 401),
            Err(e) => assert!(
                e.is_request() && !e.is_timeout(),
                "neither a 401 nor a closed connection: {e}"
            ),
        }
    }
    let (after, peak) = memory_mib(pid);
    eprintln!("128 MiB sent without the token: {base:.0} -> peak {peak:.0} MiB, now {after:.0}");
    assert!(
        peak - base < 48.0,
        "128 MiB sent without the token grew the collector from {base:.0} to a peak of {peak:.0} MiB (now {after:.0})"
    );

    // With the token, a 16 MiB JSON body could never fit the 64 MiB budget: refused on its
    // head, before a byte of it is read, with what to do. (Only the head is sent: the answer
    // comes without the body, and a client still writing it could see the connection close.)
    let mut conn = TcpStream::connect(("127.0.0.1", c.http_port)).unwrap();
    write!(
        conn,
        "POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         authorization: Bearer {TOKEN}\r\ncontent-length: {}\r\n\r\n",
        16 * MIB
    )
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("--max-in-flight-mib"), "{text}");

    // A real JSON export that fits (a body is charged 200x its size: 64 MiB takes ~320 KiB)
    // is taken, and the collector stays within its budget.
    let n = 700;
    let body = serde_json::to_vec(&spans(n)).unwrap();
    assert!(body.len() < 320 * 1024, "{} bytes", body.len());
    let (_, peak_before) = memory_mib(pid);
    let response = h1
        .post(c.http_url())
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "{}",
        response.text().await.unwrap()
    );
    let (_, peak_after) = memory_mib(pid);
    eprintln!(
        "a {} KiB JSON export of {n} spans: peak {peak_before:.0} -> {peak_after:.0} MiB",
        body.len() / 1024
    );
    assert!(
        peak_after < base + 64.0 + 48.0,
        "the JSON export took the collector from {base:.0} to {peak_after:.0} MiB, past its 64 MiB budget"
    );
    // And protobuf: the same spans.
    let response = h1
        .post(c.http_url())
        .header("content-type", "application/x-protobuf")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(spans(n).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Whether the server closed `stream` (end of stream or reset) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Sends one protobuf export on `stream` and reads the answer's status line; the connection
/// stays open (keep-alive).
fn export_on(stream: &mut TcpStream) -> String {
    let body = spans(1).encode_to_vec();
    write!(
        stream,
        "POST /v1/traces HTTP/1.1\r\nHost: x\r\ncontent-type: application/x-protobuf\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_excess_connections_cannot_starve_clients() {
    let c = Collector::start(
        "hostile-connections",
        &["--max-connections", "50", "--idle-timeout-secs", "2"],
    );
    let addr = format!("127.0.0.1:{}", c.http_port);
    // 120 connections that say nothing: the port holds 50, and each one past them closes the
    // oldest silent one to make room.
    let mut idle: Vec<TcpStream> = (0..120)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let start = Instant::now();
    let evicted = idle
        .iter_mut()
        .take(70)
        .filter_map(|s| closed_within(s, Duration::from_millis(500)).then_some(()))
        .count();
    assert!(
        evicted >= 60,
        "only {evicted} of the 70 oldest silent connections were closed for the newer ones"
    );
    // With the port full of silent connections, a client with something to say gets in at
    // once (before, it waited for the idle timeout, or for ever against a client that kept
    // reopening them).
    let mut client = TcpStream::connect(&addr).unwrap();
    assert_eq!(export_on(&mut client), "HTTP/1.1 200 OK");
    // A head that stops half-way, and a body that never comes.
    let mut slow_head = TcpStream::connect(&addr).unwrap();
    let mut slow_body = TcpStream::connect(&addr).unwrap();
    let _ = slow_head.write_all(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n");
    let _ = slow_body.write_all(
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\ncontent-type: application/x-protobuf\r\ncontent-length: 1000\r\n\r\n",
    );
    // The silent ones left are closed after the idle timeout.
    for (i, s) in idle.iter_mut().skip(70).enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(6)),
            "idle connection {} still open {:?} after it was made",
            70 + i,
            start.elapsed()
        );
    }
    assert!(closed_within(&mut slow_head, Duration::from_secs(6)));
    assert!(closed_within(&mut slow_body, Duration::from_secs(6)));
    assert!(c.metric("tracer_collector_connections_evicted_total").await >= 60);
    assert!(
        c.metric("tracer_collector_connections_timed_out_total")
            .await
            >= 40
    );

    // Connections answered with a success are never closed for newcomers: with the port full
    // of them, a new connection is refused.
    let mut served: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            assert_eq!(export_on(&mut s), "HTTP/1.1 200 OK");
            s
        })
        .collect();
    let mut extra = TcpStream::connect(&addr).unwrap();
    assert!(closed_within(&mut extra, Duration::from_millis(500)));
    assert_eq!(export_on(&mut served[0]), "HTTP/1.1 200 OK");
    assert!(c.metric("tracer_collector_connections_refused_total").await >= 1);
    // The Grafana dashboard asks only for collector metrics that exist.
    let dashboard =
        std::fs::read_to_string(repo_root().join("docs/grafana-dashboard.json")).unwrap();
    for name in dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tracer_collector_"))
    {
        c.metric(name).await;
    }
}

/// POSTs `req` as OTLP/HTTP protobuf with the token; the status.
async fn export(
    c: &Collector,
    req: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> u16 {
    reqwest::Client::new()
        .post(c.http_url())
        .header("content-type", "application/x-protobuf")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(req.encode_to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// One trace id can hold any number of spans, and a span 128 attributes of 4 KiB: one answer of
/// the query API holds at most --max-trace-spans spans and --max-trace-mib of span data, the
/// first to arrive, says so and is counted; a search's traces share that limit. Spans cut at
/// ingest are counted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giant_traces_are_answered_in_part_and_counted() {
    let c = Collector::start(
        "hostile-giant",
        &[
            "--token",
            TOKEN,
            "--max-trace-spans",
            "2000",
            "--max-trace-mib",
            "1",
        ],
    );
    let now = now_nanos();
    // Trace 0x0a: 5,000 small spans in five batches, each the child of the one before.
    let long = [0x0a; 16];
    for b in 0..5u64 {
        let batch: Vec<_> = (0..1000u64)
            .map(|i| {
                let n = b * 1000 + i;
                let mut s = span(long, 0, None, "GET /a", now, n, 1);
                s.span_id = (n + 1).to_be_bytes().to_vec();
                if n > 0 {
                    s.parent_span_id = n.to_be_bytes().to_vec();
                }
                s
            })
            .collect();
        assert_eq!(export(&c, &request("giant", batch)).await, 200);
    }
    let started = Instant::now();
    let (status, body) = c.get(&format!("/api/traces/{}", hex::encode(long))).await;
    eprintln!("a 5,000-span trace answered in {:?}", started.elapsed());
    assert_eq!(status, 200);
    let t = &body["data"][0];
    let spans = t["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2000);
    // The first to arrive: span ids 1..=2000.
    assert!(spans
        .iter()
        .all(|s| u64::from_str_radix(s["spanID"].as_str().unwrap(), 16).unwrap() <= 2000));
    let said = t["warnings"].to_string();
    assert!(
        said.contains("this trace has 5000 spans; the first 2000 to arrive are shown"),
        "{said}"
    );
    assert_eq!(t["incomplete"], true);
    assert_eq!(c.metric("tracer_collector_traces_truncated_total").await, 1);

    // Trace 0x0b: 20 spans of 100 attributes of 1 KiB (~2 MiB of span data) against 1 MiB.
    let wide = [0x0b; 16];
    let batch: Vec<_> = (0..20u8)
        .map(|i| {
            let mut s = span(wide, i + 1, None, "GET /b", now, u64::from(i), 1);
            s.attributes = (0..100)
                .map(|k| kv(&format!("k{k}"), support::s(&"v".repeat(1024))))
                .collect();
            s
        })
        .collect();
    assert_eq!(export(&c, &request("giant", batch)).await, 200);
    let (_, body) = c.get(&format!("/api/traces/{}", hex::encode(wide))).await;
    let n = body["data"][0]["spans"].as_array().unwrap().len();
    assert!((5..20).contains(&n), "{n} spans of ~100 KiB in 1 MiB");
    assert_eq!(c.metric("tracer_collector_traces_truncated_total").await, 2);

    // A search finding both: 2,000 spans at most, all traces together.
    let (status, body) = c.get("/api/traces?service=giant&limit=20").await;
    assert_eq!(status, 200);
    let traces = body["data"].as_array().unwrap();
    let total: usize = traces
        .iter()
        .map(|t| t["spans"].as_array().unwrap().len())
        .sum();
    assert!(total <= 2000, "{total} spans in one search answer");
    assert!(c.metric("tracer_collector_traces_truncated_total").await >= 3);

    // A span of 200 attributes is cut to 128 at ingest, marked and counted.
    let mut s = span([0x0c; 16], 1, None, "GET /c", now, 0, 1);
    s.attributes = (0..200)
        .map(|k| kv(&format!("k{k}"), support::s("v")))
        .collect();
    assert_eq!(export(&c, &request("giant", vec![s])).await, 200);
    assert_eq!(c.metric("tracer_collector_spans_truncated_total").await, 1);
}

/// Operation names whose spans retention deleted are gone from the list (and the store) after
/// the next retention pass, which a start runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_names_without_spans_are_dropped() {
    let mut c = Collector::start(
        "hostile-op-prune",
        &["--token", TOKEN, "--retention-age", "1d"],
    );
    // The fresh name first: the old ones then fill the service's 1,000 and the overflow.
    let kept = span([0x0d; 16], 1, None, "GET /kept", now_nanos(), 0, 1);
    assert_eq!(export(&c, &request("minted", vec![kept])).await, 200);
    let old = now_nanos() - 3 * 86_400_000_000_000;
    let names: Vec<_> = (0..1100u64)
        .map(|i| {
            let mut trace = [0u8; 16];
            trace[..8].copy_from_slice(&(i + 1).to_be_bytes());
            span(trace, 1, None, &format!("GET /x/{i}/y"), old, 0, 1)
        })
        .collect();
    assert_eq!(export(&c, &request("minted", names)).await, 200);
    let (_, ops) = c.get("/api/services/minted/operations").await;
    assert_eq!(
        ops["data"].as_array().unwrap().len(),
        1001,
        "1,000 and the overflow"
    );
    // Retention runs every minute and once at start.
    c.kill9();
    c.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, ops) = c.get("/api/services/minted/operations").await;
        if ops["data"] == serde_json::json!(["GET /kept"]) {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {}", ops["data"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pass logs after its changes are visible, and the log reaches the test through a
    // reader thread: wait for the line too (asserting at once failed on CI with the line in
    // the output a moment later).
    while !c
        .log
        .lock()
        .unwrap()
        .contains("dropped 1000 operation names")
    {
        assert!(Instant::now() < deadline, "retention says what it dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
