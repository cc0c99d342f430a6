//! Accepting connections for the servers: plain TCP, or TLS with handshakes run concurrently off
//! the accept loop (bounded in number and time), so one slow client cannot stall the others.
//! Every accepted socket gets `TCP_NODELAY` and TCP keepalive ([`TCP_KEEPALIVE_IDLE`], then
//! [`TCP_KEEPALIVE_RETRIES`] probes [`TCP_KEEPALIVE_INTERVAL`] apart), so a client whose host
//! vanished (half-open connection) is closed within about a minute instead of the kernel's two
//! hours, on every port (gRPC and HTTP) of the gateway and the worker (review H6). Its send
//! buffer is fixed at [`SEND_BUFFER_BYTES`] (the kernel would grow it to 4 MiB for a client that
//! stops reading), so such a client stalls the sender after a bounded number of tokens and the
//! gateway's stream idle timeout lets it go instead of generating for it to the end.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use super::ServerTls;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; further connections wait in the kernel's backlog.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Idle time of an accepted connection before the first TCP keepalive probe.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between unanswered TCP keepalive probes.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel closes the connection (idle + 3 × 10 s = 60 s).
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// `SO_SNDBUF` of accepted sockets (Linux doubles it): a few hundred token events, and still
/// about 600 KiB/s per connection at 100 ms of round trip.
const SEND_BUFFER_BYTES: u32 = 32 << 10;

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
            accepted(listener)
                .map(|r| r.and_then(bound_send_buffer).map(Conn::Plain))
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

/// `tcp` with its send buffer fixed at [`SEND_BUFFER_BYTES`] (set through a duplicate of its
/// descriptor: tokio sets buffer sizes only on a `TcpSocket`).
fn bound_send_buffer(tcp: TcpStream) -> io::Result<TcpStream> {
    let std = tcp.into_std()?;
    let dup = TcpSocket::from_std_stream(std.try_clone()?);
    if let Err(e) = dup.set_send_buffer_size(SEND_BUFFER_BYTES) {
        tracing::debug!(error = %e, "SO_SNDBUF not set");
    }
    drop(dup);
    TcpStream::from_std(std)
}

/// The connections of `listener` with their socket options set. `TCP_NODELAY`: streams send one
/// small HTTP/2 DATA frame per token, and Nagle's algorithm would hold each one back until the
/// previous is acknowledged (up to the peer's delayed-ACK timer, 40 ms on Linux). tonic's own
/// `tcp_nodelay` and `tcp_keepalive` only cover the listeners it binds itself, not
/// `serve_with_incoming`.
fn accepted(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE_IDLE))
        .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES))
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
    let mut conns = accepted(listener);
    tokio::spawn(async move {
        loop {
            let Ok(permit) = pending.clone().acquire_owned().await else {
                return;
            };
            let tcp = tokio::select! {
                _ = tx.closed() => return,
                r = conns.next() => match r.map(|r| r.and_then(bound_send_buffer)) {
                    Some(Ok(tcp)) => tcp,
                    None => return,
                    Some(Err(e)) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let peer = tcp
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `tr` (timer kind) and `tm->when` (clock ticks) of the socket from `local` to `remote`
    /// in /proc/net/tcp: kind 2 is the keepalive timer.
    fn timer(local: SocketAddr, remote: SocketAddr) -> Option<(u32, u64)> {
        let hex = |a: SocketAddr| match a {
            SocketAddr::V4(a) => format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(a.ip().octets()),
                a.port()
            ),
            SocketAddr::V6(_) => unreachable!("IPv4 only"),
        };
        let (local, remote) = (hex(local), hex(remote));
        let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
        table.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
                return None;
            }
            let (tr, when) = f.get(5)?.split_once(':')?;
            Some((
                u32::from_str_radix(tr, 16).ok()?,
                u64::from_str_radix(when, 16).ok()?,
            ))
        })
    }

    #[tokio::test]
    async fn accepted_sockets_have_tcp_keepalive_and_a_fixed_send_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, None, "test"));
        let client = TcpStream::connect(addr).await.unwrap();
        let conn = conns.next().await.unwrap().unwrap();
        assert!(conn.tcp().nodelay().unwrap());
        let (local, remote) = (
            conn.tcp().local_addr().unwrap(),
            client.local_addr().unwrap(),
        );
        let (kind, when) = timer(local, remote).expect("the accepted socket in /proc/net/tcp");
        assert_eq!(
            kind, 2,
            "the keepalive timer runs on the idle accepted socket"
        );
        // Clock ticks (100 a second) until the first probe: at most the idle time, not the
        // kernel's default of two hours.
        assert!(when <= TCP_KEEPALIVE_IDLE.as_secs() * 100, "{when}");
        // The client's socket, not set up by us, has no keepalive.
        assert_ne!(timer(remote, local).map(|t| t.0), Some(2));
        let Conn::Plain(tcp) = conn else {
            unreachable!("plaintext")
        };
        let std = tcp.into_std().unwrap();
        let sent = TcpSocket::from_std_stream(std.try_clone().unwrap());
        // Linux doubles SO_SNDBUF; left to autotuning it would start at 16 KiB and grow to MiBs.
        assert_eq!(sent.send_buffer_size().unwrap(), 2 * SEND_BUFFER_BYTES);
    }
}
