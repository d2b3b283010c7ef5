//! The byte streams under connections: plain TCP, or TLS through rustls, for the broker
//! and the clients alike; the TLS settings they are made from; and the one I/O step both
//! sides run, which writes what it can and reads what is there in a single poll, so a
//! peer that does not read can never block one that does.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A connection's stream.
pub enum Stream {
    Plain(TcpStream),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::TlsServer(tls) => tls.get_ref().0,
            Stream::TlsClient(tls) => tls.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            Stream::Plain($stream) => $call,
            Stream::TlsServer($stream) => $call,
            Stream::TlsClient($stream) => $call,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// What one I/O step achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes read, if a read completed (0 is the end of the stream).
    pub read: Option<usize>,
    pub wrote: bool,
}

/// Writes as much of `write_buf` as the stream takes and reads what is available into
/// `read_buf`, at most `read_limit` bytes (nothing when it is 0): a peer cannot make one
/// step buffer more than its caller allowed. Ready once either made progress; `Pending`
/// (with wakers registered for what was attempted) otherwise.
///
/// # Errors
/// The stream's error, from either direction.
pub fn poll_io(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    read_buf: &mut BytesMut,
    write_buf: &mut BytesMut,
    read_limit: usize,
) -> Poll<io::Result<Progress>> {
    let mut progress = Progress::default();
    while !write_buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, write_buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                write_buf.advance(n);
                progress.wrote = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => break,
        }
    }
    if progress.wrote {
        // TLS keeps written bytes in its own buffer until flushed; plain TCP does not.
        if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
            return Poll::Ready(Err(e));
        }
    }
    if read_limit > 0 {
        let mut limited = BufMut::limit(read_buf, read_limit);
        match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut limited) {
            Poll::Ready(Ok(n)) => progress.read = Some(n),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
    }
    if progress == Progress::default() {
        Poll::Pending
    } else {
        Poll::Ready(Ok(progress))
    }
}

/// Why TLS could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no usable certificate in the system's root store")]
    NoSystemRoots,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The broker's side of TLS: its certificate chain and key.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

impl ServerTls {
    /// Loads a PEM certificate chain and private key.
    ///
    /// # Errors
    /// [`TlsError`] when a file cannot be read, holds no certificate or key, or rustls
    /// refuses the pair.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = certificates(cert)?;
        let key_pem = read_pem(key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
            path: key.to_owned(),
        })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Runs the server handshake. A client that speaks plaintext to this TLS port gets
    /// `Err(NotTls)` before anything is consumed, so the caller can answer it in
    /// plaintext.
    ///
    /// # Errors
    /// [`AcceptError::NotTls`] for a plaintext client, [`AcceptError::Handshake`] for a
    /// failed handshake.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Stream, AcceptError> {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(1) if first[0] != TLS_HANDSHAKE_RECORD => return Err(AcceptError::NotTls(tcp)),
            Ok(_) => {}
            Err(e) => return Err(AcceptError::Handshake(e)),
        }
        match self.acceptor.accept(tcp).await {
            Ok(tls) => Ok(Stream::TlsServer(Box::new(tls))),
            Err(e) => Err(AcceptError::Handshake(e)),
        }
    }
}

/// Why a TLS connection could not be accepted.
pub enum AcceptError {
    /// The client is speaking plaintext; here is its socket, untouched.
    NotTls(TcpStream),
    Handshake(io::Error),
}

/// A client's side of TLS: whom to trust.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trusts the certificates in a PEM file (a private CA, or a self-signed broker).
    ///
    /// # Errors
    /// [`TlsError`] when the file cannot be read or holds no usable certificate.
    pub fn with_ca_file(path: &Path) -> Result<ClientTls, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certificates(path)? {
            roots.add(cert)?;
        }
        Self::with_roots(roots)
    }

    /// Trusts the operating system's root certificates.
    ///
    /// # Errors
    /// [`TlsError::NoSystemRoots`] when none can be loaded.
    pub fn with_system_roots() -> Result<ClientTls, TlsError> {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(TlsError::NoSystemRoots);
        }
        Self::with_roots(roots)
    }

    fn with_roots(roots: RootCertStore) -> Result<ClientTls, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Runs the client handshake, checking the broker's certificate against `host` (the
    /// host part of the address dialled: a name or an IP address).
    ///
    /// # Errors
    /// The handshake's error, such as an untrusted certificate.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<Stream> {
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_owned()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{host:?} is not a server name: {e}"),
                )
            })?,
        };
        let tls = self.connector.connect(name, tcp).await?;
        Ok(Stream::TlsClient(Box::new(tls)))
    }
}

/// The host part of `host:port` (IPv6 literals in brackets lose them).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_handles_names_ips_and_brackets() {
        assert_eq!(host_of("localhost:7878"), "localhost");
        assert_eq!(host_of("127.0.0.1:7878"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7878"), "::1");
        assert_eq!(host_of("broker.example"), "broker.example");
    }

    #[test]
    fn missing_or_empty_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = ServerTls::from_pem_files(&missing, &missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        assert!(matches!(
            ClientTls::with_ca_file(&empty),
            Err(TlsError::NoCertificate { .. })
        ));
    }
}
