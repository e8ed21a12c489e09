//! Redis, traced for real: redis-server from apt, driven by redis-cli and by redis-py (a
//! pipeline and a MULTI/EXEC transaction), with the agent's probes loaded. Every command comes
//! out as a CLIENT span (redis-cli's, Python's) and a SERVER span (redis-server's), with the
//! database conventions' attributes, error codes from error replies, and no value or password
//! anywhere in them.
mod support;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

/// A span's name, `db.query.text` and `db.response.status_code`.
type Summary = (String, String, Option<String>);

fn start_redis(port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt install redis-server; scripts/setup.sh installs it)");
    let proc = Proc(child);
    wait_for("redis-server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    proc
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PY: &str = r#"
import sys, redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), protocol=int(sys.argv[2]))
p = r.pipeline(transaction=False)
p.set("py:a", "s3cr3t-value")
p.incr("py:n")  # sent as INCRBY py:n 1
p.get("py:a")
p.execute()
t = r.pipeline(transaction=True)
t.incr("py:n")
t.hset("py:h", "field", "s3cr3t-value")
t.execute()
try:
    r.lpush("py:a", "x")
except redis.ResponseError:
    pass
"#;

fn python(port: u16, resp: u8) {
    let status = Command::new(tracer_test_support::topology::python())
        .args(["-c", PY, &port.to_string(), &resp.to_string()])
        .status()
        .expect("the venv's python (scripts/setup.sh makes it, with redis-py)");
    assert!(status.success(), "the redis-py client failed");
}

#[test]
fn redis_commands_become_client_and_server_spans() {
    require_root();
    let port = free_port();
    let _redis = start_redis(port);
    let receiver = OtlpReceiver::start(free_port());
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
    ]);
    assert_eq!(cli(port, &["SET", "user:42", "hunter2-value"]).trim(), "OK");
    assert_eq!(cli(port, &["GET", "user:42"]).trim(), "hunter2-value");
    // An error reply: the value is not an integer.
    cli(port, &["INCR", "user:42"]);
    // No password is configured: an error, and the password is kept nowhere.
    cli(port, &["AUTH", "hunter2"]);
    cli(port, &["SELECT", "2"]);
    python(port, 2);
    python(port, 3);

    // Per side, what each command's span says: (name, db.query.text, error code).
    let expected_cli = [
        ("SET", "SET user:42 ?", None),
        ("GET", "GET user:42", None),
        ("INCR", "INCR user:42", Some("ERR")),
        ("AUTH", "AUTH", Some("ERR")),
        ("SELECT", "SELECT 2", None),
    ];
    let expected_py = [
        ("SET", "SET py:a ?", None),
        ("INCRBY", "INCRBY py:n ?", None),
        ("GET", "GET py:a", None),
        ("MULTI", "MULTI", None),
        ("INCRBY", "INCRBY py:n ?", None),
        ("HSET", "HSET py:h ? ?", None),
        ("EXEC", "EXEC", None),
        ("LPUSH", "LPUSH py:a ?", Some("WRONGTYPE")),
    ];
    let want_spans = 2 * (expected_cli.len() + 2 * expected_py.len());
    let mut spans = Vec::new();
    wait_for("the Redis spans", Duration::from_secs(20), || {
        spans = receiver
            .spans()
            .into_iter()
            .filter(|s| s.str_attr("db.system.name").as_deref() == Some("redis"))
            .collect();
        // redis-py also sends CLIENT SETINFO / HELLO on connect: count the commands we sent.
        spans
            .iter()
            .filter(|s| !s.span.name.starts_with("CLIENT") && s.span.name != "HELLO")
            .count()
            >= want_spans
    });
    let log = agent.stop();

    let summary = |s: &Received| {
        (
            s.span.name.clone(),
            s.str_attr("db.query.text").unwrap_or_default(),
            s.str_attr("db.response.status_code"),
        )
    };
    let mut by_service: BTreeMap<(String, i32), Vec<Summary>> = BTreeMap::new();
    for s in &spans {
        if s.span.name.starts_with("CLIENT") || s.span.name == "HELLO" {
            continue;
        }
        by_service
            .entry((s.service(), s.span.kind))
            .or_default()
            .push(summary(s));
        for kv in &s.span.attributes {
            let text = format!("{:?}", kv.value);
            assert!(
                !text.contains("hunter2") && !text.contains("s3cr3t"),
                "a value or password in {}: {text}",
                kv.key
            );
        }
        assert_eq!(s.str_attr("server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(s.int_attr("server.port"), Some(i64::from(port)));
    }
    let as_owned = |list: &[(&str, &str, Option<&str>)]| -> Vec<_> {
        list.iter()
            .map(|(n, q, e)| (n.to_string(), q.to_string(), e.map(str::to_owned)))
            .collect()
    };
    const CLIENT: i32 = 3;
    const SERVER: i32 = 2;
    let cli_spans = by_service
        .get(&("redis-cli".into(), CLIENT))
        .cloned()
        .unwrap_or_default();
    assert_eq!(cli_spans, as_owned(&expected_cli), "{log}");
    // The two runs are one program, named by its executable (`python3.11`, not the venv's
    // `python` link) whether or not it exited before the agent read its /proc entry: the probes
    // send the executable's name with each new connection.
    let py_services: Vec<_> = by_service
        .keys()
        .filter(|(service, _)| service.starts_with("python"))
        .collect();
    assert_eq!(
        py_services,
        [&("python3.11".to_string(), CLIENT)],
        "{:?}",
        by_service.keys()
    );
    let py_spans = by_service[&("python3.11".to_string(), CLIENT)].clone();
    let mut twice = as_owned(&expected_py);
    twice.extend(as_owned(&expected_py));
    assert_eq!(py_spans, twice);
    // redis-server's side: every command, in its order of arrival per connection.
    let server = by_service
        .get(&("redis-server".into(), SERVER))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        server.len(),
        expected_cli.len() + 2 * expected_py.len(),
        "{:?}",
        by_service.keys()
    );
    // SELECT 2 changed the connection's database; the namespace follows it per connection.
    let select = spans.iter().find(|s| s.span.name == "SELECT").unwrap();
    assert_eq!(select.str_attr("db.namespace").as_deref(), Some("2"));
    // Client and server spans of one command share the TCP edge: one trace.
    let traces: std::collections::HashSet<_> = spans
        .iter()
        .filter(|s| s.span.name == "EXEC")
        .map(|s| s.span.trace_id.clone())
        .collect();
    assert_eq!(
        traces.len(),
        2,
        "each EXEC's client and server span share a trace"
    );
}
