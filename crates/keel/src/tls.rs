//! TLS for the peer port (and for anyone serving a Keel node's other ports): PEM files turned into
//! rustls configurations that follow the files, so certificates rotate without a restart.
//!
//! - [`ServerTls`]: what a listening port presents and whom it accepts. With a trusted CA it
//!   requires every client to present a certificate that CA signed (etcd's `--client-cert-auth`
//!   and `--peer-client-cert-auth`; as in etcd, a trusted CA alone turns it on), optionally only
//!   with one subject CN (`--peer-cert-allowed-cn`).
//! - [`ClientTls`]: what a node presents when it dials (its own certificate, for mutual TLS) and
//!   which CA it trusts to sign the server's.
//! - [`accept`]: the handshake of one accepted connection, bounded in time, after a look at the
//!   first bytes: a plaintext HTTP/1 or HTTP/2 client is told in its own protocol that the port
//!   requires TLS, instead of reading garbage.
//!
//! Rotation: each handshake asks [`ServerTls::config`] / [`ClientTls::config`], which looks at
//! the files' modification times at most once a second and rebuilds the configuration when one
//! changed. Connections open keep the certificate they started with. New files that do not load
//! (a half-written key, a certificate that does not match it) are logged and the previous
//! configuration stays in use: replace files atomically (write beside, then `mv`), key first.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::UnixTime;
use rustls::server::danger::ClientCertVerified;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::DigitallySignedStruct;
use rustls::DistinguishedName;
use rustls::RootCertStore;
use rustls::SignatureScheme;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use serde::Serialize;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

/// ALPN for a port that serves gRPC and HTTP/1.1 on one listener.
pub const ALPN_H2_AND_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of a gRPC client.
pub const ALPN_H2: &[&[u8]] = &[b"h2"];

/// How long a client has to complete the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often at most the files are looked at for a change.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), reason: reason.to_string() }
}

/// The TLS settings of the peer port (TOML section `[peer_tls]`; keeld's `--peer-*` flags, named as
/// etcd's). TLS is on when `cert_file` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// This member's certificate (PEM, may carry the chain), presented to peers that dial it and
    /// to peers it dials. It must be valid for TLS server and client use.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA that signs members' certificates (PEM, one or more). Required with TLS: a member
    /// accepts only peers whose certificate it signed, and trusts only peers it signed.
    pub trusted_ca_file: PathBuf,
    /// Kept for etcd's flag: a trusted CA already requires peers' certificates. Setting it
    /// without a CA is an error.
    pub client_cert_auth: bool,
    /// Accept only peers whose certificate's subject CN is this (empty: any the CA signed).
    pub allowed_cn: String,
}

impl PeerTlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if !self.enabled() {
            if set(&self.key_file)
                || set(&self.trusted_ca_file)
                || self.client_cert_auth
                || !self.allowed_cn.is_empty()
            {
                return Err("peer TLS settings given without peer_cert_file".into());
            }
            return Ok(());
        }
        if !set(&self.key_file) {
            return Err("peer_cert_file is set but peer_key_file is not".into());
        }
        if !set(&self.trusted_ca_file) {
            return Err(
                "peer TLS needs peer_trusted_ca_file: members accept and trust only certificates of the cluster CA"
                    .into(),
            );
        }
        Ok(())
    }

    /// The server side of the peer port.
    pub fn server(&self) -> Result<Arc<ServerTls>, TlsError> {
        let cn = (!self.allowed_cn.is_empty()).then(|| self.allowed_cn.clone());
        ServerTls::new(&self.cert_file, &self.key_file, Some(&self.trusted_ca_file), cn, ALPN_H2)
    }

    /// How this member dials its peers.
    pub fn client(&self) -> Result<Arc<ClientTls>, TlsError> {
        ClientTls::new(&self.trusted_ca_file, Some((&self.cert_file, &self.key_file)), ALPN_H2)
    }
}

/// rustls on *ring*: it builds in seconds with a C compiler alone (aws-lc-rs, which rustls now
/// prefers for its post-quantum key exchange, needs cmake and minutes on our 2-core builders).
/// Revisit when post-quantum key exchange matters for cluster traffic.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a certificate and its chain, or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error(path, format!("holds no usable PEM private key: {e}")))
}

/// A root store of the CA certificates in a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The subject CN of a DER certificate, if it has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// Modification time and length of each file a configuration was built from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl Stamp {
    fn of(paths: &[PathBuf]) -> Stamp {
        Stamp(
            paths
                .iter()
                .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
                .collect(),
        )
    }
}

/// A configuration, the files it was built from, and when they were last looked at.
struct Reloading<T> {
    paths: Vec<PathBuf>,
    what: &'static str,
    state: Mutex<(Arc<T>, Stamp, Instant)>,
}

impl<T> Reloading<T> {
    fn new(
        paths: Vec<PathBuf>,
        what: &'static str,
        build: impl Fn() -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let stamp = Stamp::of(&paths);
        let config = Arc::new(build()?);
        Ok(Self { paths, what, state: Mutex::new((config, stamp, Instant::now())) })
    }

    fn current(&self, build: impl Fn() -> Result<T, TlsError>) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.2.elapsed() >= RELOAD_CHECK_EVERY {
            state.2 = Instant::now();
            let stamp = Stamp::of(&self.paths);
            if stamp != state.1 {
                match build() {
                    Ok(config) => {
                        tracing::info!(files = ?self.paths, "{}: certificate files changed, reloaded", self.what);
                        state.0 = Arc::new(config);
                        state.1 = stamp;
                    }
                    // Keep the last good one; try again when the files change again.
                    Err(e) => {
                        tracing::error!(
                            "{}: changed certificate files do not load, keeping the previous ones: {e}",
                            self.what
                        );
                        state.1 = stamp;
                    }
                }
            }
        }
        state.0.clone()
    }
}

/// A listening port's TLS: its certificate, and whom it accepts.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    trusted_ca: Option<PathBuf>,
    allowed_cn: Option<String>,
    alpn: Vec<Vec<u8>>,
    config: Reloading<rustls::ServerConfig>,
}

impl ServerTls {
    /// Loads the files now (a bad file is an error here, at start-up). With `trusted_ca`, clients
    /// must present a certificate it signed; with `allowed_cn` too, one whose subject CN is that.
    pub fn new(
        cert: &Path,
        key: &Path,
        trusted_ca: Option<&Path>,
        allowed_cn: Option<String>,
        alpn: &[&[u8]],
    ) -> Result<Arc<Self>, TlsError> {
        if allowed_cn.is_some() && trusted_ca.is_none() {
            return Err(TlsError::Config("an allowed CN needs a trusted CA to verify clients with".into()));
        }
        let mut paths = vec![cert.to_path_buf(), key.to_path_buf()];
        paths.extend(trusted_ca.map(Path::to_path_buf));
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let build = || Self::build(cert, key, trusted_ca, allowed_cn.as_deref(), &alpn);
        let config = Reloading::new(paths, "TLS server", build)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            trusted_ca: trusted_ca.map(Path::to_path_buf),
            allowed_cn,
            alpn,
            config,
        }))
    }

    /// Whether clients must present a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.trusted_ca.is_some()
    }

    /// The configuration for the next handshake (reloaded if the files changed).
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.current(|| {
            Self::build(
                &self.cert,
                &self.key,
                self.trusted_ca.as_deref(),
                self.allowed_cn.as_deref(),
                &self.alpn,
            )
        })
    }

    fn build(
        cert: &Path,
        key: &Path,
        trusted_ca: Option<&Path>,
        allowed_cn: Option<&str>,
        alpn: &[Vec<u8>],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let certs = load_certs(cert)?;
        let key_der = load_key(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match trusted_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(load_roots(ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| file_error(ca, format!("cannot verify clients with it: {e}")))?;
                match allowed_cn {
                    None => builder.with_client_cert_verifier(verifier),
                    Some(cn) => builder.with_client_cert_verifier(Arc::new(AllowedCn {
                        inner: verifier,
                        cn: cn.to_string(),
                    })),
                }
            }
        };
        let mut config = builder.with_single_cert(certs, key_der).map_err(|e| {
            file_error(key, format!("does not go with the certificate in {}: {e}", cert.display()))
        })?;
        config.alpn_protocols = alpn.to_vec();
        Ok(config)
    }
}

/// How a node dials a TLS port: the CA it trusts, and its own certificate if the port asks for
/// one.
pub struct ClientTls {
    ca: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
    alpn: Vec<Vec<u8>>,
    config: Reloading<rustls::ClientConfig>,
}

impl ClientTls {
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>, alpn: &[&[u8]]) -> Result<Arc<Self>, TlsError> {
        let identity = identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
        let mut paths = vec![ca.to_path_buf()];
        if let Some((c, k)) = &identity {
            paths.extend([c.clone(), k.clone()]);
        }
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Reloading::new(paths, "TLS client", || Self::build(ca, identity.as_ref(), &alpn))?;
        Ok(Arc::new(Self { ca: ca.to_path_buf(), identity, alpn, config }))
    }

    /// The configuration for the next connection (reloaded if the files changed).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.current(|| Self::build(&self.ca, self.identity.as_ref(), &self.alpn))
    }

    fn build(
        ca: &Path,
        identity: Option<&(PathBuf, PathBuf)>,
        alpn: &[Vec<u8>],
    ) -> Result<rustls::ClientConfig, TlsError> {
        let roots = load_roots(ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?).map_err(|e| {
                    file_error(key, format!("does not go with the certificate in {}: {e}", cert.display()))
                })?
            }
        };
        config.alpn_protocols = alpn.to_vec();
        Ok(config)
    }

    /// Connects to `addr` (`host:port`) and completes the handshake, checking the server's
    /// certificate against `host`, within `timeout`.
    pub async fn connect(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = host_of(addr);
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?} is not a server name: {e}"))
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.config());
        let dial = async {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {addr}: {e}")))
        };
        tokio::time::timeout(timeout, dial).await.map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr} took over {timeout:?}"))
        })?
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("ca", &self.ca).field("identity", &self.identity).finish()
    }
}

/// The host of `host:port` (`[v6]:port` too), for the server name check.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A client verifier that also requires one subject CN (etcd's `--peer-cert-allowed-cn`).
#[derive(Debug)]
struct AllowedCn {
    inner: Arc<dyn ClientCertVerifier>,
    cn: String,
}

impl ClientCertVerifier for AllowedCn {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match common_name(end_entity) {
            Some(cn) if cn == self.cn => Ok(verified),
            other => Err(rustls::Error::General(format!(
                "client certificate CN {:?} is not the allowed {:?}",
                other.unwrap_or_default(),
                self.cn
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why an accepted connection did not become a TLS session.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("plaintext {0} on a TLS port (the client must use TLS: https://, a CA certificate); told so and closed")]
    Plaintext(&'static str),
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

/// A TLS session on an accepted connection, and the subject CN of the client certificate it
/// verified (if it asked for one).
pub struct Accepted {
    pub stream: TlsStream,
    pub client_cn: Option<String>,
}

/// Completes the server side of the handshake on `tcp` within `timeout`. A client that speaks
/// plaintext HTTP/1 gets a `400` saying TLS is required, an HTTP/2 (gRPC) client a GOAWAY saying
/// so; either is then closed.
pub async fn accept(tls: &ServerTls, tcp: TcpStream, timeout: Duration) -> Result<Accepted, AcceptError> {
    let config = tls.config();
    tokio::time::timeout(timeout, async move {
        let mut tcp = tcp;
        let mut first = [0u8; 4];
        let n = tcp.peek(&mut first).await.map_err(AcceptError::Handshake)?;
        // A TLS connection starts with a handshake record (content type 22).
        if n > 0 && first[0] != 0x16 {
            let what = if first[..n].starts_with(b"PRI ") { "HTTP/2" } else { "HTTP/1" };
            let _ = tell_plaintext_client(&mut tcp, what == "HTTP/2").await;
            return Err(AcceptError::Plaintext(what));
        }
        let stream =
            tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.map_err(AcceptError::Handshake)?;
        let client_cn = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(common_name);
        Ok(Accepted { stream: TlsStream(stream), client_cn })
    })
    .await
    .map_err(|_| AcceptError::Timeout(timeout))?
}

const TLS_REQUIRED: &str = "this port requires TLS: use https:// and the cluster's CA certificate";

async fn tell_plaintext_client(tcp: &mut TcpStream, http2: bool) -> io::Result<()> {
    if http2 {
        // An empty SETTINGS frame (a server's first frame must be one), then GOAWAY (last stream
        // 0, error PROTOCOL_ERROR = 1) with the reason as its debug data.
        let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        let debug = TLS_REQUIRED.as_bytes();
        let len = (8 + debug.len()) as u32;
        frames.extend_from_slice(&len.to_be_bytes()[1..]);
        frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
        frames.extend_from_slice(&0u32.to_be_bytes());
        frames.extend_from_slice(&1u32.to_be_bytes());
        frames.extend_from_slice(debug);
        tcp.write_all(&frames).await?;
    } else {
        let body = format!("{TLS_REQUIRED}\n");
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(answer.as_bytes()).await?;
    }
    tcp.shutdown().await
}

/// A server-side TLS session over TCP, as tonic's server takes it.
pub struct TlsStream(tokio_rustls::server::TlsStream<TcpStream>);

impl TlsStream {
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsStream {
    type ConnectInfo = Option<SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.remote_addr()
    }
}

/// A tonic connector that dials with [`ClientTls`]: `Endpoint::connect_with_connector_lazy`. The
/// URI's scheme is ignored; its authority is the address, its host the server name checked.
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<ClientTls>,
    timeout: Duration,
}

impl TlsConnector {
    pub fn new(tls: Arc<ClientTls>, timeout: Duration) -> Self {
        Self { tls, timeout }
    }
}

type ConnectFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
            > + Send,
    >,
>;

impl tower_service::Service<tonic::transport::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        let (tls, timeout) = (self.tls.clone(), self.timeout);
        Box::pin(async move {
            let addr = uri.authority().map(|a| a.as_str().to_string()).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} names no address"))
            })?;
            tls.connect(&addr, timeout).await.map(hyper_util::rt::TokioIo::new)
        })
    }
}

/// Logs at most one warning a second and counts those it held back, so that a flood of bad
/// connections does not flood the log.
#[derive(Clone, Default)]
pub struct RateLimitedLog(Arc<Mutex<(Option<Instant>, u64)>>);

impl RateLimitedLog {
    pub fn log(&self, line: impl FnOnce() -> String) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = *suppressed, "{}", line());
        *last = Some(Instant::now());
        *suppressed = 0;
    }
}
