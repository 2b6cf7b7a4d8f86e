//! The object storage replicator against a real S3-compatible server
//! (`moto` in server mode, started by the harness): the replicator
//! contract, and shards whose names hold `/` resuming their own logs.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use omnirelay_client::ShardId;
use omnirelay_client::replication::contract::{self, Durability, batch, numbers};
use omnirelay_client::replication::{ObjectStoreReplicator, Replicator};

fn s3(server: &omnirelay_tests::TestS3) -> Arc<dyn object_store::ObjectStore> {
    let store = AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_bucket_name(server.bucket())
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .expect("an S3 client for the test server");
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_replicator_keeps_the_contract_on_s3() {
    let server = omnirelay_tests::TestS3::new().await;
    let store = s3(&server);
    contract::check(
        || {
            let store = Arc::clone(&store);
            async move { Arc::new(ObjectStoreReplicator::new(store, Path::from("omnirelay/logs"))) as Arc<dyn Replicator> }
        },
        Durability::Durable,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_with_slashes_resume_their_own_logs_on_s3() {
    let server = omnirelay_tests::TestS3::new().await;
    let store = s3(&server);
    let root = Path::from("omnirelay/logs");
    let (outer, inner) = (ShardId::from("tenant"), ShardId::from("tenant/orders/eu"));
    {
        let log = ObjectStoreReplicator::new(Arc::clone(&store), root.clone());
        log.publish(&batch(&outer, "p", 1, 1, 2)).await.expect("publish");
        log.publish(&batch(&inner, "p", 1, 10, 3)).await.expect("publish");
    }
    let log = ObjectStoreReplicator::new(store, root);
    assert_eq!(numbers(&log, &outer, 0, 100).await, vec![1, 2]);
    assert_eq!(numbers(&log, &inner, 0, 100).await, vec![10, 11, 12]);
    let next = log.publish(&batch(&outer, "q", 1, 3, 1)).await.expect("publish after the restart");
    assert_eq!(next.first.get(), 3, "the outer shard resumed its own sequence");
}
