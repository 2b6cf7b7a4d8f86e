//! TLS to PostgreSQL in each `--database-tls` mode, against a harness
//! cluster with `ssl = on`.

use omnirelay_hub::config::{DatabaseTls, DatabaseUrl, PostgresConfig};
use omnirelay_hub::database::{DatabaseError, connect_pool};
use omnirelay_tests::{PgCluster, PgOptions, PgServerTls};

use super::pki::{Issued, Pki, dns};

async fn cluster_with_tls(server: &Issued) -> PgCluster {
    let tls = PgServerTls { cert_pem: server.cert_pem.clone(), key_pem: server.key_pem.clone() };
    tokio::task::spawn_blocking(move || PgCluster::start_with_tls(PgOptions::default(), &tls))
        .await
        .expect("cluster start should not panic")
        .unwrap_or_else(|err| panic!("PostgreSQL with TLS unavailable: {err}"))
}

async fn cluster_without_tls() -> PgCluster {
    tokio::task::spawn_blocking(|| PgCluster::start(PgOptions::default()))
        .await
        .expect("cluster start should not panic")
        .unwrap_or_else(|err| panic!("PostgreSQL unavailable: {err}"))
}

fn config(cluster: &PgCluster, tls: DatabaseTls) -> PostgresConfig {
    let url = DatabaseUrl::parse(&cluster.url("postgres")).expect("harness URLs are valid");
    PostgresConfig { url, tls, pool_size: 2 }
}

/// Connects through the hub's pool and asks the server whether this session
/// is encrypted.
async fn session_uses_tls(config: &PostgresConfig) -> Result<bool, String> {
    let pool = connect_pool(config).await.map_err(|err| format!("pool: {err}"))?;
    let client = pool.get().await.map_err(|err| format!("connect: {err}"))?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|err| format!("query: {err}"))?;
    Ok(row.get(0))
}

#[tokio::test]
async fn verify_full_connects_to_a_server_signed_by_the_configured_ca() {
    let pki = Pki::new("pg test ca");
    let cluster = cluster_with_tls(&pki.server()).await;
    let ca_file = pki.write("pg-ca.pem", &pki.ca_pem());
    assert_eq!(session_uses_tls(&config(&cluster, DatabaseTls::VerifyFull { ca_file })).await, Ok(true));
}

#[tokio::test]
async fn verify_full_refuses_a_server_signed_by_another_ca() {
    let pki = Pki::new("pg test ca");
    let cluster = cluster_with_tls(&pki.server()).await;
    let other = Pki::new("another ca");
    let ca_file = other.write("other-ca.pem", &other.ca_pem());
    let err = session_uses_tls(&config(&cluster, DatabaseTls::VerifyFull { ca_file }))
        .await
        .expect_err("an untrusted server must be refused");
    assert!(err.starts_with("connect:"), "{err}");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host() {
    let pki = Pki::new("pg test ca");
    let cluster = cluster_with_tls(&pki.issue("db", vec![dns("db.elsewhere.test")])).await;
    let ca_file = pki.write("pg-ca.pem", &pki.ca_pem());
    let err = session_uses_tls(&config(&cluster, DatabaseTls::VerifyFull { ca_file }))
        .await
        .expect_err("a certificate naming another host must be refused");
    assert!(err.starts_with("connect:"), "{err}");
}

#[tokio::test]
async fn require_encrypts_without_verifying_the_certificate() {
    let unknown = Pki::new("a ca the hub does not know");
    let cluster = cluster_with_tls(&unknown.server()).await;
    assert_eq!(session_uses_tls(&config(&cluster, DatabaseTls::Require)).await, Ok(true));
}

#[tokio::test]
async fn require_fails_against_a_server_without_tls() {
    let cluster = cluster_without_tls().await;
    let err = session_uses_tls(&config(&cluster, DatabaseTls::Require)).await.expect_err("no TLS, no connection");
    assert!(err.starts_with("connect:"), "{err}");
}

#[tokio::test]
async fn prefer_uses_tls_when_offered_and_plaintext_otherwise() {
    let pki = Pki::new("pg test ca");
    let with_tls = cluster_with_tls(&pki.server()).await;
    assert_eq!(session_uses_tls(&config(&with_tls, DatabaseTls::Prefer)).await, Ok(true));
    let without_tls = cluster_without_tls().await;
    assert_eq!(session_uses_tls(&config(&without_tls, DatabaseTls::Prefer)).await, Ok(false));
}

#[tokio::test]
async fn disable_connects_in_plaintext_even_when_tls_is_offered() {
    let pki = Pki::new("pg test ca");
    let cluster = cluster_with_tls(&pki.server()).await;
    assert_eq!(session_uses_tls(&config(&cluster, DatabaseTls::Disable)).await, Ok(false));
}

#[tokio::test]
async fn an_unusable_ca_file_names_the_flag() {
    let pki = Pki::new("pg test ca");
    let url = DatabaseUrl::parse("postgres://127.0.0.1:1/postgres").expect("valid URL");
    let empty = pki.write("empty.pem", "");
    let err =
        connect_pool(&PostgresConfig { url, tls: DatabaseTls::VerifyFull { ca_file: empty.clone() }, pool_size: 1 })
            .await
            .expect_err("an empty CA file should fail");
    assert!(matches!(err, DatabaseError::Ca { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("--database-ca-file {}: no PEM certificate found", empty.display()));
}
