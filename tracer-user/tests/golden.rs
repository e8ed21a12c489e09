//! Golden fixtures: real traffic of each protocol, recorded by the probes
//! (`tests/fixtures/record.sh`: curl and Python's http.server, redis-cli and redis-py,
//! psql and psycopg, the mariadb client and mysql-connector-python, dig and getaddrinfo against
//! dnsmasq, each in a network
//! namespace of its own), replayed through the agent's pipeline (`tracer replay --spans`) and
//! compared with the spans expected of them (`*.spans.jsonl`: what a reviewer checked, kept
//! to the fields a protocol decides). Needs no root and no probes: it is the parsers' test on
//! real bytes. `TRACER_BLESS=1` rewrites the expected files.
use std::{path::Path, process::Command};

/// The attributes a protocol decides (ids, times, addresses and processes vary by run).
fn decided(key: &str) -> bool {
    key.starts_with("db.")
        || key.starts_with("http.")
        || key == "url.path"
        || key == "error.type"
        || key.starts_with("dns.")
        || key == "network.transport"
        || key == "server.port"
}

fn projection(line: &str) -> serde_json::Value {
    let span: serde_json::Value = serde_json::from_str(line).expect("a JSON span");
    let attributes: serde_json::Map<String, serde_json::Value> = span["attributes"]
        .as_object()
        .expect("attributes")
        .iter()
        .filter(|(k, _)| decided(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::json!({
        "kind": span["kind"],
        "service": span["service"],
        "name": span["name"],
        "status": span["status"],
        "attributes": attributes,
    })
}

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let recording = dir.join(format!("{name}.rec"));
    let expected_file = dir.join(format!("{name}.spans.jsonl"));
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["replay", "--spans"])
        .arg(&recording)
        .output()
        .expect("tracer replay");
    assert!(
        out.status.success(),
        "tracer replay {}: {}\n(a changed record layout needs new recordings: \
         tracer-user/tests/fixtures/record.sh)",
        recording.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| projection(l).to_string())
        .collect();
    if std::env::var_os("TRACER_BLESS").is_some() {
        std::fs::write(&expected_file, got.join("\n") + "\n").unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (TRACER_BLESS=1 writes it)",
            expected_file.display()
        )
    });
    let expected: Vec<String> = expected
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!expected.is_empty(), "{} is empty", expected_file.display());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "{name}: span {i} differs");
    }
    assert_eq!(got.len(), expected.len(), "{name}: span count");
}

#[test]
fn http_fixture() {
    check("http");
}

#[test]
fn redis_fixture() {
    check("redis");
}

#[test]
fn postgres_fixture() {
    check("postgres");
}

#[test]
fn mysql_fixture() {
    check("mysql");
}

#[test]
fn dns_fixture() {
    check("dns");
}
