//! `keel certs`: a development CA and the certificates it signs (rcgen), so that a TLS cluster
//! takes three commands: `init` (the CA), `node NAME --host …` (one per member: a server and
//! client certificate, for its client port, its peer port and dialing its peers), `client NAME`
//! (a client certificate whose CN is the user, e.g. `root`, for `--client-cert-auth`).
//!
//! Files, in `--dir`: `ca.pem`, `ca-key.pem`, `NAME.pem`, `NAME-key.pem`; certificates in PEM,
//! keys in PKCS#8 PEM (ECDSA P-256), written with mode 0600. Nothing is overwritten without
//! `--force`, and nothing is written unless every file can be.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::{Args, Subcommand};
use rcgen::PublicKeyData as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;

/// The CA's certificate and key, in `--dir`.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";

/// The CA's subject.
const CA_NAME: &str = "Keel development CA";

/// Certificates start to be valid this long before they are made, for clocks a little behind.
const BACKDATE_SECS: i64 = 3600;

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the CA: ca.pem (give it to servers as --trusted-ca-file and to clients as
    /// --cacert) and ca-key.pem (keep it to sign more certificates).
    Init {
        #[command(flatten)]
        common: Common,
    },
    /// A member's certificate, NAME.pem and NAME-key.pem, signed by the CA: valid as a TLS server
    /// and client (serverAuth and clientAuth), with CN=NAME and the given host names and
    /// addresses. One certificate serves the client port, the peer port and dialing peers.
    Node {
        /// The member's name (the certificate's CN and the files' names).
        name: String,
        /// A host name or IP address clients and peers reach the member by; repeat, or
        /// comma-separate [default: localhost,127.0.0.1,::1].
        #[arg(long = "host", value_name = "HOST", value_delimiter = ',')]
        hosts: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// A client certificate, NAME.pem and NAME-key.pem, signed by the CA (clientAuth, CN=NAME:
    /// with --client-cert-auth the CN is the user, e.g. `root`).
    Client {
        /// The user's name (the certificate's CN and the files' names).
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Where the CA is and the files go (created if missing).
    #[arg(long, value_name = "DIR", default_value = "certs")]
    dir: PathBuf,
    /// Days the certificate stays valid [default: 3650 for the CA, 365 for the others].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: Option<u32>,
    /// Replace files that exist.
    #[arg(long)]
    force: bool,
}

impl Common {
    /// Files in `dir`, the default validity, nothing replaced.
    pub fn in_dir(dir: PathBuf) -> Common {
        Common { dir, days: None, force: false }
    }
}

/// Why `keel certs` wrote nothing (or, for a failed write, not everything).
#[derive(Debug)]
pub enum CertsError {
    /// A file to be written exists; `--force` replaces it.
    Exists(PathBuf),
    /// The CA is not in `--dir`.
    NoCa(PathBuf),
    /// A name that is not usable as a file name.
    BadName(String),
    /// A `--host` that is neither an IP address nor a DNS name.
    BadHost {
        host: String,
        reason: String,
    },
    /// The CA's files do not parse, or do not go together.
    BadCa {
        path: PathBuf,
        reason: String,
    },
    Io {
        doing: String,
        source: io::Error,
    },
    /// rcgen could not make the certificate.
    Generate(rcgen::Error),
}

impl fmt::Display for CertsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertsError::Exists(path) => {
                write!(f, "{} exists; nothing written (--force replaces it)", path.display())
            }
            CertsError::NoCa(dir) => {
                write!(f, "no CA in {}: create it with `keel certs init --dir {}`", dir.display(), dir.display())
            }
            CertsError::BadName(name) => write!(
                f,
                "'{name}' cannot name a certificate: use letters, digits, '.', '-' and '_' (not starting with '.')"
            ),
            CertsError::BadHost { host, reason } => {
                write!(f, "--host '{host}' is neither an IP address nor a DNS name: {reason}")
            }
            CertsError::BadCa { path, reason } => write!(f, "{}: {reason}", path.display()),
            CertsError::Io { doing, source } => write!(f, "{doing}: {source}"),
            CertsError::Generate(e) => write!(f, "cannot make the certificate: {e}"),
        }
    }
}

impl std::error::Error for CertsError {}

/// Runs one `keel certs` command; returns what to print: the files written and what they are for.
pub fn run(cmd: CertsCommand) -> Result<String, CertsError> {
    match cmd {
        CertsCommand::Init { common } => init(&common),
        CertsCommand::Node { name, hosts, common } => {
            let hosts = if hosts.is_empty() {
                vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()]
            } else {
                hosts
            };
            leaf(&common, &name, Kind::Node(&hosts))
        }
        CertsCommand::Client { name, common } => leaf(&common, &name, Kind::Client),
    }
}

fn init(common: &Common) -> Result<String, CertsError> {
    let cert_path = common.dir.join(CA_CERT);
    let key_path = common.dir.join(CA_KEY);
    refuse_existing(&[&cert_path, &key_path], common.force)?;
    let key = KeyPair::generate().map_err(CertsError::Generate)?;
    let params = ca_params(common.days.unwrap_or(3650))?;
    let cert = params.self_signed(&key).map_err(CertsError::Generate)?;
    write_files(&common.dir, &[(&cert_path, cert.pem(), false), (&key_path, key.serialize_pem(), true)])?;
    Ok(format!(
        "wrote {} (the CA: servers' --trusted-ca-file and --peer-trusted-ca-file, clients' --cacert)\n\
         wrote {} (its key, mode 0600: signs `keel certs node` and `keel certs client`)\n",
        cert_path.display(),
        key_path.display()
    ))
}

fn ca_params(days: u32) -> Result<CertificateParams, CertsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keel");
    // A name of its own: a certificate from another `keel certs init` must read as "unknown
    // issuer", not as this CA's with a bad signature.
    let tag: [u8; 4] = rand::random();
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("{CA_NAME} {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A certificate the CA signs.
enum Kind<'a> {
    /// A member: server and client, with these SANs.
    Node(&'a [String]),
    Client,
}

fn leaf(common: &Common, name: &str, kind: Kind<'_>) -> Result<String, CertsError> {
    check_name(name)?;
    let cert_path = common.dir.join(format!("{name}.pem"));
    let key_path = common.dir.join(format!("{name}-key.pem"));
    let issuer = load_ca(&common.dir)?;
    refuse_existing(&[&cert_path, &key_path], common.force)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keel");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, common.days.unwrap_or(365));
    let what = match kind {
        Kind::Node(hosts) => {
            params.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            params.subject_alt_names = hosts.iter().map(|h| san(h)).collect::<Result<_, _>>()?;
            format!("member {name}: TLS server and client for {}", hosts.join(", "))
        }
        Kind::Client => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            format!("client {name}: TLS client, CN={name}")
        }
    };
    let key = KeyPair::generate().map_err(CertsError::Generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(CertsError::Generate)?;
    write_files(&common.dir, &[(&cert_path, cert.pem(), false), (&key_path, key.serialize_pem(), true)])?;
    Ok(format!("wrote {} ({what})\nwrote {} (its key, mode 0600)\n", cert_path.display(), key_path.display()))
}

/// A SAN from `--host`: an IP address, else a DNS name.
fn san(host: &str) -> Result<SanType, CertsError> {
    let host = host.trim();
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |reason: String| CertsError::BadHost { host: host.to_owned(), reason };
    let label = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
    };
    if !host.split('.').all(label) {
        return Err(bad("a DNS name is dot-separated labels of letters, digits and '-'".to_owned()));
    }
    Ok(SanType::DnsName(host.to_owned().try_into().map_err(|e: rcgen::Error| bad(e.to_string()))?))
}

/// The CA as an issuer: its key, and its subject read back from its certificate.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !cert_path.exists() || !key_path.exists() {
        return Err(CertsError::NoCa(dir.to_owned()));
    }
    let read = |path: &Path| {
        fs::read_to_string(path)
            .map_err(|source| CertsError::Io { doing: format!("reading {}", path.display()), source })
    };
    let key = KeyPair::from_pem(&read(&key_path)?)
        .map_err(|e| CertsError::BadCa { path: key_path.clone(), reason: e.to_string() })?;
    let cert_pem = read(&cert_path)?;
    // The key must be the certificate's, or every certificate signed would fail to verify.
    let cert_der = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| CertsError::BadCa {
            path: cert_path.clone(),
            reason: "no CERTIFICATE in it".into(),
        })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| CertsError::BadCa { path: cert_path.clone(), reason: e.to_string() })?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(CertsError::BadCa {
            path: key_path,
            reason: format!("not the key of {}", cert_path.display()),
        });
    }
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| CertsError::BadCa { path: cert_path, reason: e.to_string() })
}

/// File names: a name must not walk out of `--dir` or hide as a dotfile.
fn check_name(name: &str) -> Result<(), CertsError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && name != "ca";
    if ok {
        Ok(())
    } else {
        Err(CertsError::BadName(name.to_owned()))
    }
}

fn refuse_existing(paths: &[&PathBuf], force: bool) -> Result<(), CertsError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(path) => Err(CertsError::Exists((*path).clone())),
        None => Ok(()),
    }
}

/// Writes each file (keys with mode 0600 from the start, never readable by others in between).
fn write_files(dir: &Path, files: &[(&PathBuf, String, bool)]) -> Result<(), CertsError> {
    fs::create_dir_all(dir)
        .map_err(|source| CertsError::Io { doing: format!("creating {}", dir.display()), source })?;
    for (path, contents, secret) in files {
        let io = |source| CertsError::Io { doing: format!("writing {}", path.display()), source };
        let mode = if *secret { 0o600 } else { 0o644 };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(io)?;
        // `mode` applies only to a file created now; one replaced with --force gets it too.
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io)?;
        file.write_all(contents.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
    let at = |secs: i64| OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    params.not_before = at(now - BACKDATE_SECS);
    params.not_after = at(now + i64::from(days) * 86_400);
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_the_dir() {
        for good in ["n1", "root", "node-1.example", "a_b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "ca", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_are_addresses_or_names() {
        assert!(matches!(san("127.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("[::1]"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("node-1.example"), Ok(SanType::DnsName(_))));
        assert!(san("a b").is_err());
        assert!(san("host:2379").is_err());
    }
}
