//! What stands in front of the query API, the UI and `/metrics`: an optional credential, a
//! Host allow-list, and the browser security headers on every answer.
//!
//! The Host check stops DNS rebinding: a web page on any site can point a name it controls at
//! 127.0.0.1 and read a local collector's traces from the visitor's browser; that request
//! carries the page's host name, not one of the collector's. The credential is a token sent as
//! `Authorization: Bearer <token>` (scripts, Grafana) or as the password of HTTP Basic (a
//! browser asks for it; any user name).
use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;

pub struct QueryGuard {
    /// Credential required on every query request; `None`: open (loopback by default).
    pub token: Option<String>,
    /// Host names (without port) requests may address; empty: any.
    pub allowed_hosts: Vec<String>,
}

impl QueryGuard {
    /// The hosts allowed by default: the loopback names, plus the listen address itself when
    /// it is a specific one.
    pub fn default_hosts(listen: std::net::SocketAddr) -> Vec<String> {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(String::from)
            .collect();
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            hosts.push(listen.ip().to_string());
        }
        hosts
    }

    fn host_allowed(&self, host: &str) -> bool {
        if self.allowed_hosts.is_empty() || self.allowed_hosts.iter().any(|h| h == "*") {
            return true;
        }
        let name = strip_port(host);
        self.allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(name))
    }

    fn authorized(&self, authorization: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = authorization else {
            return false;
        };
        let secret = if let Some(bearer) = given.strip_prefix("Bearer ") {
            bearer.trim().as_bytes().to_vec()
        } else if let Some(basic) = given.strip_prefix("Basic ") {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
                return false;
            };
            match decoded.iter().position(|&b| b == b':') {
                Some(colon) => decoded[colon + 1..].to_vec(),
                None => return false,
            }
        } else {
            return false;
        };
        crate::ingest::constant_time_eq(&secret, token.as_bytes())
    }
}

/// `host` without its port: `[::1]:16686` -> `::1`, `example:80` -> `example`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.contains(':') => {
            name
        }
        _ => host,
    }
}

/// The middleware: Host, credential, then the security headers on whatever is answered.
pub async fn guard(State(guard): State<Arc<QueryGuard>>, req: Request, next: Next) -> Response {
    // HTTP/1.1 has a Host header; HTTP/2 the :authority in the URI.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let mut response = match host {
        Some(host) if guard.host_allowed(&host) => {
            let auth = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if guard.authorized(auth) {
                next.run(req).await
            } else {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    "this collector's query API needs its token: Authorization: Bearer <token>, or \
                     the token as the password of HTTP Basic\n",
                )
                    .into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"tracer\", charset=\"UTF-8\""),
                );
                r
            }
        }
        other => (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this collector does not answer for host {:?}: add it with --allow-host\n",
                other.as_deref().unwrap_or("")
            ),
        )
            .into_response(),
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; object-src 'none'; base-uri 'none'; form-action 'self'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(token: Option<&str>, hosts: &[&str]) -> QueryGuard {
        QueryGuard {
            token: token.map(String::from),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn hosts_are_matched_without_their_port() {
        let g = guard(None, &["localhost", "127.0.0.1", "::1"]);
        for ok in [
            "localhost",
            "localhost:16686",
            "127.0.0.1:80",
            "[::1]:16686",
            "LOCALHOST",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:16686",
            "127.0.0.2",
            "localhost.evil.example",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(guard(None, &["*"]).host_allowed("anything"));
    }

    #[test]
    fn the_token_is_taken_as_bearer_or_basic_password() {
        let g = guard(Some("s3cret"), &[]);
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(g.authorized(Some("Bearer s3cret")));
        assert!(g.authorized(Some(&basic("anyone:s3cret"))));
        assert!(!g.authorized(Some(&basic("s3cret:wrong"))));
        assert!(!g.authorized(Some("Bearer s3cre")));
        assert!(!g.authorized(Some("Basic !!!")));
        assert!(!g.authorized(None));
        assert!(guard(None, &[]).authorized(None));
    }
}
