//! Throwaway certificate authorities for TLS tests: a CA, certificates for members (valid as TLS
//! server and client, for 127.0.0.1 and localhost) and for clients (CN = the user), and the odd
//! ones a test needs refused: signed by another CA, expired. Everything is written as PEM files
//! in a directory the caller owns.

use std::path::Path;
use std::path::PathBuf;

use rcgen::BasicConstraints;
use rcgen::CertificateParams;
use rcgen::CertifiedIssuer;
use rcgen::DnType;
use rcgen::ExtendedKeyUsagePurpose;
use rcgen::IsCa;
use rcgen::KeyPair;
use rcgen::KeyUsagePurpose;

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that signs certificates into `dir`.
pub struct Ca {
    dir: PathBuf,
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA's certificate (PEM), what a peer trusts.
    pub cert: PathBuf,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// A member: TLS server and client, SANs 127.0.0.1 and localhost.
    Member,
    /// A client only.
    Client,
}

impl Ca {
    /// A new CA named `name`; its certificate goes to `dir/NAME.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert");
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem()).expect("write CA cert");
        Ca { dir: dir.to_path_buf(), name: name.to_string(), issuer, cert }
    }

    /// A certificate with subject CN `cn`, written as `dir/CA-CN.pem` and `dir/CA-CN-key.pem`.
    pub fn issue(&self, cn: &str, usage: Use) -> CertFiles {
        self.issue_with(cn, usage, |_| {})
    }

    /// [`Ca::issue`], with its validity over before today.
    pub fn issue_expired(&self, cn: &str, usage: Use) -> CertFiles {
        self.issue_with(cn, usage, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn issue_with(&self, cn: &str, usage: Use, tune: impl FnOnce(&mut CertificateParams)) -> CertFiles {
        let sans = match usage {
            Use::Member => vec!["127.0.0.1".to_string(), "localhost".to_string()],
            Use::Client => vec![],
        };
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match usage {
            Use::Member => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Use::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        tune(&mut params);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.join(format!("{}-{cn}.pem", self.name)),
            key: self.dir.join(format!("{}-{cn}-key.pem", self.name)),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}
