//! A real OpenTelemetry SDK (Python opentelemetry-sdk + OTLP exporters from PyPI) sends spans over
//! gRPC and over HTTP; the query API returns them with every attribute intact.
mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

const SCRIPT: &str = r#"
import sys
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

proto, endpoint, token, service = sys.argv[1:5]
if proto == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, headers=(("authorization", "Bearer " + token),))
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, headers={"authorization": "Bearer " + token})
provider = TracerProvider(resource=Resource.create(
    {"service.name": service, "deployment.environment": "test", "host.name": "sdk-host"}))
# One export per span: the child arrives before its parent, in separate requests.
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("shop.checkout", "1.2.3")
attrs = {"http.request.method": "POST", "http.response.status_code": 200, "cart.items": 3,
         "cart.total": 59.9, "cart.express": True, "cart.skus": ["a1", "b2"]}
with tracer.start_as_current_span("checkout", kind=trace.SpanKind.SERVER, attributes=attrs) as root:
    with tracer.start_as_current_span("charge-card", kind=trace.SpanKind.CLIENT,
                                      attributes={"payment.provider": "acme"}) as child:
        child.add_event("retry", {"attempt": 2})
        child.set_status(Status(StatusCode.ERROR, "card declined"))
    trace_id = format(root.get_span_context().trace_id, "032x")
provider.shutdown()
print(trace_id)
"#;

fn python() -> std::path::PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh (installs the OpenTelemetry SDK)",
        py.display()
    );
    py
}

fn send(proto: &str, endpoint: &str, service: &str) -> String {
    let out = Command::new(python())
        .args(["-c", SCRIPT, proto, endpoint, "tok", service])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn tag<'a>(tags: &'a Value, key: &str) -> &'a Value {
    tags.as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == key)
        .unwrap_or_else(|| panic!("tag {key} missing in {tags}"))
}

fn check_trace(trace: &Value, service: &str) {
    let spans = trace["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2, "{trace}");
    let root = spans
        .iter()
        .find(|s| s["operationName"] == "checkout")
        .unwrap();
    let child = spans
        .iter()
        .find(|s| s["operationName"] == "charge-card")
        .unwrap();
    let process = &trace["processes"][root["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], service);
    assert_eq!(
        tag(&process["tags"], "deployment.environment")["value"],
        "test"
    );
    assert_eq!(
        tag(&process["tags"], "telemetry.sdk.language")["value"],
        "python"
    );

    let t = &root["tags"];
    assert_eq!(tag(t, "http.request.method")["value"], "POST");
    assert_eq!(
        (
            tag(t, "http.response.status_code")["type"].as_str(),
            tag(t, "http.response.status_code")["value"].as_i64()
        ),
        (Some("int64"), Some(200))
    );
    assert_eq!(tag(t, "cart.items")["value"], 3);
    assert_eq!(
        (
            tag(t, "cart.total")["type"].as_str(),
            tag(t, "cart.total")["value"].as_f64()
        ),
        (Some("float64"), Some(59.9))
    );
    assert_eq!(tag(t, "cart.express")["value"], true);
    assert_eq!(tag(t, "cart.skus")["value"], r#"["a1","b2"]"#);
    assert_eq!(tag(t, "span.kind")["value"], "server");
    assert_eq!(tag(t, "otel.scope.name")["value"], "shop.checkout");
    // A root has no references: left out, as Jaeger leaves empty lists out.
    assert!(root.get("references").is_none(), "{root}");

    let c = &child["tags"];
    assert_eq!(tag(c, "payment.provider")["value"], "acme");
    assert_eq!(tag(c, "span.kind")["value"], "client");
    assert_eq!(tag(c, "error")["value"], true);
    assert_eq!(tag(c, "otel.status_description")["value"], "card declined");
    let r = &child["references"][0];
    assert_eq!(
        (r["refType"].as_str(), r["spanID"].as_str()),
        (Some("CHILD_OF"), root["spanID"].as_str())
    );
    let log = &child["logs"][0];
    assert_eq!(tag(&log["fields"], "event")["value"], "retry");
    assert_eq!(tag(&log["fields"], "attempt")["value"], 2);
    assert!(child["startTime"].as_u64() >= root["startTime"].as_u64());
    assert!(child["duration"].as_u64() <= root["duration"].as_u64());
}

#[tokio::test]
async fn python_sdk_spans_over_grpc_and_http_are_stored_intact() {
    let c = Collector::start("otel-sdk", &["--token", "tok"]);
    let grpc_trace = send("grpc", &format!("localhost:{}", c.grpc_port), "py-grpc");
    let http_trace = send("http", &c.http_url(), "py-http");
    for (id, service) in [(&grpc_trace, "py-grpc"), (&http_trace, "py-http")] {
        let (st, body) = c.get(&format!("/api/traces/{id}")).await;
        assert_eq!(st, 200, "trace {id} from {service}: {body}");
        check_trace(&body["data"][0], service);
    }
    // Found by search too: service, operation, and a tag.
    let (_, services) = c.get("/api/services").await;
    for s in ["py-grpc", "py-http"] {
        assert!(
            services["data"].as_array().unwrap().iter().any(|v| v == s),
            "{services}"
        );
    }
    let (_, ops) = c.get("/api/services/py-grpc/operations").await;
    assert_eq!(ops["data"], serde_json::json!(["charge-card", "checkout"]));
    let (_, found) = c.get("/api/traces?service=py-http&operation=charge-card&tags=%7B%22payment.provider%22%3A%22acme%22%7D&lookback=1h").await;
    assert_eq!(found["data"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found["data"][0]["traceID"], http_trace.as_str());
    let (_, none) = c
        .get("/api/traces?service=py-http&tags=%7B%22payment.provider%22%3A%22other%22%7D")
        .await;
    assert!(none["data"].as_array().unwrap().is_empty());
    // A wrong token is refused by the SDK's exporter path too (nothing stored).
    let out = Command::new(python())
        .args([
            "-c",
            &SCRIPT.replace("\"Bearer \" + token", "\"Bearer wrong\""),
            "http",
            &c.http_url(),
            "tok",
            "py-denied",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (_, services) = c.get("/api/services").await;
    assert!(!services["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "py-denied"));
}
