//! The harness itself: owned PostgreSQL survives a stop and restart, each test
//! gets a fresh database, Redis round-trips.

use omnirelay_tests::{PgCluster, PgOptions, TestDb, TestRedis};

#[tokio::test]
async fn postgres_round_trip_survives_stop_and_restart() {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(PgOptions { durable: true, ..Default::default() }))
        .await
        .expect("start task should not panic")
        .expect("cluster should start");
    let url = cluster.url("postgres");

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    let driver = tokio::spawn(connection);
    client.batch_execute("CREATE TABLE kv (k text PRIMARY KEY, v bytea NOT NULL)").await.expect("create table");
    let body: &[u8] = b"\x00omnirelay\xff";
    client.execute("INSERT INTO kv VALUES ($1, $2)", &[&"k1", &body]).await.expect("insert");

    cluster.stop().expect("stop should succeed");
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "a stopped server must not answer");
    let _ = driver.await;
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.is_err(),
        "a stopped server must refuse connections"
    );

    cluster.start_again().expect("restart should succeed");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("reconnect");
    tokio::spawn(connection);
    let row = client.query_one("SELECT v FROM kv WHERE k = $1", &[&"k1"]).await.expect("read back");
    assert_eq!(row.get::<_, Vec<u8>>(0), body);

    // A crash (immediate shutdown) loses nothing committed either.
    client.execute("INSERT INTO kv VALUES ($1, $2)", &[&"k2", &body]).await.expect("insert");
    cluster.crash().expect("crash should succeed");
    cluster.start_again().expect("restart after crash should succeed");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("reconnect");
    tokio::spawn(connection);
    let count: i64 = client.query_one("SELECT count(*) FROM kv", &[]).await.expect("count").get(0);
    assert_eq!(count, 2);
}

#[tokio::test]
async fn each_test_database_is_fresh() {
    let first = TestDb::new().await;
    let second = TestDb::new().await;
    assert_ne!(first.name(), second.name());

    let a = first.client().await;
    a.batch_execute("CREATE TABLE only_here (id int)").await.expect("create in first");
    let b = second.client().await;
    let missing = b.query_one("SELECT count(*) FROM only_here", &[]).await;
    assert!(missing.is_err(), "a table of one test database must not exist in another");

    let pool = first.pool(2);
    let conn = pool.get().await.expect("pool connection");
    let n: i64 = conn.query_one("SELECT count(*) FROM only_here", &[]).await.expect("count").get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn template_databases_are_built_once_and_copied() {
    let key = "harness_seeded_v1";
    let init = |url: String| async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute("CREATE TABLE seeded (id int); INSERT INTO seeded VALUES (7)").await?;
        Ok(())
    };
    let first = TestDb::from_template(key, init).await;
    let second = TestDb::from_template(key, |_| async { anyhow::bail!("the template should exist already") }).await;
    for db in [&first, &second] {
        let id: i32 = db.client().await.query_one("SELECT id FROM seeded", &[]).await.expect("seeded row").get(0);
        assert_eq!(id, 7);
    }
    first.client().await.batch_execute("DELETE FROM seeded").await.expect("delete");
    let left: i64 = second.client().await.query_one("SELECT count(*) FROM seeded", &[]).await.expect("count").get(0);
    assert_eq!(left, 1, "copies of a template are independent");
}

#[tokio::test]
async fn redis_round_trip() {
    let redis = TestRedis::new().await;
    let mut conn = redis.connection().await;
    let key = format!("{}greeting", redis.prefix());
    let () = redis::cmd("SET").arg(&key).arg("hello").query_async(&mut conn).await.expect("set");
    let value: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.expect("get");
    assert_eq!(value, "hello");
}
