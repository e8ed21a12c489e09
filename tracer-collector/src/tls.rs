//! Serving a router over plain TCP or TLS (rustls), HTTP/1.1 and HTTP/2 on the same port, so
//! OTLP/HTTP and OTLP/gRPC share listeners; with a cap on open connections (at which the oldest
//! connection never answered with a success makes room), timeouts for silent ones and for TLS
//! handshakes, and a back-off when accepting fails.
use std::{
    collections::BTreeMap,
    future::Future as _,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{Notify, Semaphore},
};
use tokio_rustls::{rustls::ServerConfig, TlsAcceptor};

pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds no valid PEM certificate", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS private key {} (PEM)", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the TLS certificate and key do not match")?;
    // gRPC needs h2; OTLP/HTTP clients may use either.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for {what} (in use? choose another address with the flags)"
        )
    })
}

/// What every port bounds: connections open, and how long one may stay silent.
#[derive(Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub idle: Duration,
    pub stats: Arc<ConnectionStats>,
}

#[derive(Default, Debug)]
pub struct ConnectionStats {
    /// Connections closed at once: the port had `max_connections` open, all of them answered
    /// with a success at least once.
    pub refused: AtomicU64,
    /// Connections closed to make room for a new one: the oldest that had never been answered
    /// with a success (idle, slow, or without the token) when the port was full.
    pub evicted: AtomicU64,
    /// Connections closed for silence (idle, or a head or body that stopped coming).
    pub timed_out: AtomicU64,
    /// TLS handshakes that failed or did not finish within `HANDSHAKE_TIMEOUT`.
    pub handshake_failures: AtomicU64,
}

/// A TLS handshake longer than this is abandoned (a client that connects and sends nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head must arrive within this, counted from when the connection waits for one.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Raises this process's open-file limit to its hard limit (1024 is the usual soft default:
/// a thousand idle sockets were enough to starve every other client); returns the limit now.
pub fn raise_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit write and read the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// The connections of a port not yet answered with a success (2xx), oldest first. When the
/// port is full, the oldest of them is closed to make room: connections that say nothing, send
/// slowly or lack the token cannot lock out the clients that are being served, which only
/// connections answered with a success (with the token, where one is required) can do.
#[derive(Default)]
struct Unproven {
    next: u64,
    open: BTreeMap<u64, Arc<Notify>>,
}

impl Unproven {
    fn add(this: &Mutex<Self>) -> (u64, Arc<Notify>) {
        let mut u = this.lock().unwrap_or_else(|e| e.into_inner());
        u.next += 1;
        let (id, notify) = (u.next, Arc::new(Notify::new()));
        u.open.insert(id, notify.clone());
        (id, notify)
    }

    fn remove(this: &Mutex<Self>, id: u64) {
        this.lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .remove(&id);
    }

    /// Tells the oldest to close; false if there is none.
    fn evict_oldest(this: &Mutex<Self>) -> bool {
        let oldest = this
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .pop_first();
        oldest.map(|(_, notify)| notify.notify_one()).is_some()
    }
}

/// How long a new connection waits for the room an eviction makes.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// Serves `router` on `listener` until the process ends: HTTP/1.1 and HTTP/2, over TLS when
/// `tls` is set, within `limits`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerConfig>>,
    limits: Limits,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let unproven = Arc::new(Mutex::new(Unproven::default()));
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => {
                backoff = Duration::from_millis(5);
                s
            }
            Err(e) => {
                // Out of file descriptors, mostly: retrying at once would spin.
                log::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let permit = match open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if Unproven::evict_oldest(&unproven) => {
                limits.stats.evicted.fetch_add(1, Relaxed);
                match tokio::time::timeout(EVICTION_WAIT, open.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        limits.stats.refused.fetch_add(1, Relaxed);
                        continue;
                    }
                }
            }
            Err(_) => {
                limits.stats.refused.fetch_add(1, Relaxed);
                drop(stream);
                continue;
            }
        };
        let (id, evicted) = Unproven::add(&unproven);
        let proven = Arc::new(AtomicBool::new(false));
        let registry = unproven.clone();
        let service = TowerToHyperService::new(<Router as tower::ServiceExt<
            hyper::Request<hyper::body::Incoming>,
        >>::map_response(
            router.clone(),
            move |response: axum::response::Response| {
                if response.status().is_success() && !proven.swap(true, Relaxed) {
                    Unproven::remove(&registry, id);
                }
                response
            },
        ));
        let (acceptor, stats, idle) = (acceptor.clone(), limits.stats.clone(), limits.idle);
        let registry = unproven.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = serve_one(stream, peer, acceptor, service, stats, idle) => {}
                () = evicted.notified() => {}
            }
            Unproven::remove(&registry, id);
        });
    }
}

/// One accepted connection, TLS handshake included, to its end.
async fn serve_one<S>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    service: TowerToHyperService<S>,
    stats: Arc<ConnectionStats>,
    idle: Duration,
) where
    S: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let result = match acceptor {
        None => serve_connection(IdleTimeout::new(stream, idle), service).await,
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(IdleTimeout::new(stream, idle), service).await,
                Ok(Err(e)) => {
                    stats.handshake_failures.fetch_add(1, Relaxed);
                    log::debug!("TLS handshake with {peer} failed: {e}");
                    return;
                }
                Err(_) => {
                    stats.handshake_failures.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        if is_timeout(e.as_ref()) {
            stats.timed_out.fetch_add(1, Relaxed);
        }
        log::debug!("connection from {peer}: {e}");
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve_connection<S, Svc>(
    io: IdleTimeout<S>,
    service: TowerToHyperService<Svc>,
) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    Svc::Future: Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || c.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A connection that fails with `TimedOut` once nothing has been read or written for `idle`:
/// closes idle keep-alive connections, a client that never sends its HTTP/2 preface, and a
/// body that stops arriving, on both protocols.
struct IdleTimeout<S> {
    io: S,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(io: S, idle: Duration) -> Self {
        IdleTimeout {
            io,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }

    /// A write's outcome: bytes written reset the idle deadline; a write still waiting when it
    /// passed fails.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                self.touch();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle too long")
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, data);
        self.after_write(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
