//! DNS, traced for real: dnsmasq from apt answering on loopback in a network namespace of the
//! test's own, queried by dig (UDP, and TCP) and by glibc's getaddrinfo (A and AAAA sent
//! together with sendmmsg), with the agent following that namespace only. Every query comes
//! out as a CLIENT span with its name, type, response code and answer count, and as a SERVER
//! span on dnsmasq's side (its unconnected UDP socket, and TCP).
mod support;

use std::{process::Stdio, time::Duration};

use support::*;

/// `/etc/netns/NAME/resolv.conf` naming 127.0.0.1 (`ip netns exec` mounts it over
/// /etc/resolv.conf in the namespace), removed when dropped.
struct ResolvConf(String);

impl ResolvConf {
    fn new(netns: &str) -> ResolvConf {
        let etc = format!("/etc/netns/{netns}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        ResolvConf(etc)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dns_queries_become_spans() {
    require_root();
    let hosts = tracer_test_support::netns::Hosts::create(&["dns"]);
    let ns = hosts.host("dns");
    let _resolv = ResolvConf::new(&ns.netns);
    let dnsmasq = ns
        .command("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--address=/svc.test/10.1.2.3",
            "--host-record=db.test,10.1.2.4,fd00::4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (apt install dnsmasq-base; scripts/setup.sh installs it)");
    let _dnsmasq = Proc(dnsmasq);
    let dig = |args: &[&str]| -> String {
        let out = ns
            .command("dig")
            .args(["+short", "+tries=1", "+time=2", "@127.0.0.1"])
            .args(args)
            .output()
            .expect("dig (apt install bind9-dnsutils; scripts/setup.sh installs it)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    wait_for("dnsmasq to answer", Duration::from_secs(10), || {
        dig(&["svc.test"]) == "10.1.2.3"
    });
    let receiver = OtlpReceiver::start(free_port());
    // The agent runs on the host and exports there; it traces the namespace's sockets only.
    let netns_path = ns.netns_path();
    let agent = Agent::start(&[
        "--endpoint",
        &receiver.endpoint(),
        "--netns",
        netns_path.to_str().unwrap(),
    ]);

    assert_eq!(dig(&["svc.test", "A"]), "10.1.2.3");
    assert_eq!(dig(&["+tcp", "db.test", "AAAA"]), "fd00::4");
    assert_eq!(dig(&["nothing.invalid", "A"]), "");
    let lookup = ns
        .command("python3")
        .args([
            "-c",
            "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('db.test', 80)}))",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&lookup.stdout).trim(),
        "['10.1.2.4', 'fd00::4']"
    );

    let dns = || -> Vec<Received> {
        receiver
            .spans()
            .into_iter()
            .filter(|s| s.span.name.starts_with("DNS "))
            .collect()
    };
    let mut spans = Vec::new();
    wait_for("the DNS spans", Duration::from_secs(20), || {
        spans = dns();
        spans.len() >= 9
    });
    std::thread::sleep(Duration::from_millis(500));
    spans = dns();
    let log = agent.stop();
    let mut got: Vec<_> = spans
        .iter()
        .map(|s| {
            (
                s.span.kind,
                s.span.name.clone(),
                s.str_attr("dns.question.name").unwrap_or_default(),
                s.str_attr("dns.response.code").unwrap_or_default(),
                s.int_attr("dns.answer.count").unwrap_or(-1),
                s.str_attr("network.transport").unwrap_or_default(),
                s.span.status.as_ref().map_or(0, |st| st.code),
            )
        })
        .collect();
    got.sort();
    const CLIENT: i32 = 3;
    const SERVER: i32 = 2;
    let row = |kind, name: &str, q: &str, code: &str, n, transport: &str, status| {
        (
            kind,
            name.to_owned(),
            q.to_owned(),
            code.to_owned(),
            n,
            transport.to_owned(),
            status,
        )
    };
    let mut want = vec![
        // dig, UDP.
        row(CLIENT, "DNS A", "svc.test", "NOERROR", 1, "udp", 0),
        // dnsmasq has nowhere to send a name it does not know.
        row(CLIENT, "DNS A", "nothing.invalid", "REFUSED", 0, "udp", 2),
        // getaddrinfo: A and AAAA in one sendmmsg.
        row(CLIENT, "DNS A", "db.test", "NOERROR", 1, "udp", 0),
        row(CLIENT, "DNS AAAA", "db.test", "NOERROR", 1, "udp", 0),
        // dig +tcp, both sides: dig writes the length and the message as two buffers of one
        // writev (the probes capture a vectored write's buffers in order).
        row(CLIENT, "DNS AAAA", "db.test", "NOERROR", 1, "tcp", 0),
        row(SERVER, "DNS AAAA", "db.test", "NOERROR", 1, "tcp", 0),
        // dnsmasq's side of the UDP queries, on its unconnected socket.
        row(SERVER, "DNS A", "svc.test", "NOERROR", 1, "udp", 0),
        row(SERVER, "DNS A", "nothing.invalid", "REFUSED", 0, "udp", 2),
        row(SERVER, "DNS A", "db.test", "NOERROR", 1, "udp", 0),
        row(SERVER, "DNS AAAA", "db.test", "NOERROR", 1, "udp", 0),
    ];
    want.sort();
    assert_eq!(got, want, "{log}");
    // An unconnected socket has no one peer: the server's UDP spans name none.
    for s in spans.iter().filter(|s| {
        s.span.kind == SERVER && s.str_attr("network.transport").as_deref() == Some("udp")
    }) {
        assert_eq!(s.str_attr("network.peer.address"), None);
        assert_eq!(s.str_attr("client.address"), None);
        assert_eq!(s.int_attr("server.port"), Some(53));
    }
}
