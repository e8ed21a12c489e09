//! PostgreSQL, traced for real: a server from apt (initdb in a temporary directory), driven by
//! psql (simple queries) and psycopg (the extended protocol: parameters, a prepared statement,
//! a transaction, an error), with the agent's probes loaded. Every query comes out as a CLIENT
//! span and, on the backend's side, a SERVER span, with sanitised text, the table, the
//! database, row counts and SQLSTATE codes, and no literal anywhere.
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs a command as the `postgres` user (the server refuses to run as root).
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
        program,
    ]);
    cmd
}

fn start_postgres(dir: &Path, port: u16) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("chown")
        .args(["postgres:postgres", dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let data = dir.join("data");
    let out = as_postgres(&format!("{PG_BIN}/initdb"))
        .args([
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ])
        .stdout(Stdio::null())
        .output()
        .expect("initdb (apt install postgresql; scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = as_postgres(&format!("{PG_BIN}/postgres"))
        .args([
            "-D",
            data.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-k",
            dir.to_str().unwrap(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "ssl=off",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("postgres");
    let proc = Proc(child);
    wait_for("postgres to accept", Duration::from_secs(30), || {
        Command::new(format!("{PG_BIN}/pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    proc
}

fn psql(port: u16, sql: &str) {
    let status = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .env("PGSSLMODE", "disable")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("psql");
    // Errors are part of the test: only a client that could not run matters.
    assert!(status.code().is_some());
}

/// A small COPY from psql's standard input (two rows), and pgbench running a prepared query
/// ten times (`-M prepared`: Parse once, then Bind/Execute).
fn copy_and_pgbench(port: u16, dir: &Path) {
    let mut copy = Command::new("psql")
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres"])
        .args(["-c", "COPY items (name, price) FROM STDIN"])
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    use std::io::Write as _;
    copy.stdin
        .take()
        .unwrap()
        .write_all(b"copied-secret\t7\ncopied-secret\t8\n")
        .unwrap();
    assert!(copy.wait().unwrap().success(), "psql COPY");
    let script = dir.join("pgbench.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 10)\nSELECT name FROM items WHERE id = :id;\n",
    )
    .unwrap();
    let out = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-n", "-t", "10", "-M", "prepared", "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", "postgres", "-f"])
        .arg(&script)
        .arg("postgres")
        .env("PGSSLMODE", "disable")
        .output()
        .expect("pgbench");
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const PY: &str = r#"
import sys, psycopg
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="postgres", dbname="postgres", sslmode="disable") as c:
    c.execute("INSERT INTO items (name, price) VALUES (%s, %s)", ("s3cr3t-name", 10))
    c.execute("SELECT name FROM items WHERE price > %s", (5,), prepare=True).fetchall()
    c.execute("SELECT name FROM items WHERE price > %s", (6,), prepare=True).fetchall()
    c.commit()
    try:
        c.execute("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (1, "dup", 1))
    except psycopg.errors.UniqueViolation:
        c.rollback()
"#;

#[test]
fn postgres_queries_become_client_and_server_spans() {
    require_root();
    let port = free_port();
    let dir: PathBuf = temp_dir("postgres");
    let _pg = start_postgres(&dir, port);
    psql(
        port,
        "CREATE TABLE items (id serial PRIMARY KEY, name text, price int)",
    );
    let receiver = OtlpReceiver::start(free_port());
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
    ]);
    psql(
        port,
        "INSERT INTO items (name, price) VALUES ('hunter2', 4177)",
    );
    psql(port, "SELECT name, price FROM items WHERE price = 4177");
    psql(port, "SELECT * FROM nowhere");
    copy_and_pgbench(port, &dir);
    let status = Command::new(tracer_test_support::topology::python())
        .args(["-c", PY, &port.to_string()])
        .status()
        .expect("the venv's python (scripts/setup.sh makes it, with psycopg)");
    assert!(status.success(), "the psycopg client failed");

    let mut spans = Vec::new();
    wait_for("the PostgreSQL spans", Duration::from_secs(20), || {
        spans = receiver
            .spans()
            .into_iter()
            .filter(|s| s.str_attr("db.system.name").as_deref() == Some("postgresql"))
            .collect();
        spans.iter().filter(|s| s.span.kind == 3).count() >= 22
    });
    std::thread::sleep(Duration::from_millis(500));
    spans = receiver
        .spans()
        .into_iter()
        .filter(|s| s.str_attr("db.system.name").as_deref() == Some("postgresql"))
        .collect();
    let log = agent.stop();

    for s in &spans {
        for kv in &s.span.attributes {
            let text = format!("{:?}", kv.value);
            assert!(
                !text.contains("hunter2")
                    && !text.contains("s3cr3t")
                    && !text.contains("4177")
                    && !text.contains("copied-secret"),
                "a literal in {}: {text}",
                kv.key
            );
        }
        assert_eq!(s.str_attr("db.namespace").as_deref(), Some("postgres"));
        assert_eq!(s.int_attr("server.port"), Some(i64::from(port)));
    }
    let client: Vec<_> = spans.iter().filter(|s| s.span.kind == 3).collect();
    let server: Vec<_> = spans.iter().filter(|s| s.span.kind == 2).collect();
    let show = |list: &[&Received]| -> Vec<(String, String, String, Option<String>)> {
        list.iter()
            .map(|s| {
                (
                    s.service(),
                    s.span.name.clone(),
                    s.str_attr("db.query.text").unwrap_or_default(),
                    s.str_attr("db.response.status_code"),
                )
            })
            .collect()
    };
    let psql_spans: Vec<_> = show(&client)
        .into_iter()
        .filter(|(service, ..)| service == "psql")
        .filter(|(_, name, ..)| name != "COPY items")
        .map(|(_, name, text, code)| (name, text, code))
        .collect();
    let owned = |v: &[(&str, &str, Option<&str>)]| -> Vec<(String, String, Option<String>)> {
        v.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.map(str::to_owned)))
            .collect()
    };
    assert_eq!(
        psql_spans,
        owned(&[
            (
                "INSERT items",
                "INSERT INTO items (name, price) VALUES (?, ?)",
                None
            ),
            (
                "SELECT items",
                "SELECT name, price FROM items WHERE price = ?",
                None
            ),
            ("SELECT nowhere", "SELECT * FROM nowhere", Some("42P01")),
        ]),
        "{log}"
    );
    let select = client
        .iter()
        .find(|s| {
            s.str_attr("db.query.text").as_deref()
                == Some("SELECT name, price FROM items WHERE price = ?")
        })
        .unwrap();
    assert_eq!(select.int_attr("db.response.returned_rows"), Some(1));
    assert_eq!(
        select.str_attr("db.collection.name").as_deref(),
        Some("items")
    );

    // COPY: one span, its rows counted; pgbench: ten executions of the prepared text.
    let copy = client
        .iter()
        .find(|s| s.span.name == "COPY items")
        .unwrap_or_else(|| panic!("no COPY span: {:#?}", show(&client)));
    assert_eq!(
        copy.str_attr("db.query.text").as_deref(),
        Some("COPY items (name, price) FROM STDIN")
    );
    assert_eq!(copy.int_attr("db.response.returned_rows"), Some(2));
    let pgbench: Vec<_> = show(&client)
        .into_iter()
        .filter(|(service, ..)| service == "pgbench")
        .map(|(_, name, text, _)| (name, text))
        .collect();
    let executed = (
        "SELECT items".to_string(),
        "SELECT name FROM items WHERE id = $1;".to_string(),
    );
    assert_eq!(
        pgbench.iter().filter(|p| **p == executed).count(),
        10,
        "{pgbench:?}"
    );

    // psycopg: parameters travel apart from the text (the extended protocol); the prepared
    // statement's executions take the text of its Parse.
    let py: Vec<_> = show(&client)
        .into_iter()
        .filter(|(service, ..)| service.starts_with("python"))
        .map(|(_, name, text, code)| (name, text, code))
        .collect();
    let insert = "INSERT INTO items (name, price) VALUES ($1, $2)";
    let query = "SELECT name FROM items WHERE price > $1";
    let want = owned(&[
        ("BEGIN", "BEGIN", None),
        ("INSERT items", insert, None),
        ("SELECT items", query, None),
        ("SELECT items", query, None),
        ("COMMIT", "COMMIT", None),
        ("BEGIN", "BEGIN", None),
        (
            "INSERT items",
            "INSERT INTO items (id, name, price) VALUES ($1, $2, $3)",
            Some("23505"),
        ),
        ("ROLLBACK", "ROLLBACK", None),
        // psycopg forgets its prepared statements after a failed transaction.
        ("DEALLOCATE", "DEALLOCATE ALL", None),
    ]);
    assert_eq!(py, want, "{log}");
    // The backend's side: the same queries (psql's and psycopg's), each a SERVER span.
    assert_eq!(server.len(), client.len(), "{:#?}", show(&server));
}
