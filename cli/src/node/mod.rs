//! `omnirelay node`: a standalone mesh node (the sidecar), so services in
//! any language use the lease queues over gRPC or HTTP/JSON.
//!
//! [`config`] merges the file, the environment and the flags; [`run`]
//! serves the node on listeners the caller bound, until the shutdown future
//! resolves, then drains calls in flight and stops the sweepers.

pub mod config;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use omnirelay_client::node::{Node, TlsAcceptorConfig, serve};
use tokio::net::TcpListener;

pub use config::{FileConfig, NodeArgs, SidecarConfig};

/// Serves a node configured by `config` on `listener` (and the diagnostics
/// on `control` when given, else on `listener` too) until `shutdown`
/// resolves.
///
/// Events go to the replication hub when `--hub` names it (durable: a
/// restarted node rebuilds every queue from the hub's log), to a local
/// SQLite file with `--replicator sqlite --replicator-path FILE` (durable on
/// this node alone: a restarted node rebuilds from the file), else to a
/// bounded in-memory replicator (the queues live as long as the process).
pub async fn run(
    config: SidecarConfig,
    listener: TcpListener,
    control: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut node_config = config.node_config()?;
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(
            TlsAcceptorConfig::load(cert, key, config.tls.client_ca.as_deref()).await.context("load the TLS files")?,
        ),
        (None, None) if config.tls.client_ca.is_none() => None,
        _ => anyhow::bail!("tls: cert and key are both required (and client_ca needs them)"),
    };
    if config.authorization.rules.is_empty() {
        tracing::warn!("the authorization table has no rules: every call will be refused (default deny)");
    }
    let (mut replicator, kind) = config.replicator().await?;
    if config.unsafe_disable_fencing {
        tracing::error!(
            "--unsafe-disable-fencing: this node acknowledges writes the log refused and never fences itself; \
             it exists for the failure drill only and loses data"
        );
        replicator = Arc::new(omnirelay_client::replication::unfenced::Unfenced::new(replicator));
        node_config.ownership.self_fence = false;
    }
    if kind == "in-memory" {
        tracing::warn!("no replication hub configured (--hub): queues live in this process's memory only");
    }
    let node = Arc::new(
        Node::builder(node_config)
            .replicator(replicator, kind)
            .prometheus(omnirelay_client::node::prometheus())
            .build()?,
    );
    let stopper = Arc::clone(&node);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: draining calls in flight");
        stopper.mark_stopping();
    });
    let rpc = match control {
        None => serve::serve(node.router(), listener, tls, node.stopping()),
        Some(_) => serve::serve(node.rpc_router(), listener, tls, node.stopping()),
    };
    let served = match control {
        None => rpc.await,
        Some(control) => {
            let control = serve::serve(node.control_router(), control, None, node.stopping());
            let (rpc, control) = tokio::join!(rpc, control);
            rpc.and(control)
        }
    };
    node.shutdown().await;
    served.context("serve the node")
}

/// Resolves on SIGTERM or SIGINT, naming the signal.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
