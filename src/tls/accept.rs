//! Accepting TLS connections. One task accepts TCP connections and hands each to a task of its
//! own for the handshake, which feeds the finished TLS stream through a channel to whoever
//! serves the port (`axum::serve` through [`TlsListener`], tonic through
//! [`TlsListener::into_stream`]): a client that is slow to shake hands holds only its own task,
//! for at most [`HANDSHAKE_TIMEOUT`], never the accept loop.
//!
//! A connection whose first byte does not start a TLS handshake record is not TLS. If it looks
//! like plain HTTP it gets a short `400 Bad Request` saying the port speaks HTTPS (as nginx
//! answers "The plain HTTP request was sent to HTTPS port"), and is closed: it never hangs.

use super::{Alpn, Certificates};
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::ServerConfig;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client has, from connecting, to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of a TLS handshake record: the first byte a TLS client sends (RFC 8446,
/// section 5.1).
const HANDSHAKE_RECORD: u8 = 0x16;

/// Finished handshakes waiting for the server to take them.
const READY_CONNECTIONS: usize = 64;

/// What an HTTP request knows of its connection (`ConnectInfo<Peer>`): the client's address,
/// and whether it presented a client certificate. Under `--tls-client-ca` a certificate that
/// reached a request was verified during the handshake, since an unverified one fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub address: SocketAddr,
    pub client_certificate: bool,
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer {
            address: *stream.remote_addr(),
            client_certificate: false,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer {
            address: *stream.remote_addr(),
            client_certificate: stream.io().get_ref().1.peer_certificates().is_some(),
        }
    }
}

/// A TLS port: TCP connections accepted and their handshakes done in the background.
/// Dropping it stops the accepting.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Start accepting on `listener`; each connection takes the configuration for `alpn` in
    /// force when it arrives.
    pub fn new(
        listener: TcpListener,
        certificates: Arc<Certificates>,
        alpn: Alpn,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (sender, ready) = mpsc::channel(READY_CONNECTIONS);
        tokio::spawn(accept_loop(listener, certificates, alpn, sender));
        Ok(Self { ready, local })
    }

    /// The finished connections as a stream, for tonic's `serve_with_incoming_shutdown`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
        futures::stream::unfold(self.ready, |mut ready| async move {
            let (stream, _) = ready.recv().await?;
            Some((Ok(stream), ready))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accept until the receiving side is dropped (the server stopped accepting).
async fn accept_loop(
    listener: TcpListener,
    certificates: Arc<Certificates>,
    alpn: Alpn,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (tcp, address) = tokio::select! {
            _ = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    pause_after_accept_error(e).await;
                    continue;
                }
            },
        };
        // TLS records are written whole: no point in Nagle delaying the last segment of one.
        let _ = tcp.set_nodelay(true);
        let config = certificates.config(alpn);
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, config)).await {
                Ok(Ok(Some(stream))) => {
                    // Fails only when the server stopped accepting: the connection is dropped.
                    let _ = ready.send((stream, address)).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(client = %address, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(client = %address, "TLS handshake timed out"),
            }
        });
    }
}

/// As `axum::serve` does: errors of one connection are skipped; others (out of file
/// descriptors) would repeat at once, so wait a little before accepting again.
async fn pause_after_accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The TLS handshake, or `None` when the client sent something else (answered if it looks like
/// plain HTTP) or nothing at all.
async fn handshake(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] != HANDSHAKE_RECORD {
        if first[0].is_ascii_uppercase() {
            // An HTTP/1 request line starts with its method.
            answer_plain_http(tcp).await?;
        }
        return Ok(None);
    }
    TlsAcceptor::from(config).accept(tcp).await.map(Some)
}

/// What a plain HTTP request to a TLS port gets.
const PLAIN_HTTP_ANSWER: &str = "HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 79\r\n\
    Connection: close\r\n\
    \r\n\
    This port speaks HTTPS: the plain HTTP request was sent to a TLS (https) port.\n";

/// Answer 400 and close. The request is read first (what has arrived of it), and the socket is
/// drained after the answer, because closing a socket with unread data resets the connection,
/// and a reset can destroy the answer before the client reads it.
async fn answer_plain_http(mut tcp: TcpStream) -> io::Result<()> {
    let mut request = [0u8; 4096];
    let _ = tcp.read(&mut request).await?;
    tcp.write_all(PLAIN_HTTP_ANSWER.as_bytes()).await?;
    tcp.shutdown().await?;
    let drain = async {
        while tcp.read(&mut request).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_counts_its_body() {
        let (head, body) = PLAIN_HTTP_ANSWER.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
