//! Turning a paired HTTP exchange into an OpenTelemetry span, per the HTTP semantic conventions.
use std::net::SocketAddr;

use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span, Status};
use rand::RngCore as _;

use crate::{
    pairing::{Exchange, Role},
    resource::{kv_int, kv_str},
};

/// The connection an exchange happened on, from the traced process's point of view.
pub struct Endpoints {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Span names must be low-cardinality: path segments that look like ids (digits, long hex,
/// UUIDs) become `{id}`. `url.path` keeps the real path.
pub fn path_template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let digits = seg.bytes().filter(u8::is_ascii_digit).count();
        let looks_like_id = digits > 0
            && (digits == seg.len()
                || (seg.len() >= 8 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
                || (seg.len() >= 4 && digits * 2 >= seg.len()));
        out.push_str(if looks_like_id { "{id}" } else { seg });
    }
    out
}

/// `Host` header without the port, and the port if it had one.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

pub fn random_ids() -> ([u8; 16], [u8; 8]) {
    let mut rng = rand::rng();
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    rng.fill_bytes(&mut trace);
    rng.fill_bytes(&mut span);
    (trace, span)
}

/// `mono_to_unix` converts the probes' CLOCK_MONOTONIC nanoseconds to Unix nanoseconds.
pub fn build_span(ex: &Exchange, ends: &Endpoints, mono_to_unix: impl Fn(u64) -> u64) -> Span {
    let (trace_id, span_id) = random_ids();
    let server_side = ex.role == Role::Server;
    let server = if server_side { ends.local } else { ends.remote };
    let (host, host_port) = ex.host.as_deref().map_or((None, None), |h| {
        let (h, p) = split_host(h);
        (Some(h.to_owned()), p)
    });
    let mut attributes = vec![
        kv_str("http.request.method", &ex.method),
        kv_str("url.path", &ex.path),
        kv_str("url.scheme", "http"),
        kv_str("network.protocol.name", "http"),
        kv_str("network.protocol.version", "1.1"),
        kv_str("network.transport", "tcp"),
        kv_str(
            "server.address",
            host.unwrap_or_else(|| server.ip().to_string()),
        ),
        kv_int("server.port", i64::from(host_port.unwrap_or(server.port()))),
        kv_str("network.peer.address", ends.remote.ip().to_string()),
        kv_int("network.peer.port", i64::from(ends.remote.port())),
        kv_str("network.local.address", ends.local.ip().to_string()),
        kv_int("network.local.port", i64::from(ends.local.port())),
        kv_int("http.request.size", ex.request_bytes as i64),
        kv_int("http.response.size", ex.response_bytes as i64),
    ];
    if server_side {
        attributes.push(kv_str("client.address", ends.remote.ip().to_string()));
    }
    if let Some(ua) = &ex.user_agent {
        attributes.push(kv_str("user_agent.original", ua));
    }
    let status = match ex.status {
        Some(code) => {
            attributes.push(kv_int("http.response.status_code", i64::from(code)));
            // Semantic conventions: 5xx is an error on both sides, 4xx only for the client.
            let error = code >= 500 || (!server_side && code >= 400);
            if error {
                attributes.push(kv_str("error.type", code.to_string()));
                Status {
                    code: StatusCode::Error as i32,
                    message: String::new(),
                }
            } else {
                Status::default()
            }
        }
        None => {
            attributes.push(kv_str("error.type", "no_response"));
            Status {
                code: StatusCode::Error as i32,
                message: "the connection ended before a response".into(),
            }
        }
    };
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        name: format!("{} {}", ex.method, path_template(&ex.path)),
        kind: if server_side {
            SpanKind::Server
        } else {
            SpanKind::Client
        } as i32,
        start_time_unix_nano: mono_to_unix(ex.start_ns),
        end_time_unix_nano: mono_to_unix(ex.end_ns.max(ex.start_ns)),
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

/// The offset from CLOCK_MONOTONIC (what `bpf_ktime_get_ns` returns) to the Unix epoch, read
/// now. Re-read periodically: NTP can step the wall clock.
pub fn monotonic_to_unix_offset() -> i128 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let mono1 = now(libc::CLOCK_MONOTONIC);
    let real = now(libc::CLOCK_REALTIME);
    let mono2 = now(libc::CLOCK_MONOTONIC);
    real - (mono1 + mono2) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_in_paths_are_templated() {
        assert_eq!(path_template("/users/123/orders"), "/users/{id}/orders");
        assert_eq!(
            path_template("/a/550e8400-e29b-41d4-a716-446655440000"),
            "/a/{id}"
        );
        assert_eq!(path_template("/v1/traces"), "/v1/traces");
        assert_eq!(path_template("/"), "/");
        assert_eq!(path_template("/static/app.js"), "/static/app.js");
    }

    #[test]
    fn host_header_ports_are_split() {
        assert_eq!(split_host("example.com:8080"), ("example.com", Some(8080)));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert_eq!(split_host("[::1]:80"), ("::1", Some(80)));
    }

    fn exchange(role: Role, status: Option<u16>) -> Exchange {
        Exchange {
            conn: 1,
            role,
            method: "GET".into(),
            path: "/x/42".into(),
            host: Some("localhost:8080".into()),
            user_agent: None,
            status,
            start_ns: 1_000,
            end_ns: 3_000,
            request_bytes: 10,
            response_bytes: 20,
        }
    }

    #[test]
    fn server_span_follows_http_semantic_conventions() {
        let ends = Endpoints {
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:5555".parse().unwrap(),
        };
        let s = build_span(&exchange(Role::Server, Some(503)), &ends, |t| t + 10);
        assert_eq!(s.name, "GET /x/{id}");
        assert_eq!(s.kind, SpanKind::Server as i32);
        assert_eq!(
            (s.start_time_unix_nano, s.end_time_unix_nano),
            (1_010, 3_010)
        );
        assert_eq!(s.status.unwrap().code, StatusCode::Error as i32);
        let s = build_span(&exchange(Role::Server, Some(404)), &ends, |t| t);
        assert_eq!(s.status.unwrap().code, StatusCode::Unset as i32);
        let s = build_span(&exchange(Role::Client, Some(404)), &ends, |t| t);
        assert_eq!(s.status.unwrap().code, StatusCode::Error as i32);
    }
}
