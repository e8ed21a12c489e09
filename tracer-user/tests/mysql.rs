//! MariaDB, traced for real: a server from apt (a fresh data directory), driven by the
//! `mariadb` client (text queries, an error) and by mysql-connector-python (server-side
//! prepared statements: COM_STMT_PREPARE and COM_STMT_EXECUTE), with the agent's probes loaded.
//! Every command comes out as a CLIENT span and a SERVER span (mariadbd's), with sanitised
//! text, the table, the database, error codes, and no literal anywhere.
mod support;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

fn start_mariadb(dir: &Path, port: u16) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    assert!(Command::new("chown")
        .args(["mysql:mysql", dir.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let data = dir.join("data");
    let out = Command::new("mariadb-install-db")
        .args([
            "--user=mysql",
            &format!("--datadir={}", data.display()),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .output()
        .expect("mariadb-install-db (apt install mariadb-server; scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "mariadb-install-db: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = Command::new("mariadbd")
        .args([
            "--user=mysql",
            &format!("--datadir={}", data.display()),
            &format!("--port={port}"),
            "--bind-address=127.0.0.1",
            &format!("--socket={}", dir.join("sock").display()),
            // Any user, no password: the test is about the protocol, not accounts.
            "--skip-grant-tables",
            "--skip-log-bin",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mariadbd");
    let proc = Proc(child);
    wait_for("mariadbd to accept", Duration::from_secs(30), || {
        Command::new("mariadb-admin")
            .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "root"])
            .args(["--skip-ssl", "ping"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    proc
}

fn client(port: u16, sql: &str) -> Result<(), String> {
    let out = Command::new("mariadb")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "root"])
        .args(["--skip-ssl", "-D", "shop", "-e", sql])
        .output()
        .expect("the mariadb client");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

const PY: &str = r#"
import sys, mysql.connector
c = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user="root", database="shop", ssl_disabled=True, use_pure=True)
cur = c.cursor(prepared=True)
cur.execute("INSERT INTO items (id, name) VALUES (?, ?)", (7, "s3cr3t-name"))
cur.execute("SELECT name FROM items WHERE id = ?", (7,))
cur.fetchall()
c.commit()
c.close()
"#;

#[test]
fn mariadb_commands_become_client_and_server_spans() {
    require_root();
    let port = free_port();
    let dir = temp_dir("mariadb");
    let _db = start_mariadb(&dir, port);
    let setup = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-u",
            "root",
            "--skip-ssl",
        ])
        .args([
            "-e",
            "CREATE DATABASE shop; CREATE TABLE shop.items (id int primary key, name text)",
        ])
        .status()
        .unwrap();
    assert!(setup.success());
    let receiver = OtlpReceiver::start(free_port());
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--port",
        &port.to_string(),
    ]);
    client(port, "INSERT INTO items (id, name) VALUES (1, 'hunter2')").unwrap();
    client(port, "SELECT name FROM items WHERE id = 1").unwrap();
    assert!(client(port, "SELECT * FROM nowhere").is_err());
    let status = Command::new(tracer_test_support::topology::python())
        .args(["-c", PY, &port.to_string()])
        .status()
        .expect("the venv's python (scripts/setup.sh makes it, with mysql-connector-python)");
    assert!(status.success(), "the mysql-connector client failed");

    let db_spans = || -> Vec<Received> {
        receiver
            .spans()
            .into_iter()
            .filter(|s| s.str_attr("db.system.name").as_deref() == Some("mariadb"))
            .collect()
    };
    let mut spans = Vec::new();
    wait_for("the MariaDB spans", Duration::from_secs(20), || {
        spans = db_spans();
        let texts: Vec<_> = spans
            .iter()
            .filter_map(|s| s.str_attr("db.query.text"))
            .collect();
        texts
            .iter()
            .filter(|t| t.contains("items WHERE id"))
            .count()
            >= 4
            && texts.iter().any(|t| t.contains("nowhere"))
    });
    // Result sets end when the connection goes quiet or closes: let the last ones arrive.
    std::thread::sleep(Duration::from_secs(2));
    spans = db_spans();
    let log = agent.stop();

    for s in &spans {
        for kv in &s.span.attributes {
            let text = format!("{:?}", kv.value);
            assert!(
                !text.contains("hunter2") && !text.contains("s3cr3t"),
                "a literal in {}: {text}",
                kv.key
            );
        }
    }
    let summary = |kind: i32, service: &str| -> Vec<(String, String, Option<String>)> {
        spans
            .iter()
            .filter(|s| s.span.kind == kind && s.service().starts_with(service))
            .filter(|s| s.str_attr("db.query.text").is_some())
            .map(|s| {
                (
                    s.span.name.clone(),
                    s.str_attr("db.query.text").unwrap_or_default(),
                    s.str_attr("db.response.status_code"),
                )
            })
            .filter(|(_, text, _)| text.contains("items") || text.contains("nowhere"))
            .collect()
    };
    let owned = |v: &[(&str, &str, Option<&str>)]| -> Vec<(String, String, Option<String>)> {
        v.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.map(str::to_owned)))
            .collect()
    };
    const CLIENT: i32 = 3;
    const SERVER: i32 = 2;
    assert_eq!(
        summary(CLIENT, "mariadb"),
        owned(&[
            (
                "INSERT items",
                "INSERT INTO items (id, name) VALUES (?, ?)",
                None
            ),
            ("SELECT items", "SELECT name FROM items WHERE id = ?", None),
            ("SELECT nowhere", "SELECT * FROM nowhere", Some("1146")),
        ]),
        "{log}"
    );
    // Prepared statements: the prepare, then executions with the prepare's text.
    let insert = "INSERT INTO items (id, name) VALUES (?, ?)";
    let select = "SELECT name FROM items WHERE id = ?";
    assert_eq!(
        summary(CLIENT, "python"),
        owned(&[
            ("PREPARE items", insert, None),
            ("INSERT items", insert, None),
            ("PREPARE items", select, None),
            ("SELECT items", select, None),
        ]),
        "{log}"
    );
    let server = spans.iter().filter(|s| s.span.kind == SERVER).count();
    let client_count = spans.iter().filter(|s| s.span.kind == CLIENT).count();
    assert_eq!(server, client_count, "every command on both sides");
    let with_db = spans
        .iter()
        .find(|s| s.str_attr("db.query.text").as_deref() == Some(select))
        .unwrap();
    assert_eq!(with_db.str_attr("db.namespace").as_deref(), Some("shop"));
}
