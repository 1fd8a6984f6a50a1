//! The client's TLS path against the devserver serving https with a CA generated here and
//! trusted only through SSL_CERT_FILE (nextest runs each test in its own process, so setting
//! the variable affects only this test).

#[path = "control_support/mod.rs"]
mod common;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use windshift_devserver::{DevServer, DevServerConfig, TlsFiles};
use windshift_runner::control::{Client, ClientConfig, Preflight};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_devserver_is_trusted_via_ssl_cert_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "windshift test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
    let ca_pem = dir.path().join("ca.pem");
    let cert_pem = dir.path().join("server.pem");
    let key_pem = dir.path().join("server.key");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, server_cert.pem()).unwrap();
    std::fs::write(&key_pem, server_key.serialize_pem()).unwrap();

    let mut cfg = DevServerConfig::new(dir.path().join("data"));
    cfg.tls = Some(TlsFiles {
        cert: cert_pem,
        key: key_pem,
    });
    let server = DevServer::start(cfg).await.unwrap();
    let url = format!("https://localhost:{}/api", server.addr().port());
    assert!(server.api_url().starts_with("https://"));

    // Without the CA the handshake fails (an unknown issuer): preflight reports unreachable.
    // SAFETY-free in edition 2021; this process runs only this test.
    std::env::remove_var("SSL_CERT_DIR");
    std::env::set_var("SSL_CERT_FILE", dir.path().join("empty.pem"));
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let untrusted = Client::new(ClientConfig::new(&url)).unwrap();
    match untrusted.preflight().await.unwrap() {
        Preflight::Unreachable { message } => {
            assert!(
                message.to_lowercase().contains("certificate") || message.contains("issuer"),
                "{message}"
            )
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }

    // Trust the generated CA through SSL_CERT_FILE: https without WSRUNNER_ALLOW_INSECURE.
    std::env::set_var("SSL_CERT_FILE", &ca_pem);
    let client = Client::new(ClientConfig::new(&url)).unwrap();
    assert!(matches!(
        client.preflight().await.unwrap(),
        Preflight::Ok { .. }
    ));
    let pool = server.core().create_pool(&Default::default()).unwrap().id;
    let token = server
        .core()
        .mint_token(pool, &Default::default())
        .unwrap()
        .token;
    let reg = client.register(&token, "tls").await.unwrap();
    client.set_credential(&reg.credential);
    assert_eq!(client.claim().await.unwrap(), None);
    server.stop().await;
}
