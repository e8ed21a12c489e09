//! The query API's JSON, field by field, against Jaeger's documented shapes (jaeger's
//! `model/json` structs and the query service's `structuredResponse`), which Grafana's Jaeger
//! data source and the Jaeger UI read: the envelope `{data, total, limit, offset, errors}`, a
//! trace `{traceID, spans, processes, warnings?}`, a span's fields and their JSON types, tags
//! `{key, type, value}` whose value matches its type, references, logs, processes, operations
//! `{name, spanKind}`, dependency links `{parent, child, callCount}`, and errors
//! `{code, msg}`. Jaeger leaves empty optional fields out (`omitempty`); so must we: never
//! `null` where a list is expected.
mod support;

use opentelemetry_proto::tonic::trace::v1::{span::Event, span::Link, Status};
use prost::Message as _;
use serde_json::Value;
use support::*;

/// Keys every object of a kind must have, and the ones it may have besides.
fn keys(v: &Value, what: &str, required: &[&str], optional: &[&str]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    for k in required {
        assert!(obj.contains_key(*k), "{what} lacks {k:?}: {v}");
    }
    for k in obj.keys() {
        assert!(
            required.contains(&k.as_str()) || optional.contains(&k.as_str()),
            "{what} has {k:?}, which Jaeger's model does not: {v}"
        );
    }
    for k in optional {
        assert!(
            !obj.get(*k).is_some_and(Value::is_null),
            "{what}.{k} is null: Jaeger leaves an empty one out: {v}"
        );
    }
}

fn string(v: &Value, what: &str) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
        .to_owned()
}

fn number(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a non-negative integer: {v}"))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not an array: {v}"))
}

fn hex_id(v: &Value, what: &str, max_len: usize) {
    let s = string(v, what);
    assert!(
        !s.is_empty() && s.len() <= max_len && s.bytes().all(|b| b.is_ascii_hexdigit()),
        "{what} {s:?} is not up to {max_len} hex digits"
    );
}

/// A success envelope; its `data`.
fn envelope<'a>(body: &'a Value, what: &str) -> &'a Value {
    keys(
        body,
        what,
        &["data", "total", "limit", "offset", "errors"],
        &[],
    );
    number(&body["total"], "total");
    number(&body["limit"], "limit");
    number(&body["offset"], "offset");
    assert!(
        body["errors"].is_null() || body["errors"].as_array().is_some(),
        "{what}.errors: {body}"
    );
    &body["data"]
}

/// An error envelope with `status`.
fn error_envelope(status: u16, body: &Value, what: &str) {
    keys(
        body,
        what,
        &["data", "total", "limit", "offset", "errors"],
        &[],
    );
    assert!(body["data"].is_null(), "{what}: {body}");
    let errors = array(&body["errors"], "errors");
    assert_eq!(errors.len(), 1, "{what}: {body}");
    keys(&errors[0], "error", &["code", "msg"], &["traceID"]);
    assert_eq!(number(&errors[0]["code"], "code"), u64::from(status));
    assert!(!string(&errors[0]["msg"], "msg").is_empty());
}

fn key_value(v: &Value, what: &str) {
    keys(v, what, &["key", "type", "value"], &[]);
    string(&v["key"], "key");
    let value = &v["value"];
    let ok = match string(&v["type"], "type").as_str() {
        "string" | "binary" => value.is_string(),
        "bool" => value.is_boolean(),
        "int64" => value.is_i64() || value.is_u64(),
        "float64" => value.is_number(),
        other => panic!("{what}: type {other:?} is not one of Jaeger's"),
    };
    assert!(ok, "{what}: the value does not match its type: {v}");
}

/// A trace in Jaeger's `model/json.Trace` shape; its spans by operation name.
fn trace(t: &Value) -> std::collections::HashMap<String, Value> {
    // `incomplete` and `incompleteReasons` are this collector's own (the UI shows them); Jaeger
    // readers ignore unknown fields.
    keys(
        t,
        "trace",
        &["traceID", "spans", "processes"],
        &["warnings", "incomplete", "incompleteReasons"],
    );
    hex_id(&t["traceID"], "traceID", 32);
    let processes = t["processes"]
        .as_object()
        .unwrap_or_else(|| panic!("processes is not an object: {t}"));
    for (id, p) in processes {
        keys(p, &format!("process {id}"), &["serviceName"], &["tags"]);
        string(&p["serviceName"], "serviceName");
        if let Some(tags) = p.get("tags") {
            array(tags, "process tags")
                .iter()
                .for_each(|kv| key_value(kv, "process tag"));
        }
    }
    let mut by_name = std::collections::HashMap::new();
    for s in array(&t["spans"], "spans") {
        keys(
            s,
            "span",
            &[
                "traceID",
                "spanID",
                "operationName",
                "startTime",
                "duration",
                "processID",
            ],
            &["flags", "references", "tags", "logs", "warnings"],
        );
        assert_eq!(s["traceID"], t["traceID"]);
        hex_id(&s["spanID"], "spanID", 16);
        number(&s["startTime"], "startTime");
        number(&s["duration"], "duration");
        if let Some(f) = s.get("flags") {
            number(f, "flags");
        }
        let pid = string(&s["processID"], "processID");
        assert!(
            processes.contains_key(&pid),
            "processID {pid} not in processes"
        );
        for r in s
            .get("references")
            .map_or(&vec![], |r| array(r, "references"))
        {
            keys(r, "reference", &["refType", "traceID", "spanID"], &[]);
            let kind = string(&r["refType"], "refType");
            assert!(kind == "CHILD_OF" || kind == "FOLLOWS_FROM", "{kind}");
            hex_id(&r["traceID"], "reference traceID", 32);
            hex_id(&r["spanID"], "reference spanID", 16);
        }
        for kv in s.get("tags").map_or(&vec![], |t| array(t, "tags")) {
            key_value(kv, "span tag");
        }
        for log in s.get("logs").map_or(&vec![], |l| array(l, "logs")) {
            keys(log, "log", &["timestamp"], &["fields"]);
            number(&log["timestamp"], "log timestamp");
            for kv in log.get("fields").map_or(&vec![], |f| array(f, "fields")) {
                key_value(kv, "log field");
            }
        }
        for w in s.get("warnings").map_or(&vec![], |w| array(w, "warnings")) {
            string(w, "warning");
        }
        by_name.insert(string(&s["operationName"], "operationName"), s.clone());
    }
    by_name
}

fn attr(
    key: &str,
    value: opentelemetry_proto::tonic::common::v1::any_value::Value,
) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    kv(key, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_answers_in_jaeger_s_shapes() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    let c = Collector::start("jaeger-shapes", &[]);
    let now = now_nanos();
    let trace_id = [0x5au8; 16];
    let mut root = span(trace_id, 1, None, "GET /orders/{id}", now, 0, 3000);
    root.attributes = vec![
        attr("http.request.method", V::StringValue("GET".into())),
        attr("http.response.status_code", V::IntValue(500)),
        attr("tracer.sample.ratio", V::DoubleValue(0.5)),
        attr("tracer.cached", V::BoolValue(false)),
    ];
    root.status = Some(Status {
        code: 2,
        message: "upstream failed".into(),
    });
    root.events = vec![Event {
        time_unix_nano: now + 1_000_000,
        name: "retry".into(),
        attributes: vec![attr("attempt", V::IntValue(2))],
        ..Default::default()
    }];
    let mut child = span(trace_id, 2, Some(1), "SELECT orders", now, 500, 1000);
    child.kind = 3;
    child.links = vec![Link {
        trace_id: vec![0x11; 16],
        span_id: vec![0x22; 8],
        ..Default::default()
    }];
    let client = reqwest::Client::new();
    for req in [request("shop", vec![root]), request("db", vec![child])] {
        let r = client
            .post(c.http_url())
            .header("content-type", "application/x-protobuf")
            .body(req.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let id = "5a".repeat(16);

    // /api/services: a list of names.
    let (status, body) = c.get("/api/services").await;
    assert_eq!(status, 200);
    let services: Vec<String> = array(envelope(&body, "/api/services"), "services")
        .iter()
        .map(|s| string(s, "service"))
        .collect();
    assert!(services.contains(&"shop".into()) && services.contains(&"db".into()));
    assert_eq!(number(&body["total"], "total"), services.len() as u64);

    // /api/services/{service}/operations (what Grafana asks): names.
    let (status, body) = c.get("/api/services/shop/operations").await;
    assert_eq!(status, 200);
    let names = array(envelope(&body, "operations"), "operations");
    assert_eq!(names, &vec![Value::from("GET /orders/{id}")]);

    // /api/operations?service=&spanKind=: {name, spanKind}.
    let (status, body) = c.get("/api/operations?service=db&spanKind=client").await;
    assert_eq!(status, 200);
    let ops = array(envelope(&body, "/api/operations"), "operations");
    assert_eq!(ops.len(), 1);
    keys(&ops[0], "operation", &["name", "spanKind"], &[]);
    assert_eq!(ops[0]["name"], "SELECT orders");
    assert_eq!(ops[0]["spanKind"], "client");
    let (status, body) = c.get("/api/operations").await;
    assert_eq!(status, 400);
    error_envelope(400, &body, "/api/operations without a service");

    // /api/traces/{id}: one trace in `data`.
    let (status, body) = c.get(&format!("/api/traces/{id}")).await;
    assert_eq!(status, 200);
    let data = array(envelope(&body, "/api/traces/{id}"), "traces");
    assert_eq!(data.len(), 1);
    let spans = trace(&data[0]);
    let root = &spans["GET /orders/{id}"];
    let child = &spans["SELECT orders"];
    assert_eq!(number(&root["startTime"], "startTime"), now / 1000);
    assert_eq!(number(&root["duration"], "duration"), 3000);
    assert!(
        root.get("references").is_none(),
        "a root has no references: {root}"
    );
    let tag = |s: &Value, k: &str| {
        s["tags"]
            .as_array()
            .and_then(|t| t.iter().find(|kv| kv["key"] == k).cloned())
            .unwrap_or_else(|| panic!("no tag {k} in {s}"))
    };
    assert_eq!(tag(root, "http.response.status_code")["type"], "int64");
    assert_eq!(tag(root, "tracer.sample.ratio")["type"], "float64");
    assert_eq!(tag(root, "tracer.cached")["type"], "bool");
    assert_eq!(tag(root, "error")["value"], true);
    assert_eq!(tag(root, "span.kind")["value"], "server");
    assert_eq!(root["logs"][0]["timestamp"], now / 1000 + 1000);
    let refs = array(&child["references"], "references");
    assert_eq!(refs[0]["refType"], "CHILD_OF");
    assert_eq!(refs[0]["spanID"], "0101010101010101");
    assert_eq!(refs[1]["refType"], "FOLLOWS_FROM");
    let processes = &data[0]["processes"];
    let pid = string(&child["processID"], "processID");
    assert_eq!(processes[&pid]["serviceName"], "db");

    // /api/traces?service=...: the same shape, found by search (Grafana's query).
    let (status, body) = c
        .get("/api/traces?service=shop&operation=GET%20%2Forders%2F%7Bid%7D&limit=20&lookback=1h&tags=%7B%22error%22%3A%22true%22%7D")
        .await;
    assert_eq!(status, 200);
    let found = array(envelope(&body, "/api/traces"), "traces");
    assert_eq!(found.len(), 1, "{body}");
    trace(&found[0]);

    // Errors: an unknown trace (404) and a malformed id (400).
    let (status, body) = c.get(&format!("/api/traces/{}", "ab".repeat(16))).await;
    assert_eq!(status, 404);
    error_envelope(404, &body, "an unknown trace");
    let (status, body) = c.get("/api/traces/not-hex").await;
    assert_eq!(status, 400);
    error_envelope(400, &body, "a malformed trace id");

    // /api/dependencies?endTs=&lookback= (the service map): {parent, child, callCount}, and
    // Jaeger's `service` filter.
    let end_ms = now_nanos() / 1_000_000 + 1000;
    for query in ["", "&service=db", "&service=elsewhere"] {
        let (status, body) = c
            .get(&format!(
                "/api/dependencies?endTs={end_ms}&lookback=3600000{query}"
            ))
            .await;
        assert_eq!(status, 200);
        let links = array(envelope(&body, "/api/dependencies"), "links");
        for l in links {
            // The error count and durations are this collector's own (its service map).
            keys(
                l,
                "dependency link",
                &["parent", "child", "callCount"],
                &["errorCount", "avgDurationMicros", "p95DurationMicros"],
            );
            string(&l["parent"], "parent");
            string(&l["child"], "child");
            number(&l["callCount"], "callCount");
        }
        let shop_db = links
            .iter()
            .any(|l| l["parent"] == "shop" && l["child"] == "db" && l["callCount"] == 1);
        assert_eq!(shop_db, query != "&service=elsewhere", "{query}: {body}");
    }

    // Grafana's search: start and end in microseconds, `lookback=custom`, tags as JSON.
    let (start_us, end_us) = (now / 1000 - 60_000_000, now_nanos() / 1000 + 60_000_000);
    let (status, body) = c
        .get(&format!(
            "/api/traces?service=shop&limit=20&start={start_us}&end={end_us}&lookback=custom&minDuration=1ms&maxDuration=1s"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        array(envelope(&body, "Grafana's search"), "traces").len(),
        1
    );

    // The Jaeger UI's lookup by ids: the traces found, and an error {msg, traceID} for each
    // that is not.
    let missing = "cd".repeat(16);
    let (status, body) = c
        .get(&format!("/api/traces?traceID={id}&traceID={missing}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let found = array(envelope(&body, "a lookup by ids"), "traces");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["traceID"], id.as_str());
    let errors = array(&body["errors"], "errors");
    assert_eq!(errors.len(), 1, "{body}");
    keys(&errors[0], "error", &["msg", "traceID"], &["code"]);
    assert_eq!(errors[0]["traceID"], missing.as_str());

    // Parameters Jaeger refuses with 400 and its error envelope.
    for query in [
        "/api/traces?service=shop&limit=many",
        "/api/traces?service=shop&minDuration=fast",
        "/api/traces?service=shop&minDuration=2s&maxDuration=1s",
        "/api/traces?service=shop&start=yesterday",
        "/api/traces?service=shop&tag=nocolon",
        "/api/traces?service=shop&tags=notjson",
        "/api/traces?traceID=not-hex",
        "/api/dependencies?endTs=now",
        "/api/dependencies?endTs=1&lookback=long",
    ] {
        let (status, body) = c.get(query).await;
        assert_eq!(status, 400, "{query}: {body}");
        error_envelope(400, &body, query);
    }
    // An unknown endpoint: 404 in the same envelope.
    let (status, body) = c.get("/api/nothing").await;
    assert_eq!(status, 404);
    error_envelope(404, &body, "/api/nothing");
}
