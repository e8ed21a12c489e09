//! A stand-in for a collector on another machine: an OTLP/HTTP endpoint that reads each request
//! and answers 200 without decoding or storing anything.
//!
//! The bench's traced runs export to a real collector, which shares the 2 cores with nginx and
//! wrk and takes a large part of the throughput lost at saturation. Deployed, the collector runs
//! elsewhere; exporting to this sink measures what the agent and the probes cost the traced
//! machine alone. Reading a request costs the sink about a memory copy of its body (~1 MiB per
//! 2048 spans), well under 1% of a core at the bench's rates.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use anyhow::Context as _;

/// What the sink has read so far.
#[derive(Default)]
pub struct SinkCounts {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// Requests it could not read (no `content-length`, a broken connection).
    pub bad: AtomicU64,
}

/// Listens on a free loopback port until the process ends; returns the port and the counts.
pub fn start() -> anyhow::Result<(u16, Arc<SinkCounts>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the OTLP sink")?;
    let port = listener.local_addr()?.port();
    let counts = Arc::new(SinkCounts::default());
    let shared = counts.clone();
    std::thread::Builder::new()
        .name("otlp-sink".into())
        .spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let counts = shared.clone();
                std::thread::spawn(move || {
                    if serve(stream, &counts).is_err() {
                        counts.bad.fetch_add(1, Relaxed);
                    }
                });
            }
        })?;
    Ok((port, counts))
}

/// Answers the requests of one keep-alive connection until the client closes it.
fn serve(stream: TcpStream, counts: &SinkCounts) -> anyhow::Result<()> {
    let mut out = stream.try_clone()?;
    let mut input = BufReader::with_capacity(256 * 1024, stream);
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        // The request line; end of stream here is the client closing an idle connection.
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = None;
        loop {
            line.clear();
            if input.read_line(&mut line)? == 0 {
                anyhow::bail!("connection closed inside a request head");
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>()?);
                }
            }
        }
        // The agent always sends a length; anything else is answered 411 and counted.
        let Some(length) = length else {
            out.write_all(b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\n\r\n")?;
            anyhow::bail!("a request without content-length");
        };
        body.resize(length, 0);
        input.read_exact(&mut body)?;
        counts.requests.fetch_add(1, Relaxed);
        counts.bytes.fetch_add(length as u64, Relaxed);
        // An empty ExportTraceServiceResponse: everything accepted.
        out.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )?;
    }
}
