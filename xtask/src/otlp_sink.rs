//! A stand-in for a collector on another machine: an OTLP/HTTP endpoint that reads each request
//! and answers 200 without decoding or storing anything.
//!
//! The bench's traced runs export to a real collector, which shares the 2 cores with nginx and
//! wrk and takes a large part of the throughput lost at saturation. Deployed, the collector runs
//! elsewhere; exporting to this sink measures what the agent and the probes cost the traced
//! machine alone. Reading a request costs the sink about a memory copy of its body (~1 MiB per
//! 2048 spans), well under 1% of a core at the bench's rates.
//!
//! The SDK comparison (`sdk_bench.rs`) also needs the spans delivered, from senders that count
//! nothing themselves; a sink started by `start_counting_spans` decodes each body (gunzipped if
//! need be) to count them, at a few hundred requests a second.
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
    /// Requests it could not read (no `content-length`, a broken connection, a body that is
    /// not an `ExportTraceServiceRequest` when counting spans).
    pub bad: AtomicU64,
    /// Spans in the bodies read, when started by `start_counting_spans`.
    pub spans: AtomicU64,
    count_spans: bool,
}

/// Listens on a free loopback port until the process ends; returns the port and the counts.
pub fn start() -> anyhow::Result<(u16, Arc<SinkCounts>)> {
    listen(SinkCounts::default())
}

/// As `start`, and decodes each body to count its spans.
pub fn start_counting_spans() -> anyhow::Result<(u16, Arc<SinkCounts>)> {
    listen(SinkCounts {
        count_spans: true,
        ..SinkCounts::default()
    })
}

fn listen(counts: SinkCounts) -> anyhow::Result<(u16, Arc<SinkCounts>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the OTLP sink")?;
    let port = listener.local_addr()?.port();
    let counts = Arc::new(counts);
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
        let mut chunked = false;
        let mut gzip = false;
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
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                } else if name.eq_ignore_ascii_case("content-encoding") {
                    gzip = value.trim().eq_ignore_ascii_case("gzip");
                }
            }
        }
        // The agent always sends a length, the Node.js SDK chunks; anything else is answered 411
        // and counted.
        if chunked {
            read_chunked(&mut input, &mut body)?;
        } else if let Some(length) = length {
            body.resize(length, 0);
            input.read_exact(&mut body)?;
        } else {
            out.write_all(b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\n\r\n")?;
            anyhow::bail!("a request without content-length");
        }
        counts.requests.fetch_add(1, Relaxed);
        counts.bytes.fetch_add(body.len() as u64, Relaxed);
        if counts.count_spans {
            match count_spans(&body, gzip) {
                Ok(n) => counts.spans.fetch_add(n, Relaxed),
                Err(_) => counts.bad.fetch_add(1, Relaxed),
            };
        }
        // An empty ExportTraceServiceResponse: everything accepted.
        out.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )?;
    }
}

/// A chunked body (RFC 9112 §7.1) into `body`; trailer fields are read and ignored.
fn read_chunked(input: &mut impl BufRead, body: &mut Vec<u8>) -> anyhow::Result<()> {
    body.clear();
    let mut line = String::new();
    loop {
        line.clear();
        input.read_line(&mut line)?;
        let size = line.trim_end().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16).context("a chunk size")?;
        if size == 0 {
            break;
        }
        let start = body.len();
        body.resize(start + size, 0);
        input.read_exact(&mut body[start..])?;
        line.clear();
        input.read_line(&mut line)?;
    }
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 || line == "\r\n" {
            return Ok(());
        }
    }
}

/// The spans in one OTLP/HTTP protobuf body.
fn count_spans(body: &[u8], gzip: bool) -> anyhow::Result<u64> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let plain;
    let bytes = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body).read_to_end(&mut out)?;
        plain = out;
        &plain[..]
    } else {
        body
    };
    let request = ExportTraceServiceRequest::decode(bytes)?;
    Ok(request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum())
}
