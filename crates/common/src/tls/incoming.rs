//! Accepting connections for the servers: plain TCP, or TLS with handshakes run concurrently off
//! the accept loop (bounded in number and time), so one slow client cannot stall the others.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::ServerTls;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; further connections wait in the kernel's backlog.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// One accepted connection, plaintext or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

/// The connection's addresses, as tonic reports them for plain TCP (`Request::remote_addr`).
impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener` for tonic's `serve_with_incoming`: plain TCP without `tls`,
/// else TLS handshakes with the current certificates. Logs a warning when plaintext.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    what: &'static str,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    match tls {
        None => {
            warn_plaintext(&listener, what);
            tokio_stream::wrappers::TcpListenerStream::new(listener)
                .map(|r| {
                    r.map(|tcp| {
                        set_nodelay(&tcp);
                        Conn::Plain(tcp)
                    })
                })
                .left_stream()
        }
        Some(tls) => {
            let rx = spawn_handshakes(listener, tls);
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(Ok)
                .right_stream()
        }
    }
}

/// Streams send one small HTTP/2 DATA frame per token: Nagle's algorithm would hold each one back
/// until the previous is acknowledged (up to the peer's delayed-ACK timer, 40 ms on Linux).
/// tonic's own `tcp_nodelay` only covers the listeners it binds itself, not `serve_with_incoming`.
fn set_nodelay(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}

fn warn_plaintext(listener: &TcpListener, what: &str) {
    let addr = listener.local_addr().ok();
    tracing::warn!(
        ?addr,
        server = what,
        "serving PLAINTEXT (no --tls-cert): prompts, completions and API keys cross the network unencrypted"
    );
}

/// Accepts on `listener` and completes handshakes in their own tasks; the accept loop ends when
/// the receiver is dropped (the server stopped).
fn spawn_handshakes(listener: TcpListener, tls: ServerTls) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = pending.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            set_nodelay(&tcp);
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Conn::Tls(Box::new(s))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// A listener for `axum::serve`, plaintext or TLS, with the same handshake handling.
pub struct ServerListener {
    conns: Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>>,
    local: SocketAddr,
}

impl ServerListener {
    pub fn new(
        listener: TcpListener,
        tls: Option<ServerTls>,
        what: &'static str,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(ServerListener {
            conns: Box::pin(incoming(listener, tls, what)),
            local,
        })
    }
}

impl axum::serve::Listener for ServerListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let peer = conn
                        .tcp()
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (conn, peer);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // The accept loop only ends when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
