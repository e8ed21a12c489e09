//! File descriptors change what they are: the probes remember fds that are not TCP sockets (so
//! file reads and writes cost one lookup), and must forget them when the number is given to a
//! socket. Real probes, real nginx: a client writes to a file on fd N, then `dup2`s a connection
//! to nginx over N and sends requests on it; its client spans must arrive.
mod support;

use std::{
    io::Write as _,
    net::TcpStream,
    os::fd::{AsRawFd as _, FromRawFd as _},
    time::Duration,
};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::*;

#[test]
fn a_socket_dup2ed_over_a_file_descriptor_is_traced() {
    require_root();
    let (nginx_port, receiver, agent, _nginx) = traced_nginx();

    // Writes on a file fd: the probes classify it as "not TCP" and remember that.
    let dir = temp_dir("fd-reuse");
    let mut file = std::fs::File::create(dir.join("log")).unwrap();
    for i in 0..20 {
        writeln!(file, "line {i}").unwrap();
    }
    let fd = file.as_raw_fd();

    // The same number becomes a connection to nginx.
    let conn = TcpStream::connect(addr(nginx_port)).unwrap();
    // SAFETY: both fds are open and owned here; dup2 closes `fd` (the file) and makes it a
    // copy of the socket. `file` is forgotten so it does not close the new meaning of `fd`.
    assert_eq!(unsafe { libc::dup2(conn.as_raw_fd(), fd) }, fd);
    std::mem::forget(file);
    drop(conn);
    // SAFETY: `fd` is now a connected TCP socket owned by nothing else.
    let mut reused = unsafe { TcpStream::from_raw_fd(fd) };
    for _ in 0..3 {
        let raw = format!("GET /ok HTTP/1.1\r\nHost: 127.0.0.1:{nginx_port}\r\n\r\n");
        assert_eq!(request(&mut reused, &raw).status, 200);
    }
    drop(reused);

    // 3 requests, each seen by nginx (server) and by this process on the reused fd (client).
    wait_for("client and server spans", Duration::from_secs(20), || {
        receiver.spans().len() >= 6
    });
    std::thread::sleep(Duration::from_millis(500));
    let spans = receiver.spans();
    let log = agent.stop();
    let clients = spans
        .iter()
        .filter(|s| s.span.kind == SpanKind::Client as i32)
        .count();
    let servers = spans
        .iter()
        .filter(|s| s.span.kind == SpanKind::Server as i32)
        .count();
    assert_eq!(
        (clients, servers),
        (3, 3),
        "3 client spans from the dup2'ed fd and 3 nginx server spans; agent log:\n{log}"
    );
}
