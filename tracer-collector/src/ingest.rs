//! OTLP ingest over HTTP (`POST /v1/traces`, protobuf or JSON, optionally gzip) and gRPC
//! (`TraceService/Export`). A batch is acknowledged only after the store says it is durable.
use std::{
    io::Read as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
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
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tracer_store::{SpanRecord, SpanStore, StoreError};

use crate::{convert, decode};

#[derive(Default, Debug)]
pub struct IngestStats {
    pub spans_accepted: AtomicU64,
    pub requests_accepted: AtomicU64,
    pub rejected_malformed: AtomicU64,
    pub rejected_too_large: AtomicU64,
    pub rejected_unauthorized: AtomicU64,
    pub rejected_media_type: AtomicU64,
    pub store_failures: AtomicU64,
}

pub struct Ingest {
    pub store: Arc<dyn SpanStore>,
    /// Bearer token agents and SDKs must present; `None` accepts anyone.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    pub stats: IngestStats,
}

/// Compares without early exit, so response time does not leak how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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

    /// Converts and stores; the error is (HTTP status, message).
    async fn accept(&self, req: ExportTraceServiceRequest) -> Result<(), (StatusCode, String)> {
        let spans = convert::spans_from_request(req).map_err(|e| self.invalid_span(e))?;
        self.store(spans).await
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
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || store.write(&spans)).await;
        self.stored(count, result)
    }

    /// Decodes an OTLP protobuf body and stores its spans, borrowing them from the body (see
    /// `decode::Decoded`); both on a blocking thread, which owns the body meanwhile.
    async fn store_protobuf(&self, body: Bytes) -> Result<(), (StatusCode, String)> {
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let decoded = decode::decode(&body)?;
            let count = decoded.len() as u64;
            Ok((count, decoded.with_spans(|spans| store.write_refs(spans))))
        })
        .await;
        match result {
            Ok(Ok((count, stored))) => self.stored(count, Ok(stored)),
            Ok(Err(decode::Error::Malformed(e))) => {
                self.stats.rejected_malformed.fetch_add(1, Relaxed);
                Err((
                    StatusCode::BAD_REQUEST,
                    format!("the body is not an OTLP ExportTraceServiceRequest in protobuf: {e}"),
                ))
            }
            Ok(Err(decode::Error::Invalid(e))) => Err(self.invalid_span(e)),
            Err(e) => self.stored(0, Err(e)),
        }
    }

    /// Counts and logs what the store said about `count` spans.
    fn stored(
        &self,
        count: u64,
        result: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) -> Result<(), (StatusCode, String)> {
        match result {
            Ok(Ok(())) => {
                self.stats.spans_accepted.fetch_add(count, Relaxed);
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
        Encoding::Json => match serde_json::from_slice::<ExportTraceServiceRequest>(&raw) {
            Ok(req) => {
                drop(raw);
                ingest.accept(req).await
            }
            Err(e) => {
                ingest.stats.rejected_malformed.fetch_add(1, Relaxed);
                let msg = format!("the body is not an OTLP ExportTraceServiceRequest in JSON: {e}");
                return reply(encoding, StatusCode::BAD_REQUEST, Some(msg));
            }
        },
    };
    match result {
        Ok(()) => reply(encoding, StatusCode::OK, None),
        Err((status, msg)) => reply(encoding, status, Some(msg)),
    }
}

/// Oversized bodies: axum stops reading at the limit; say so in OTLP's terms.
async fn too_large(State(ingest): State<Arc<Ingest>>) -> Response {
    ingest.stats.rejected_too_large.fetch_add(1, Relaxed);
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is over the {}-byte limit", ingest.max_body_bytes),
    )
        .into_response()
}

struct Grpc(Arc<Ingest>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !self.0.authorized(auth) {
            self.0.stats.rejected_unauthorized.fetch_add(1, Relaxed);
            return Err(tonic::Status::unauthenticated(
                "missing or wrong bearer token",
            ));
        }
        match self.0.accept(request.into_inner()).await {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err((StatusCode::BAD_REQUEST, msg)) => Err(tonic::Status::invalid_argument(msg)),
            Err((_, msg)) => Err(tonic::Status::unavailable(msg)),
        }
    }
}

/// One router for both ingest ports: OTLP/HTTP and OTLP/gRPC (HTTP/2) side by side.
pub fn router(ingest: Arc<Ingest>) -> Router {
    let limit = ingest.max_body_bytes;
    let grpc = TraceServiceServer::new(Grpc(ingest.clone()))
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(limit);
    let http = Router::new()
        .route("/v1/traces", post(otlp_http))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            ingest.clone(),
            reject_large,
        ))
        .with_state(ingest);
    tonic::service::Routes::new(grpc)
        .into_axum_router()
        .merge(http)
}

/// Rejects a body whose declared length is over the limit before reading it, with a clear 413.
async fn reject_large(
    State(ingest): State<Arc<Ingest>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > ingest.max_body_bytes) {
        return too_large(State(ingest)).await;
    }
    next.run(req).await
}

/// `GET /metrics` (Prometheus text) on the query port: what ingest accepted and refused, and why.
pub fn metrics_router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(ingest): State<Arc<Ingest>>| async move {
                let s = &ingest.stats;
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
                        "tracer_collector_store_failures_total",
                        "Batches the store could not save (503, client retries)",
                        &s.store_failures,
                    ),
                ];
                let mut out = String::new();
                for (name, help, v) in rows {
                    out.push_str(&format!(
                        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                        v.load(Relaxed)
                    ));
                }
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
            }),
        )
        .with_state(ingest)
}
