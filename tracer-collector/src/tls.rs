//! Serving a router over plain TCP or TLS (rustls), HTTP/1.1 and HTTP/2 on the same port, so
//! OTLP/HTTP and OTLP/gRPC share listeners; with a cap on open connections, timeouts for silent
//! ones and for TLS handshakes, and a back-off when accepting fails.
use std::{
    future::Future as _,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
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
    sync::Semaphore,
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
    /// Connections closed at once: the port had `max_connections` open.
    pub refused: AtomicU64,
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
        let Ok(permit) = open.clone().try_acquire_owned() else {
            limits.stats.refused.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let (acceptor, stats, idle) = (acceptor.clone(), limits.stats.clone(), limits.idle);
        tokio::spawn(async move {
            let _permit = permit;
            let result = match acceptor {
                None => serve_connection(IdleTimeout::new(stream, idle), service).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(IdleTimeout::new(stream, idle), service).await
                        }
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
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve_connection<S>(
    io: IdleTimeout<S>,
    service: TowerToHyperService<Router>,
) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
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
