//! OTLP ingest over HTTP (`POST /v1/traces`, protobuf or JSON, optionally gzip) and gRPC
//! (`TraceService/Export`). A batch is acknowledged only after the store says it is durable.
use std::{
    io::Read as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tracer_store::{SpanRecord, SpanStore, StoreError};

use crate::{convert, decode, tls::ConnectionStats};

#[derive(Default, Debug)]
pub struct IngestStats {
    pub spans_accepted: AtomicU64,
    pub requests_accepted: AtomicU64,
    pub rejected_malformed: AtomicU64,
    pub rejected_too_large: AtomicU64,
    pub rejected_unauthorized: AtomicU64,
    pub rejected_media_type: AtomicU64,
    /// Requests that waited too long for room in the bytes-in-flight budget (429).
    pub rejected_busy: AtomicU64,
    pub store_failures: AtomicU64,
    /// Spans stored with `tracer.truncated = true` (attributes, values or the name cut).
    pub spans_truncated: AtomicU64,
}

pub struct Ingest {
    pub store: Arc<dyn SpanStore>,
    /// Bearer token agents and SDKs must present; `None` accepts anyone.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// The memory requests may take while they are read and decoded (see `gate`): bounds the
    /// collector's size under any mix of requests.
    pub in_flight: InFlight,
    pub stats: IngestStats,
    /// Upstream backends every stored batch is forwarded to (`forward.rs`); none by default.
    pub forward: crate::forward::Forwarder,
}

/// How much memory a request takes at its peak, in multiples of its body's size, measured as
/// the collector's peak resident size against the body (docs/PERFORMANCE.md, hostile input):
/// protobuf, on HTTP or gRPC, is decoded in place and checked span by span (x2 for junk or
/// real spans); JSON is decoded whole into serde's and prost's structs first, up to x164 for a
/// body of empty spans (`{}` is 2 bytes, a span struct ~200).
const COST_PROTOBUF: usize = 3;
const COST_JSON: usize = 200;

/// The largest gRPC message taken (tonic's default): gRPC requests carry no length, so each is
/// charged this much of the budget until it is read.
const GRPC_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// How long a request waits for room in the budget before it is told to retry later.
const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// The bytes-in-flight budget, in permits of a KiB.
pub struct InFlight {
    permits: Arc<tokio::sync::Semaphore>,
    capacity_kib: usize,
}

impl InFlight {
    pub fn new(mib: usize) -> InFlight {
        let capacity_kib = mib
            .saturating_mul(1024)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        InFlight {
            permits: Arc::new(tokio::sync::Semaphore::new(capacity_kib)),
            capacity_kib,
        }
    }
}

/// Compares without early exit, so response time does not leak how much of a token matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Ingest {
    fn authorized(&self, authorization: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
    }

    /// A batch refused for one of its spans (`convert::check_span`'s message).
    fn invalid_span(&self, e: String) -> (StatusCode, String) {
        self.stats.rejected_malformed.fetch_add(1, Relaxed);
        (
            StatusCode::BAD_REQUEST,
            format!("invalid span: {e}; nothing of this batch was stored"),
        )
    }

    /// Stores converted spans; the error is (HTTP status, message).
    async fn store(&self, spans: Vec<SpanRecord>) -> Result<(), (StatusCode, String)> {
        let count = spans.len() as u64;
        // The mark comes last among a span's attributes (`convert`).
        let truncated = spans
            .iter()
            .filter(|s| {
                s.attributes
                    .last()
                    .is_some_and(|kv| kv.key == convert::TRUNCATED_KEY)
            })
            .count() as u64;
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || store.write(&spans)).await;
        self.stored((count, truncated), result)
    }

    /// Decodes an OTLP protobuf body and stores its spans, borrowing them from the body (see
    /// `decode::Decoded`); both on a blocking thread, which owns the body meanwhile.
    async fn store_protobuf(&self, body: Bytes) -> Result<(), (StatusCode, String)> {
        let store = self.store.clone();
        let forward = (!self.forward.is_empty()).then(|| body.clone());
        let result = tokio::task::spawn_blocking(move || {
            let decoded = decode::decode(&body)?;
            let count = decoded.len() as u64;
            Ok(decoded.with_spans(|spans| {
                // The mark comes last among a span's attributes (`decode`).
                let truncated = spans
                    .iter()
                    .filter(|s| {
                        s.attributes
                            .last()
                            .is_some_and(|kv| kv.key == convert::TRUNCATED_KEY)
                    })
                    .count() as u64;
                ((count, truncated), store.write_refs(spans))
            }))
        })
        .await;
        match result {
            Ok(Ok((counts, stored))) => {
                let ok = stored.is_ok();
                let result = self.stored(counts, Ok(stored));
                if let (true, Some(body)) = (ok, forward) {
                    self.forward.forward(&body);
                }
                result
            }
            Ok(Err(decode::Error::Malformed(e))) => {
                self.stats.rejected_malformed.fetch_add(1, Relaxed);
                Err((
                    StatusCode::BAD_REQUEST,
                    format!("the body is not an OTLP ExportTraceServiceRequest in protobuf: {e}"),
                ))
            }
            Ok(Err(decode::Error::Invalid(e))) => Err(self.invalid_span(e)),
            Err(e) => self.stored((0, 0), Err(e)),
        }
    }

    /// Counts and logs what the store said about `count` spans, `truncated` of them marked.
    fn stored(
        &self,
        (count, truncated): (u64, u64),
        result: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) -> Result<(), (StatusCode, String)> {
        match result {
            Ok(Ok(())) => {
                self.stats.spans_accepted.fetch_add(count, Relaxed);
                self.stats.spans_truncated.fetch_add(truncated, Relaxed);
                self.stats.requests_accepted.fetch_add(1, Relaxed);
                Ok(())
            }
            Ok(Err(e)) => {
                self.stats.store_failures.fetch_add(1, Relaxed);
                log::error!("storing {count} spans failed: {e}");
                Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store could not save the batch ({e}); retry later"),
                ))
            }
            Err(e) => Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("store task failed: {e}"),
            )),
        }
    }
}

/// `google.rpc.Status`, the body OTLP/HTTP error responses carry.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

fn reply(encoding: Encoding, status: StatusCode, message: Option<String>) -> Response {
    let (content_type, body) = match (encoding, message) {
        (Encoding::Protobuf, None) => (
            "application/x-protobuf",
            ExportTraceServiceResponse::default().encode_to_vec(),
        ),
        (Encoding::Json, None) => ("application/json", b"{}".to_vec()),
        (Encoding::Protobuf, Some(msg)) => {
            // gRPC codes: 3 INVALID_ARGUMENT, 16 UNAUTHENTICATED, 14 UNAVAILABLE, 8 RESOURCE_EXHAUSTED.
            let code = grpc_code(status);
            (
                "application/x-protobuf",
                RpcStatus { code, message: msg }.encode_to_vec(),
            )
        }
        (Encoding::Json, Some(msg)) => {
            let code = grpc_code(status);
            (
                "application/json",
                serde_json::to_vec(&RpcStatus { code, message: msg }).unwrap_or_default(),
            )
        }
    };
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn grpc_code(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 | 415 => 3,
        401 => 16,
        413 => 8,
        503 => 14,
        _ => 13,
    }
}

/// Gunzips with a ceiling, so a small compressed body cannot expand without bound.
fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, (StatusCode, String)> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    decoder.read_to_end(&mut out).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("the body is not valid gzip: {e}"),
        )
    })?;
    if out.len() > limit {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the decompressed body is over the {limit}-byte limit"),
        ));
    }
    Ok(out)
}

async fn otlp_http(State(ingest): State<Arc<Ingest>>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let encoding = match content_type.split(';').next().unwrap_or("").trim() {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        other => {
            ingest.stats.rejected_media_type.fetch_add(1, Relaxed);
            let msg = format!(
                "unsupported content-type {other:?}: send application/x-protobuf or application/json"
            );
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, msg).into_response();
        }
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !ingest.authorized(auth) {
        ingest.stats.rejected_unauthorized.fetch_add(1, Relaxed);
        let msg = if auth.is_none() {
            "missing bearer token"
        } else {
            "wrong bearer token"
        };
        return reply(
            encoding,
            StatusCode::UNAUTHORIZED,
            Some(format!("{msg}: send Authorization: Bearer <token>")),
        );
    }
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    // The body is decoded where it lies: only a gzipped one needs a buffer of its own.
    let raw: Bytes = if gzip {
        match gunzip(&body, ingest.max_body_bytes) {
            Ok(b) => Bytes::from(b),
            Err((status, msg)) => {
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ingest.stats.rejected_too_large.fetch_add(1, Relaxed);
                } else {
                    ingest.stats.rejected_malformed.fetch_add(1, Relaxed);
                }
                return reply(encoding, status, Some(msg));
            }
        }
    } else {
        body
    };
    let result = match encoding {
        // The hot path: protobuf straight to the store (`decode.rs`), no prost structs.
        Encoding::Protobuf => ingest.store_protobuf(raw).await,
        // Decoded on a blocking thread: a large JSON body takes long enough to stall the
        // async workers (and every other request on them).
        Encoding::Json => {
            let forwarding = !ingest.forward.is_empty();
            let decoded = tokio::task::spawn_blocking(move || {
                serde_json::from_slice::<ExportTraceServiceRequest>(&raw).map(|req| {
                    // Upstreams get protobuf whatever the sender used.
                    let encoded = forwarding.then(|| Bytes::from(req.encode_to_vec()));
                    (convert::spans_from_request(req), encoded)
                })
            })
            .await;
            match decoded {
                Ok(Ok((Ok(spans), encoded))) => {
                    let result = ingest.store(spans).await;
                    if let (Ok(()), Some(body)) = (&result, encoded) {
                        ingest.forward.forward(&body);
                    }
                    result
                }
                Ok(Ok((Err(e), _))) => Err(ingest.invalid_span(e)),
                Ok(Err(e)) => {
                    ingest.stats.rejected_malformed.fetch_add(1, Relaxed);
                    let msg =
                        format!("the body is not an OTLP ExportTraceServiceRequest in JSON: {e}");
                    return reply(encoding, StatusCode::BAD_REQUEST, Some(msg));
                }
                Err(e) => Err((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("decoding task failed: {e}"),
                )),
            }
        }
    };
    match result {
        Ok(()) => reply(encoding, StatusCode::OK, None),
        Err((status, msg)) => reply(encoding, status, Some(msg)),
    }
}

/// The gRPC method OTLP exporters call.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// OTLP/gRPC `Export`, served here rather than by a generated service: the one message is taken
/// from its frame and decoded in place like an OTLP/HTTP protobuf body (`decode.rs`), where a
/// generated service decodes it into prost structs first, up to ~100x its size for a message of
/// empty spans.
async fn otlp_grpc(State(ingest): State<Arc<Ingest>>, headers: HeaderMap, body: Bytes) -> Response {
    let gzip = headers
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    // A unary call's body is one length-prefixed message: a compressed flag, a big-endian
    // length, the message.
    let (compressed, length) = match body.get(..5) {
        Some(head) => (
            head[0] == 1,
            u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize,
        ),
        None => return grpc_error(GRPC_INVALID_ARGUMENT, "no gRPC message in the body"),
    };
    if body.len() != 5 + length {
        ingest.stats.rejected_malformed.fetch_add(1, Relaxed);
        return grpc_error(
            GRPC_INVALID_ARGUMENT,
            "the body is not one gRPC message (Export is unary)",
        );
    }
    let message = body.slice(5..);
    let raw = match (compressed, gzip) {
        (false, _) => message,
        (true, true) => match gunzip(&message, ingest.max_body_bytes) {
            Ok(b) => Bytes::from(b),
            Err((status, msg)) => {
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ingest.stats.rejected_too_large.fetch_add(1, Relaxed);
                    return grpc_error(GRPC_RESOURCE_EXHAUSTED, &msg);
                }
                ingest.stats.rejected_malformed.fetch_add(1, Relaxed);
                return grpc_error(GRPC_INVALID_ARGUMENT, &msg);
            }
        },
        (true, false) => {
            ingest.stats.rejected_malformed.fetch_add(1, Relaxed);
            return grpc_error(
                GRPC_UNIMPLEMENTED,
                "a compressed message needs grpc-encoding: gzip (the only compression taken)",
            );
        }
    };
    match ingest.store_protobuf(raw).await {
        Ok(()) => grpc_ok(),
        Err((StatusCode::BAD_REQUEST, msg)) => grpc_error(GRPC_INVALID_ARGUMENT, &msg),
        Err((_, msg)) => grpc_error(GRPC_UNAVAILABLE, &msg),
    }
}

/// A successful unary response: one empty `ExportTraceServiceResponse`, then `grpc-status: 0`
/// in the trailers.
fn grpc_ok() -> Response {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", header::HeaderValue::from_static("0"));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(axum::body::Body::new(GrpcBody {
            message: Some(Bytes::from_static(&[0, 0, 0, 0, 0])),
            trailers: Some(trailers),
        }))
        .expect("static header names and values")
}

/// A response body of one data frame and the trailers.
struct GrpcBody {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = match self.message.take() {
            Some(data) => Some(hyper::body::Frame::data(data)),
            None => self.trailers.take().map(hyper::body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }
}

/// One router for both ingest ports: OTLP/HTTP and OTLP/gRPC (HTTP/2) side by side, behind
/// `gate`.
pub fn router(ingest: Arc<Ingest>) -> Router {
    let limit = ingest.max_body_bytes;
    Router::new()
        .route("/v1/traces", post(otlp_http))
        .route(GRPC_EXPORT, post(otlp_grpc))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ingest.clone())
        .layer(axum::middleware::from_fn_with_state(ingest, gate))
}

/// What every ingest request passes before a byte of its body is read, on both ports and both
/// protocols: the token (a generated gRPC service checked it only after decoding), the
/// declared size, and the request's share of the bytes-in-flight budget, held until it is
/// answered. A request the budget cannot take within `BUDGET_WAIT` is told to retry (429 /
/// `RESOURCE_EXHAUSTED`), one that could never fit is refused (413).
async fn gate(
    State(ingest): State<Arc<Ingest>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let grpc = content_type.starts_with("application/grpc");
    let encoding = if content_type.starts_with("application/json") {
        Encoding::Json
    } else {
        Encoding::Protobuf
    };
    let refuse = |status: StatusCode, grpc_code: i32, message: String| {
        if grpc {
            grpc_error(grpc_code, &message)
        } else {
            reply(encoding, status, Some(message))
        }
    };
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !ingest.authorized(auth) {
        ingest.stats.rejected_unauthorized.fetch_add(1, Relaxed);
        let what = if auth.is_none() { "missing" } else { "wrong" };
        return refuse(
            StatusCode::UNAUTHORIZED,
            GRPC_UNAUTHENTICATED,
            format!("{what} bearer token: send Authorization: Bearer <token>"),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > ingest.max_body_bytes) {
        ingest.stats.rejected_too_large.fetch_add(1, Relaxed);
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            GRPC_RESOURCE_EXHAUSTED,
            format!("the body is over the {}-byte limit", ingest.max_body_bytes),
        );
    }
    let (size, factor) = match (grpc, encoding) {
        (true, _) => (GRPC_MAX_MESSAGE.min(ingest.max_body_bytes), COST_PROTOBUF),
        (false, Encoding::Json) => (declared.unwrap_or(ingest.max_body_bytes), COST_JSON),
        (false, Encoding::Protobuf) => (declared.unwrap_or(ingest.max_body_bytes), COST_PROTOBUF),
    };
    let kib = (size.saturating_mul(factor) / 1024).max(1);
    let budget_kib = ingest.in_flight.capacity_kib;
    if kib > budget_kib {
        ingest.stats.rejected_too_large.fetch_add(1, Relaxed);
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            GRPC_RESOURCE_EXHAUSTED,
            format!(
                "a body of {size} bytes needs about {} MiB to decode, more than the collector's \
                 in-flight budget of {} MiB (--max-in-flight-mib): send smaller batches{}",
                kib / 1024,
                budget_kib / 1024,
                if encoding == Encoding::Json {
                    " or protobuf"
                } else {
                    ""
                }
            ),
        );
    }
    let permit = tokio::time::timeout(
        BUDGET_WAIT,
        ingest
            .in_flight
            .permits
            .clone()
            .acquire_many_owned(kib as u32),
    )
    .await;
    let Ok(Ok(_permit)) = permit else {
        ingest.stats.rejected_busy.fetch_add(1, Relaxed);
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            GRPC_RESOURCE_EXHAUSTED,
            "the collector is decoding as much as its memory budget allows: retry later".into(),
        );
    };
    next.run(req).await
}

const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_UNIMPLEMENTED: i32 = 12;
const GRPC_UNAVAILABLE: i32 = 14;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// A trailers-only gRPC error response: nothing of the request body is read.
fn grpc_error(code: i32, message: &str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code.to_string())
        .header(
            "grpc-message",
            message.replace(|c: char| !c.is_ascii() || c.is_ascii_control(), "?"),
        )
        .body(axum::body::Body::empty())
        .expect("static header names and ASCII values")
}

/// `GET /metrics` (Prometheus text) on the query port: what ingest accepted and refused, and why.
pub fn metrics_router(
    ingest: Arc<Ingest>,
    connections: Arc<ConnectionStats>,
    traces_truncated: Arc<AtomicU64>,
) -> Router {
    Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(ingest): State<Arc<Ingest>>| async move {
                let s = &ingest.stats;
                let c = &connections;
                let rows = [
                    (
                        "tracer_collector_spans_accepted_total",
                        "Spans stored and acknowledged",
                        &s.spans_accepted,
                    ),
                    (
                        "tracer_collector_requests_accepted_total",
                        "Export requests acknowledged",
                        &s.requests_accepted,
                    ),
                    (
                        "tracer_collector_rejected_malformed_total",
                        "Requests refused: malformed body or span (400)",
                        &s.rejected_malformed,
                    ),
                    (
                        "tracer_collector_rejected_too_large_total",
                        "Requests refused: body over the limit (413)",
                        &s.rejected_too_large,
                    ),
                    (
                        "tracer_collector_rejected_unauthorized_total",
                        "Requests refused: missing or wrong token (401)",
                        &s.rejected_unauthorized,
                    ),
                    (
                        "tracer_collector_rejected_media_type_total",
                        "Requests refused: unsupported content type (415)",
                        &s.rejected_media_type,
                    ),
                    (
                        "tracer_collector_rejected_busy_total",
                        "Requests told to retry: the in-flight memory budget stayed full (429)",
                        &s.rejected_busy,
                    ),
                    (
                        "tracer_collector_connections_refused_total",
                        "Connections closed at once: the port had --max-connections open, each answered with a success",
                        &c.refused,
                    ),
                    (
                        "tracer_collector_connections_evicted_total",
                        "Connections closed to make room at --max-connections: the oldest never answered with a success",
                        &c.evicted,
                    ),
                    (
                        "tracer_collector_connections_timed_out_total",
                        "Connections closed after --idle-timeout-secs of silence or a slow head",
                        &c.timed_out,
                    ),
                    (
                        "tracer_collector_tls_handshake_failures_total",
                        "TLS handshakes that failed or took over 10 s",
                        &c.handshake_failures,
                    ),
                    (
                        "tracer_collector_store_failures_total",
                        "Batches the store could not save (503, client retries)",
                        &s.store_failures,
                    ),
                    (
                        "tracer_collector_spans_truncated_total",
                        "Spans stored with tracer.truncated = true: attributes past 128, values past 4 KiB or a name past 512 bytes cut",
                        &s.spans_truncated,
                    ),
                    (
                        "tracer_collector_traces_truncated_total",
                        "Traces answered without all their spans: one answer's span or size limit (--max-trace-spans, --max-trace-mib)",
                        &*traces_truncated,
                    ),
                ];
                let mut out = String::new();
                for (name, help, v) in rows {
                    out.push_str(&format!(
                        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                        v.load(Relaxed)
                    ));
                }
                out.push_str(&format!(
                    "# HELP tracer_collector_operations_overflowed_total Spans stored under the operation \"(other operations)\": their service had 1,000 names already\n\
                     # TYPE tracer_collector_operations_overflowed_total counter\n\
                     tracer_collector_operations_overflowed_total {}\n",
                    ingest.store.operations_overflowed()
                ));
                ingest.forward.render_metrics(&mut out);
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
            }),
        )
        .with_state(ingest)
}
