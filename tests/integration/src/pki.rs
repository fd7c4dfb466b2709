//! A throwaway certificate authority for tests of TLS: a CA, a server certificate for
//! 127.0.0.1, and a client certificate, written as PEM files (keys 0600).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub struct Pki {
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
}

impl Pki {
    /// Makes a fresh CA and its two certificates under `dir`.
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(DnType::CommonName, "trellis test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, common_name: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "127.0.0.1",
        );
        let (client_cert, client_key) = leaf(
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "trellis node",
        );

        let pki = Pki {
            ca_file: dir.join("ca.pem"),
            server_cert_file: dir.join("server.pem"),
            server_key_file: dir.join("server.key"),
            client_cert_file: dir.join("client.pem"),
            client_key_file: dir.join("client.key"),
        };
        std::fs::write(&pki.ca_file, ca_cert.pem()).expect("write CA");
        std::fs::write(&pki.server_cert_file, server_cert).expect("write server certificate");
        std::fs::write(&pki.client_cert_file, client_cert).expect("write client certificate");
        trellis_common::dirs::write_private_file(&pki.server_key_file, server_key.as_bytes())
            .expect("write server key");
        trellis_common::dirs::write_private_file(&pki.client_key_file, client_key.as_bytes())
            .expect("write client key");
        pki
    }
}
