//! The client side of TLS: `--cacert/--cert/--key` into rustls configs, the connector both
//! clients dial through (hyper's HTTP/1.1 client for the JSON API, tonic for the etcd gRPC API),
//! and one-line explanations of what a failed handshake means.
//!
//! An endpoint is dialed over TLS when it is `https://…`, or when it has no scheme and `--cacert`
//! is given; `http://…` is always plaintext. keel trusts only `--cacert`: it does not read the
//! system's trust store, so `https://` without `--cacert` is refused before anything is dialed.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The files given by `--cacert`, `--cert` and `--key` (or `KEEL_CACERT`, …).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What the client presents and trusts, read once at start: one rustls config per protocol
/// (ALPN `http/1.1` for the JSON API, `h2` for gRPC), sharing roots and client certificate.
pub struct ClientTls {
    http1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    /// Whether a client certificate is presented (named in the explanation of a refusal).
    has_client_cert: bool,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("has_client_cert", &self.has_client_cert).finish_non_exhaustive()
    }
}

/// The protocol a connection will speak, offered in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    H2,
}

impl ClientTls {
    /// Reads the files: `None` when no TLS flag is given. `--cert` and `--key` go together, and
    /// need `--cacert` (keel trusts nothing else).
    pub fn load(files: &TlsFiles) -> Result<Option<Arc<ClientTls>>, TlsError> {
        let Some(cacert) = &files.cacert else {
            return match (&files.cert, &files.key) {
                (None, None) => Ok(None),
                _ => Err(TlsError::NoCacert),
            };
        };
        let mut roots = RootCertStore::empty();
        let ca_certs = read_certs(cacert)?;
        for cert in ca_certs {
            roots
                .add(cert)
                .map_err(|source| TlsError::BadFile { path: cacert.clone(), reason: source.to_string() })?;
        }
        let client_cert = match (&files.cert, &files.key) {
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::CertWithoutKey),
            (None, Some(_)) => return Err(TlsError::KeyWithoutCert),
            (Some(cert), Some(key)) => Some((read_certs(cert)?, read_key(key)?)),
        };
        let has_client_cert = client_cert.is_some();
        // ring, as the whole workspace builds rustls (no aws-lc, no cmake); named here rather than
        // taken from the process default, which two providers in the build would make ambiguous.
        #[allow(deprecated)] // ring's provider has no post-quantum key exchange
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |alpn: &[u8]| -> Result<Arc<ClientConfig>, TlsError> {
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Config)?
                .with_root_certificates(roots.clone());
            let mut config = match &client_cert {
                None => builder.with_no_client_auth(),
                Some((certs, key)) => {
                    builder.with_client_auth_cert(certs.clone(), key.clone_key()).map_err(TlsError::Config)?
                }
            };
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        Ok(Some(Arc::new(ClientTls { http1: config(b"http/1.1")?, h2: config(b"h2")?, has_client_cert })))
    }

    fn config(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::Http1 => self.http1.clone(),
            Alpn::H2 => self.h2.clone(),
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadFile { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile { path: path.to_owned(), reason: "no CERTIFICATE in it".to_owned() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let reason = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY in it".to_owned(),
            other => other.to_string(),
        };
        TlsError::BadFile { path: path.to_owned(), reason }
    })
}

/// Why the TLS flags cannot be used (exit 2: nothing was dialed).
#[derive(Debug)]
pub enum TlsError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    BadFile {
        path: PathBuf,
        reason: String,
    },
    CertWithoutKey,
    KeyWithoutCert,
    /// `--cert`/`--key` without `--cacert`.
    NoCacert,
    /// An `https://` endpoint without `--cacert`.
    HttpsWithoutCacert(String),
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    Config(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            TlsError::BadFile { path, reason } => write!(f, "{}: {reason}", path.display()),
            TlsError::CertWithoutKey => write!(f, "--cert needs --key"),
            TlsError::KeyWithoutCert => write!(f, "--key needs --cert"),
            TlsError::NoCacert => write!(
                f,
                "--cert and --key need --cacert (the CA that signed the server's certificate; keel \
                 does not read the system's trust store)"
            ),
            TlsError::HttpsWithoutCacert(endpoint) => write!(
                f,
                "{endpoint} needs --cacert (the CA that signed the server's certificate; keel does not \
                 read the system's trust store)"
            ),
            TlsError::Config(e) => write!(f, "cannot use --cert/--key: {e}"),
        }
    }
}

impl StdError for TlsError {}

// ---------------------------------------------------------------------------------------------
// Dialing
// ---------------------------------------------------------------------------------------------

/// The connector both clients dial through: TCP (with the caller's keep-alive and timeouts),
/// then a TLS handshake when the URI is `https://`. The server name is the URI's host, an IP
/// address included (checked against the certificate's IP SANs).
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    tls: Option<Arc<ClientTls>>,
    alpn: Alpn,
    /// Dial with TLS whatever the URI's scheme (see [`Connector::grpc`]).
    always_tls: bool,
}

impl Connector {
    pub fn new(mut tcp: HttpConnector, tls: Option<Arc<ClientTls>>, alpn: Alpn) -> Connector {
        // The scheme is this connector's business: `https://` must reach it.
        tcp.enforce_http(false);
        Connector { tcp, tls, alpn, always_tls: false }
    }

    /// For tonic: it is handed `http://` URIs and dials with TLS when `tls` is given. tonic
    /// refuses an `https://` URI itself when its own TLS feature is compiled in (another crate of
    /// the build may enable it) and no tonic TLS config is set.
    pub fn grpc(tcp: HttpConnector, tls: Option<Arc<ClientTls>>) -> Connector {
        let always_tls = tls.is_some();
        Connector { always_tls, ..Connector::new(tcp, tls, Alpn::H2) }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(|e| DialError::Tcp(Box::new(e)))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = self.always_tls || uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let tls = self.tls.clone();
        let alpn = self.alpn;
        let connecting = tower_service::Service::<Uri>::call(&mut self.tcp, uri);
        Box::pin(async move {
            let tcp = connecting.await.map_err(|e| DialError::Tcp(Box::new(e)))?.into_inner();
            if !https {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            }
            let tls = tls.ok_or(DialError::NoConfig)?;
            let name = ServerName::try_from(host.clone()).map_err(|_| DialError::ServerName(host.clone()))?;
            let stream = TlsConnector::from(tls.config(alpn))
                .connect(name, tcp)
                .await
                .map_err(|source| DialError::Handshake { source, client_cert: tls.has_client_cert })?;
            Ok(TokioIo::new(Stream::Tls(Box::new(stream))))
        })
    }
}

/// Why a connection could not be made; the message is the one a user reads.
#[derive(Debug)]
pub enum DialError {
    Tcp(Box<dyn StdError + Send + Sync>),
    /// `https://` on a connector without TLS (a bug: endpoints are checked when parsed).
    NoConfig,
    ServerName(String),
    Handshake {
        source: io::Error,
        client_cert: bool,
    },
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Tcp(e) => write!(f, "{e}"),
            DialError::NoConfig => write!(f, "https:// without --cacert"),
            DialError::ServerName(host) => write!(f, "'{host}' cannot be a TLS server name"),
            DialError::Handshake { source, client_cert } => f.write_str(
                &explain_io(source, *client_cert)
                    .unwrap_or_else(|| format!("TLS handshake failed: {source}")),
            ),
        }
    }
}

impl StdError for DialError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            DialError::Tcp(e) => Some(e.as_ref()),
            DialError::Handshake { source, .. } => Some(source),
            DialError::NoConfig | DialError::ServerName(_) => None,
        }
    }
}

/// A connection, plaintext or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        let tcp = match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        };
        let connected = tcp.connected();
        match self {
            Stream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => connected.negotiated_h2(),
            _ => connected,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The HTTP/2 client preface and an empty SETTINGS frame: what an h2 client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Dials `authority` (`host:port`) once as an h2 client over TLS and waits, up to `timeout`, for
/// the server's first bytes (its SETTINGS), then hangs up. In TLS 1.3 a server that refuses the
/// client's certificate, or its absence, says so only after the handshake is over on the
/// client's side; an HTTP/2 connection then just closes, and the cause is lost. This check
/// keeps it: `Err` is the one-line reason. A server that stays silent passes.
pub async fn check_h2(authority: &str, tls: &ClientTls, timeout: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let uri: Uri = format!("https://{authority}").parse().map_err(|e| format!("{e}"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let check = async {
        let tcp = TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.clone())
            .map_err(|_| DialError::ServerName(host.clone()).to_string())?;
        let handshake =
            |source| DialError::Handshake { source, client_cert: tls.has_client_cert }.to_string();
        let mut stream =
            TlsConnector::from(tls.config(Alpn::H2)).connect(name, tcp).await.map_err(handshake)?;
        stream.write_all(H2_PREFACE).await.map_err(handshake)?;
        let mut first = [0u8; 64];
        match stream.read(&mut first).await {
            Ok(0) => Err("TLS: the server closed the connection after the handshake".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(handshake(e)),
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_silent) => Ok(()),
    }
}

/// [`check_h2`] for a plaintext endpoint: sends the h2 preface and reads the server's first
/// frames, up to `timeout`. A server that refuses plaintext (a TLS port: keeld answers with a
/// GOAWAY saying so) fails it with the server's words; HTTP/2 would otherwise report only a
/// "transport error". Anything else passes: the connection proper reports its own failures.
pub async fn check_h2_plaintext(authority: &str, timeout: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let check = async {
        let Ok(mut tcp) = TcpStream::connect(authority).await else { return Ok(()) };
        if tcp.write_all(H2_PREFACE).await.is_err() {
            return Ok(());
        }
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match first_frames(&got) {
                Frames::GoAway(why) => return Err(why),
                Frames::Settled => return Ok(()),
                Frames::More if got.len() > 16 * 1024 => return Ok(()),
                Frames::More => {}
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(timeout, check).await.unwrap_or(Ok(()))
}

/// What a server's first HTTP/2 frames say.
#[derive(Debug, PartialEq, Eq)]
enum Frames {
    /// A GOAWAY: the connection is refused, with the server's debug data as the reason.
    GoAway(String),
    /// Complete frames and no GOAWAY among them: the server went on.
    Settled,
    /// Not enough bytes yet to tell.
    More,
}

fn first_frames(bytes: &[u8]) -> Frames {
    let mut rest = bytes;
    let mut frames = 0;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let kind = rest[3];
        let Some(payload) = rest.get(9..9 + len) else { return Frames::More };
        if kind == 0x7 {
            let debug = payload.get(8..).unwrap_or_default();
            let text = String::from_utf8_lossy(debug).trim().to_owned();
            let text = if text.is_empty() { "no reason given".to_owned() } else { text };
            return Frames::GoAway(format!("the server refused the connection (HTTP/2 GOAWAY): {text}"));
        }
        frames += 1;
        if kind != 0x4 || frames > 1 {
            return Frames::Settled;
        }
        rest = &rest[9 + len..];
    }
    // A server's SETTINGS alone, nothing after it in what has come so far: it went on (a
    // refusing keeld sends its SETTINGS and GOAWAY in one write, so they arrive together), and
    // a server that waits for more before it speaks again must not hold the check up.
    if frames == 1 && rest.is_empty() {
        return Frames::Settled;
    }
    Frames::More
}

// ---------------------------------------------------------------------------------------------
// Explaining failures
// ---------------------------------------------------------------------------------------------

/// The TLS failure somewhere in `err`'s chain, in words, or `None` when it holds none. A
/// rustls error travels inside an `io::Error`, whose `source()` skips it: both are looked into.
pub fn explain(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(dial) = e.downcast_ref::<DialError>() {
            return match dial {
                DialError::Tcp(_) => None,
                other => Some(other.to_string()),
            };
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // Only a rustls error: an early EOF elsewhere is not about TLS.
            if let Some(text) = io.get_ref().and_then(|e| e.downcast_ref()).map(|e| explain_rustls(e, true)) {
                return Some(text);
            }
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(explain_rustls(tls, true));
        }
        cur = e.source();
    }
    None
}

/// Whether `err` holds an alert the server sends only during the handshake (it refused our
/// certificate, or wants one): the server then never read a request on that connection.
pub fn refused_in_handshake(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        let tls = e
            .downcast_ref::<rustls::Error>()
            .or_else(|| e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()?.downcast_ref()));
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return handshake_alert(*alert);
        }
        if e.downcast_ref::<DialError>().is_some_and(|d| matches!(d, DialError::Handshake { .. })) {
            return true;
        }
        cur = e.source();
    }
    false
}

fn handshake_alert(alert: AlertDescription) -> bool {
    use AlertDescription as A;
    matches!(
        alert,
        A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::HandshakeFailure
            | A::AccessDenied
            | A::NoApplicationProtocol
    )
}

/// A failed handshake (`io` from tokio-rustls' connect) in words.
fn explain_io(io: &io::Error, client_cert: bool) -> Option<String> {
    if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        return Some(explain_rustls(tls, client_cert));
    }
    match io.kind() {
        io::ErrorKind::UnexpectedEof => Some(
            "the connection closed during the TLS handshake (is it a plaintext port? use http://)".to_owned(),
        ),
        _ => None,
    }
}

fn explain_rustls(error: &rustls::Error, client_cert: bool) -> String {
    use rustls::Error as E;
    let why = match error {
        // A CA of the same name but another key fails as a bad signature.
        E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the server's certificate is not signed by a CA in --cacert".to_owned()
        }
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate is not valid for this host name or address".to_owned(),
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "the server's certificate has expired".to_owned()
        }
        E::InvalidCertificate(other) => format!("the server's certificate is refused ({other:?})"),
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate (give --cert and --key)".to_owned()
        }
        E::AlertReceived(alert) if handshake_alert(*alert) && !client_cert => {
            format!("the server refused the handshake ({alert:?}): it may require a client certificate (give --cert and --key)")
        }
        E::AlertReceived(alert) if handshake_alert(*alert) => {
            format!(
                "the server refused the handshake ({alert:?}): is --cert signed by the CA the server trusts?"
            )
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the server does not speak TLS (is it a plaintext port? use http://)".to_owned()
        }
        other => other.to_string(),
    };
    format!("TLS: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_read_as_their_cause() {
        let wrapped = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let unknown_ca = wrapped(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(
            explain(&unknown_ca).as_deref(),
            Some("TLS: the server's certificate is not signed by a CA in --cacert")
        );
        let required = wrapped(rustls::Error::AlertReceived(AlertDescription::CertificateRequired));
        assert_eq!(
            explain(&required).as_deref(),
            Some("TLS: the server requires a client certificate (give --cert and --key)")
        );
        assert!(refused_in_handshake(&required));
        let plaintext = wrapped(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType));
        assert_eq!(
            explain(&plaintext).as_deref(),
            Some("TLS: the server does not speak TLS (is it a plaintext port? use http://)")
        );
        assert!(!refused_in_handshake(&plaintext));
        assert_eq!(explain(&io::Error::from(io::ErrorKind::ConnectionRefused)), None);
        // An early EOF is about TLS only during a handshake.
        assert_eq!(explain(&io::Error::from(io::ErrorKind::UnexpectedEof)), None);
        let cut =
            DialError::Handshake { source: io::Error::from(io::ErrorKind::UnexpectedEof), client_cert: true };
        assert_eq!(
            explain(&cut).as_deref(),
            Some("the connection closed during the TLS handshake (is it a plaintext port? use http://)")
        );
    }

    #[test]
    fn a_goaway_among_the_first_frames_is_the_refusal_and_settings_are_not() {
        let settings = [0u8, 0, 0, 0x4, 0, 0, 0, 0, 0];
        let mut goaway = settings.to_vec();
        let debug = b"this port requires TLS";
        goaway.extend_from_slice(&[0, 0, (8 + debug.len()) as u8, 0x7, 0, 0, 0, 0, 0]);
        goaway.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        goaway.extend_from_slice(debug);
        assert_eq!(
            first_frames(&goaway),
            Frames::GoAway(
                "the server refused the connection (HTTP/2 GOAWAY): this port requires TLS".into()
            )
        );
        assert_eq!(first_frames(&goaway[..12]), Frames::More);
        assert_eq!(first_frames(&settings[..5]), Frames::More);
        assert_eq!(first_frames(&settings), Frames::Settled);
        let mut ack = settings.to_vec();
        ack.extend_from_slice(&[0, 0, 0, 0x4, 1, 0, 0, 0, 0]);
        assert_eq!(first_frames(&ack), Frames::Settled);
    }

    #[test]
    fn flags_that_cannot_work_alone_are_refused() {
        let files = |cacert: bool, cert: bool, key: bool| TlsFiles {
            cacert: cacert.then(|| "ca.pem".into()),
            cert: cert.then(|| "c.pem".into()),
            key: key.then(|| "k.pem".into()),
        };
        assert!(matches!(ClientTls::load(&files(false, false, false)), Ok(None)));
        assert!(matches!(ClientTls::load(&files(false, true, true)), Err(TlsError::NoCacert)));
        let missing = ClientTls::load(&files(true, false, false)).expect_err("no such file");
        assert!(missing.to_string().starts_with("cannot read ca.pem: "), "{missing}");
    }
}
