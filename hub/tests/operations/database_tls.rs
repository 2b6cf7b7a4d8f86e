//! TLS to PostgreSQL in each `--database-tls` mode, against a harness
//! cluster with `ssl = on`.

use omnirelay_hub::store::postgres::pool::{DatabaseError, connect_pool};
use omnirelay_hub::store::postgres::{DatabaseTls, PgStoreConfig};
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

fn config(cluster: &PgCluster, tls: DatabaseTls) -> PgStoreConfig {
    PgStoreConfig { tls, pool_size: 2, committers: 1, ..PgStoreConfig::new(cluster.url("postgres")) }
}

/// Connects through the hub's pool and asks the server whether this session
/// is encrypted.
async fn session_uses_tls(config: &PgStoreConfig) -> Result<bool, String> {
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
    let empty = pki.write("empty.pem", "");
    let err = connect_pool(&PgStoreConfig {
        tls: DatabaseTls::VerifyFull { ca_file: empty.clone() },
        ..PgStoreConfig::new("postgres://127.0.0.1:1/postgres")
    })
    .await
    .expect_err("an empty CA file should fail");
    assert!(matches!(err, DatabaseError::Ca { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("--database-ca-file {}: no PEM certificate found", empty.display()));
}

#[tokio::test]
async fn the_postgres_store_uses_verified_tls_for_every_connection() {
    use omnirelay_hub::store::LogStore;
    use omnirelay_hub::store::postgres::PgStore;
    use omnirelay_tests::{EVENTUALLY_TIMEOUT, eventually};

    let pki = Pki::new("pg test ca");
    let cluster = cluster_with_tls(&pki.server()).await;
    let url = cluster.url("postgres");
    omnirelay_hub::store::postgres::migrate(&url).await.expect("migrate over TLS");
    let ca_file = pki.write("pg-ca.pem", &pki.ca_pem());
    let config = PgStoreConfig { tls: DatabaseTls::VerifyFull { ca_file }, ..PgStoreConfig::new(url.clone()) };
    let store = PgStore::open(config).await.expect("the store opens over verified TLS");

    let shard = omnirelay_hub::ids::ShardId::parse("tls.shard").expect("valid");
    let owner = omnirelay_hub::ids::OwnerId::parse("node").expect("valid");
    let grant = store.acquire_shard(shard, owner, std::time::Duration::from_secs(60)).await.expect("acquire");
    assert!(grant.granted);

    // The pool and the LISTEN connection are both the hub's; all encrypted.
    let (observer, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("observer");
    let driver = tokio::spawn(connection);
    let sessions = eventually("the hub's pool and listener connections", EVENTUALLY_TIMEOUT, || async {
        let row = observer
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'omnirelay-hub'",
                &[],
            )
            .await
            .map_err(|err| err.to_string())?;
        let (all, encrypted): (i64, i64) = (row.get(0), row.get(1));
        if all >= 2 { Ok((all, encrypted)) } else { Err(format!("{all} hub sessions so far")) }
    })
    .await;
    assert_eq!(sessions.0, sessions.1, "every hub session uses TLS: {sessions:?}");
    store.close().await.expect("close");
    driver.abort();
}
