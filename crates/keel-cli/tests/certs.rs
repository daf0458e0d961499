//! `keel certs`: what it writes parses, carries the names and uses it says, keeps keys private,
//! and never overwrites without `--force`.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use support::keel;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{parse_x509_certificate, X509Certificate};

/// Runs `keel certs ARGS` (no server: the endpoints are never dialed).
fn certs(args: &[&str]) -> support::Run {
    let mut all = vec!["certs"];
    all.extend_from_slice(args);
    keel("127.0.0.1:1", &all)
}

fn read_cert(path: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (label, der) = pem_der(&pem);
    assert_eq!(label, "CERTIFICATE", "{}", path.display());
    der
}

/// The first PEM block: its label and its bytes.
fn pem_der(pem: &str) -> (String, Vec<u8>) {
    use rustls_pki_types::pem::{PemObject as _, SectionKind};
    let (kind, der) = <(SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes()).expect("a PEM block");
    let label = match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PrivateKey => "PRIVATE KEY",
        _ => "other",
    };
    (label.to_owned(), der)
}

fn with_cert<T>(path: &Path, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
    let der = read_cert(path);
    let (_, cert) = parse_x509_certificate(&der).expect("the certificate parses");
    f(&cert)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("the file exists").permissions().mode() & 0o777
}

#[test]
fn init_node_and_client_write_a_ca_and_certificates_it_signed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_str().expect("utf-8 path");
    let out = certs(&["init", "--dir", d]).ok();
    assert!(out.contains("ca.pem") && out.contains("ca-key.pem"), "{out}");
    certs(&[
        "node",
        "n1",
        "--dir",
        d,
        "--host",
        "127.0.0.1",
        "--host",
        "localhost,node-1.example",
        "--host",
        "::1",
    ])
    .ok();
    certs(&["client", "root", "--dir", d]).ok();

    let ca = dir.path().join("ca.pem");
    let ca_der = read_cert(&ca);
    let (_, ca_cert) = parse_x509_certificate(&ca_der).expect("the CA parses");
    assert!(ca_cert.is_ca(), "ca.pem is a CA");
    assert!(ca_cert.verify_signature(None).is_ok(), "ca.pem is self-signed");

    with_cert(&dir.path().join("n1.pem"), |cert| {
        assert!(!cert.is_ca());
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok(), "signed by the CA");
        assert_eq!(cert.issuer(), ca_cert.subject());
        let cn: Vec<&str> = cert.subject().iter_common_name().filter_map(|c| c.as_str().ok()).collect();
        assert_eq!(cn, ["n1"]);
        let eku = cert.extended_key_usage().expect("parses").expect("has EKUs").value;
        assert!(eku.server_auth && eku.client_auth, "serverAuth and clientAuth: {eku:?}");
        let sans = cert.subject_alternative_name().expect("parses").expect("has SANs").value;
        let mut names: Vec<String> = sans
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) if ip.len() == 4 => {
                    format!("ip:{}", std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes")))
                }
                GeneralName::IPAddress(ip) => {
                    format!("ip:{}", std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes")))
                }
                other => format!("{other:?}"),
            })
            .collect();
        names.sort();
        assert_eq!(names, ["dns:localhost", "dns:node-1.example", "ip:127.0.0.1", "ip:::1"]);
        assert!(cert.validity().is_valid(), "valid now");
    });

    with_cert(&dir.path().join("root.pem"), |cert| {
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok(), "signed by the CA");
        let cn: Vec<&str> = cert.subject().iter_common_name().filter_map(|c| c.as_str().ok()).collect();
        assert_eq!(cn, ["root"], "the CN is the user");
        let eku = cert.extended_key_usage().expect("parses").expect("has EKUs").value;
        assert!(eku.client_auth && !eku.server_auth, "clientAuth only: {eku:?}");
    });

    for key in ["ca-key.pem", "n1-key.pem", "root-key.pem"] {
        let path = dir.path().join(key);
        assert_eq!(mode(&path), 0o600, "{key} is private");
        let pem = std::fs::read_to_string(&path).expect("readable by its owner");
        assert_eq!(pem_der(&pem).0, "PRIVATE KEY", "{key}");
    }
    for cert in ["ca.pem", "n1.pem", "root.pem"] {
        assert_eq!(mode(&dir.path().join(cert)), 0o644, "{cert}");
    }
}

#[test]
fn existing_files_are_never_overwritten_without_force() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_str().expect("utf-8 path");
    certs(&["init", "--dir", d]).ok();
    let ca_before = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");

    let again = certs(&["init", "--dir", d]);
    assert_eq!(again.code, Some(1), "{}", again.stderr);
    assert_eq!(again.stderr, format!("error: {d}/ca.pem exists; nothing written (--force replaces it)\n"));
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca.pem"), ca_before, "untouched");

    certs(&["node", "n1", "--dir", d]).ok();
    let n1_before = std::fs::read(dir.path().join("n1.pem")).expect("n1.pem");
    // Only the key is there: still refused, and the certificate is not written either.
    std::fs::remove_file(dir.path().join("n1.pem")).expect("remove");
    let partial = certs(&["node", "n1", "--dir", d]);
    assert_eq!(partial.code, Some(1));
    assert!(partial.stderr.contains("n1-key.pem exists"), "{}", partial.stderr);
    assert!(!dir.path().join("n1.pem").exists(), "nothing written");

    certs(&["node", "n1", "--dir", d, "--force"]).ok();
    assert_ne!(std::fs::read(dir.path().join("n1.pem")).expect("n1.pem"), n1_before, "a new certificate");
    // A key replaced with --force is private too, whatever the file's mode was.
    let key = dir.path().join("n1-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    certs(&["node", "n1", "--dir", d, "--force"]).ok();
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn mistakes_are_named_and_write_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_str().expect("utf-8 path");
    let no_ca = certs(&["node", "n1", "--dir", d]);
    assert_eq!(no_ca.code, Some(1));
    assert_eq!(no_ca.stderr, format!("error: no CA in {d}: create it with `keel certs init --dir {d}`\n"));

    certs(&["init", "--dir", d]).ok();
    let bad_name = certs(&["client", "../x", "--dir", d]);
    assert_eq!(bad_name.code, Some(1));
    assert!(bad_name.stderr.contains("'../x' cannot name a certificate"), "{}", bad_name.stderr);
    let bad_host = certs(&["node", "n1", "--dir", d, "--host", "a b"]);
    assert_eq!(bad_host.code, Some(1));
    assert!(bad_host.stderr.contains("--host 'a b'"), "{}", bad_host.stderr);
    assert!(!dir.path().join("n1.pem").exists());

    // A CA key that is not the CA certificate's would sign certificates nobody can verify.
    let other = tempfile::tempdir().expect("temp dir");
    let o = other.path().to_str().expect("utf-8 path");
    certs(&["init", "--dir", o]).ok();
    std::fs::copy(other.path().join("ca-key.pem"), dir.path().join("ca-key.pem")).expect("copy");
    let mismatched = certs(&["client", "root", "--dir", d]);
    assert_eq!(mismatched.code, Some(1));
    assert!(mismatched.stderr.contains("not the key of"), "{}", mismatched.stderr);
}
