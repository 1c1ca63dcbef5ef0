//! One listener type for a service's ports whether TLS is on or off, so
//! that a service builds its servers once: [`Incoming`] for tonic,
//! [`HttpListener`] for axum. Both record a [`PeerInfo`] for every
//! connection (no identity over plain TCP), which [`peer_info`] finds in a
//! request's extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;

use crate::server::{PeerInfo, ServerTls, TlsIncoming, TlsListener, TlsStream};

/// A connection accepted by [`Incoming`] or [`HttpListener`].
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream, PeerInfo),
    Tls(Box<TlsStream>),
}

impl Conn {
    fn plain(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        let info = PeerInfo {
            remote_addr: stream
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            local_addr: stream.local_addr().ok(),
            identity: None,
            certificate_serial: None,
        };
        Conn::Plain(stream, info)
    }

    pub fn peer_info(&self) -> &PeerInfo {
        match self {
            Conn::Plain(_, info) => info,
            Conn::Tls(stream) => stream.peer_info(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer_info().clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
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
            Conn::Plain(stream, _) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(stream, _) => stream.is_write_vectored(),
            Conn::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A gRPC port's connections, for
/// `tonic::transport::Server::serve_with_incoming_shutdown`: TLS ones when
/// `tls` is given, plain TCP (with `TCP_NODELAY`) otherwise.
pub enum Incoming {
    Plain(TcpIncoming),
    Tls(TlsIncoming),
}

impl Incoming {
    pub fn new(listener: TcpListener, tls: Option<&ServerTls>) -> Incoming {
        match tls {
            Some(tls) => Incoming::Tls(tls.incoming(listener)),
            None => Incoming::Plain(TcpIncoming::from(listener).with_nodelay(Some(true))),
        }
    }
}

impl futures::Stream for Incoming {
    type Item = Result<Conn, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Incoming::Plain(incoming) => Pin::new(incoming)
                .poll_next(cx)
                .map(|next| next.map(|accepted| accepted.map(Conn::plain))),
            Incoming::Tls(incoming) => Pin::new(incoming).poll_next(cx).map(|next| {
                next.map(|accepted| accepted.map(|stream| Conn::Tls(Box::new(stream))))
            }),
        }
    }
}

/// An HTTP port's connections, for `axum::serve` (serve with
/// `app.into_make_service_with_connect_info::<PeerInfo>()`).
pub enum HttpListener {
    Plain(TcpListener),
    Tls(TlsListener),
}

impl HttpListener {
    pub fn new(listener: TcpListener, tls: Option<&ServerTls>) -> HttpListener {
        match tls {
            Some(tls) => HttpListener::Tls(tls.axum_listener(listener)),
            None => HttpListener::Plain(listener),
        }
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self {
            HttpListener::Plain(listener) => {
                let (stream, address) = axum::serve::Listener::accept(listener).await;
                (Conn::plain(stream), address)
            }
            HttpListener::Tls(listener) => {
                let (stream, address) = axum::serve::Listener::accept(listener).await;
                (Conn::Tls(Box::new(stream)), address)
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            HttpListener::Plain(listener) => listener.local_addr(),
            HttpListener::Tls(listener) => axum::serve::Listener::local_addr(listener),
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpListener>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener>) -> PeerInfo {
        stream.io().peer_info().clone()
    }
}
