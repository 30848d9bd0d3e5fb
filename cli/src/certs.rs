//! `muster certs`: a development CA and the certificates it issues to the controller, nodes
//! and operators. The subject's common name carries the identity: `controller`,
//! `node:NAME`, `operator:NAME` (also `viewer:NAME`, `admin:NAME`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::client::Failure;

fn fail(what: &str) -> impl Fn(rcgen::Error) -> Failure + '_ {
    move |e| Failure::failed(format!("{what}: {e}"))
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .map_err(|e| Failure::failed(format!("writing {}: {e}", path.display())))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| Failure::failed(format!("writing {}: {e}", path.display())))
}

/// Creates `DIR/ca.pem` and `DIR/ca-key.pem` unless they exist.
pub fn init(dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::failed(format!("creating {}: {e}", dir.display())))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert_path.exists() {
        println!("a CA exists already in {}", dir.display());
        return Ok(());
    }
    let key = KeyPair::generate().map_err(fail("making the CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail("CA parameters"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "muster development CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(fail("signing the CA"))?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    println!(
        "made a development CA: {} (key {})",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

/// What a certificate is for.
pub enum Subject {
    Controller(String),
    Node(String),
    Operator { role: String, name: String },
}

/// Issues `DIR/<file>.pem` and `DIR/<file>-key.pem`, signed by the CA in DIR; returns the
/// certificate's path.
pub fn issue(dir: &Path, subject: Subject) -> Result<PathBuf, Failure> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| {
        Failure::usage(format!(
            "no CA in {} ({e}): run `muster certs init` first",
            dir.display()
        ))
    })?;
    let ca_key_pem = std::fs::read_to_string(dir.join("ca-key.pem"))
        .map_err(|e| Failure::failed(format!("reading the CA key: {e}")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(fail("the CA key"))?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(fail("the CA certificate"))?
        .self_signed(&ca_key)
        .map_err(fail("the CA"))?;

    let (common_name, sans, file) = match subject {
        Subject::Controller(host) => {
            let mut sans = vec![
                host.clone(),
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ];
            sans.dedup();
            ("controller".to_string(), sans, format!("controller-{host}"))
        }
        Subject::Node(name) => (
            format!("node:{name}"),
            vec![format!("{name}.node.muster")],
            format!("node-{name}"),
        ),
        Subject::Operator { role, name } => (
            format!("{role}:{name}"),
            vec![format!("{name}.{role}.muster")],
            format!("{role}-{name}"),
        ),
    };
    let key = KeyPair::generate().map_err(fail("making a key"))?;
    let mut params = CertificateParams::new(sans).map_err(fail("certificate parameters"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.clone());
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(fail("signing the certificate"))?;
    let cert_path = dir.join(format!("{file}.pem"));
    write(
        &dir.join(format!("{file}-key.pem")),
        &key.serialize_pem(),
        true,
    )?;
    write(&cert_path, &cert.pem(), false)?;
    println!(
        "issued {common_name}: {} (key {})",
        cert_path.display(),
        dir.join(format!("{file}-key.pem")).display()
    );
    Ok(cert_path)
}
