//! Credential lifecycle (spec 4.2) against the devserver: env credential, file credential,
//! registration with the writability probe first, reuse across restarts, clear errors.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use windshift_devserver::{DevServer, DevServerConfig};
use windshift_runner::control::{
    obtain_credential, CredentialError, CredentialInputs, CredentialSource,
};

fn inputs(file: std::path::PathBuf, token: Option<String>) -> CredentialInputs {
    CredentialInputs {
        credential: None,
        credential_file: file,
        registration_token: token,
        name: "cred-test".into(),
    }
}

#[tokio::test]
async fn registers_persists_0600_and_reuses_the_file_across_devserver_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devserver");
    let cred_file = dir.path().join("cache/credential");
    let server = DevServer::start(DevServerConfig::new(&data)).await.unwrap();
    let pool = server.core().create_pool(&Default::default()).unwrap().id;
    let token = server
        .core()
        .mint_token(pool, &Default::default())
        .unwrap()
        .token;

    let c = client(&server.api_url());
    let got = obtain_credential(&c, &inputs(cred_file.clone(), Some(token.clone())))
        .await
        .unwrap();
    assert!(
        matches!(
            got.source,
            CredentialSource::Registered {
                persisted: true,
                ..
            }
        ),
        "{got:?}"
    );
    let saved = std::fs::read_to_string(&cred_file).unwrap();
    assert!(saved.starts_with("wsrc_") && saved.ends_with('\n'));
    assert_eq!(
        std::fs::metadata(&cred_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(cred_file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    c.heartbeat().await.expect("installed on the client");
    let run = server
        .core()
        .enqueue(&windshift_devserver::types::EnqueueRun {
            pool_id: pool,
            prompt: "p".into(),
            ..Default::default()
        })
        .unwrap()
        .id;
    server.stop().await;

    // Restart on the same data directory (new port): the run and the instance survive, the
    // saved credential is accepted, no token needed.
    let server = DevServer::start(DevServerConfig::new(&data)).await.unwrap();
    assert_eq!(server.core().run(run).unwrap().status, "queued");
    let c2 = client(&server.api_url());
    let got = obtain_credential(&c2, &inputs(cred_file.clone(), None))
        .await
        .unwrap();
    assert_eq!(got.source, CredentialSource::File);
    assert_eq!(c2.claim().await.unwrap().unwrap().run_id, run);
    server.stop().await;
}

#[tokio::test]
async fn env_credential_wins_and_a_rejected_one_falls_through_to_registration() {
    let ts = TestServer::start().await;
    let pool = ts.pool(0);
    let first = client_no_retry(&ts.api_url())
        .register(&ts.token(pool), "a")
        .await
        .unwrap();
    let file = ts.dir.path().join("c/credential");
    let c = client(&ts.api_url());
    let mut i = inputs(file.clone(), None);
    i.credential = Some(format!("  {}  ", first.credential));
    let got = obtain_credential(&c, &i).await.unwrap();
    assert_eq!(got.source, CredentialSource::Env);
    assert!(!file.exists(), "an env credential is not written anywhere");

    // Revoked: the probe's 401 falls through; with a token the runner registers anew.
    ts.server.core().revoke_instance(first.instance_id).unwrap();
    let c = client(&ts.api_url());
    i.registration_token = Some(ts.token(pool));
    let got = obtain_credential(&c, &i).await.unwrap();
    assert!(matches!(got.source, CredentialSource::Registered { .. }));
    assert!(
        got.warnings.iter().any(|w| w.contains("rejected")),
        "{:?}",
        got.warnings
    );
    assert!(!got.warnings.iter().any(|w| w.contains(&first.credential)));
    assert!(file.exists());
    ts.server.stop().await;
}

#[tokio::test]
async fn unwritable_credential_path_does_not_spend_the_token() {
    let ts = TestServer::start().await;
    let pool = ts.pool(0);
    let token = ts.token(pool);
    // A regular file where a directory should be: unwritable even for root.
    let blocker = ts.dir.path().join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let c = client(&ts.api_url());
    let err = obtain_credential(&c, &inputs(blocker.join("credential"), Some(token.clone())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CredentialError::FileNotWritable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("NOT used"), "{err}");
    assert!(!err.to_string().contains(&token));
    assert!(
        ts.server.core().instances().is_empty(),
        "no instance was registered"
    );
    // The same token still works with a writable path.
    let good = ts.dir.path().join("ok/credential");
    let got = obtain_credential(&c, &inputs(good, Some(token)))
        .await
        .unwrap();
    assert!(matches!(
        got.source,
        CredentialSource::Registered {
            persisted: true,
            ..
        }
    ));
    ts.server.stop().await;
}

#[tokio::test]
async fn token_reuse_missing_token_and_unreachable_server_give_clear_errors() {
    let ts = TestServer::start().await;
    let pool = ts.pool(0);
    let token = ts.token(pool);
    let c = client(&ts.api_url());
    obtain_credential(
        &c,
        &inputs(ts.dir.path().join("a/credential"), Some(token.clone())),
    )
    .await
    .unwrap();
    // Second runner, same token: already used.
    let c2 = client(&ts.api_url());
    let err = obtain_credential(
        &c2,
        &inputs(ts.dir.path().join("b/credential"), Some(token.clone())),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, CredentialError::TokenRejected { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("mint a new registration token"),
        "{err}"
    );
    assert!(!err.to_string().contains(&token));
    assert!(!c2.has_credential());
    // No token at all.
    let err = obtain_credential(&c2, &inputs(ts.dir.path().join("b/credential"), None))
        .await
        .unwrap_err();
    assert!(matches!(err, CredentialError::NoToken { .. }), "{err}");
    assert!(err.to_string().contains("WSRUNNER_REGISTRATION_TOKEN"));
    ts.server.stop().await;

    // Server gone.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let mut cfg = config(&format!("http://{addr}/api"));
    cfg.register_retry = windshift_runner::control::RetryPolicy::new(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(20),
        std::time::Duration::from_millis(100),
    );
    let c3 = windshift_runner::control::Client::new(cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = obtain_credential(&c3, &inputs(dir.path().join("credential"), Some(token)))
        .await
        .unwrap_err();
    assert!(matches!(err, CredentialError::Unreachable { .. }), "{err}");
}
