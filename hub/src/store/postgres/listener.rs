//! The notification listener: one dedicated connection per replica that
//! `LISTEN`s for the heads other replicas commit and turns them into
//! [`LogChange`]s for the live tail.

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::defaults;
use crate::log::ids::{Sequence, ShardId};
use crate::store::LogChange;

/// Keeps a `LISTEN` connection open until cancelled, reconnecting with
/// backoff. Every (re)connect announces [`LogChange::Resync`], since
/// notifications sent while disconnected are lost.
pub(crate) async fn run(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    changes: broadcast::Sender<LogChange>,
    cancel: CancellationToken,
) {
    let mut backoff = defaults::LISTEN_RETRY;
    loop {
        let connected = tokio::select! {
            () = cancel.cancelled() => return,
            connected = config.connect(tls.clone()) => connected,
        };
        match connected {
            Ok((client, connection)) => {
                let (notes, mut received) = mpsc::unbounded_channel();
                let mut driver = std::pin::pin!(drive(connection, notes));
                let statement = format!("LISTEN {}", defaults::NOTIFY_CHANNEL);
                let listen = client.batch_execute(&statement);
                let listening = tokio::select! {
                    () = cancel.cancelled() => return,
                    result = &mut driver => result.and(Ok(false)),
                    result = listen => result.map(|()| true),
                };
                match listening {
                    Ok(true) => {
                        tracing::debug!("listening for log notifications");
                        backoff = defaults::LISTEN_RETRY;
                        let _ = changes.send(LogChange::Resync);
                        loop {
                            tokio::select! {
                                () = cancel.cancelled() => return,
                                result = &mut driver => {
                                    if let Err(err) = result {
                                        tracing::warn!(error = %err, "log notification connection lost; reconnecting");
                                    }
                                    break;
                                }
                                Some(payload) = received.recv() => forward(&payload, &changes),
                            }
                        }
                    }
                    Ok(false) => {}
                    Err(err) => tracing::warn!(error = %err, "failed to listen for log notifications"),
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "failed to connect the log notification listener")
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(defaults::LISTEN_RETRY_MAX);
    }
}

/// Polls the connection, passing notification payloads on; resolves when the
/// connection ends.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notes: mpsc::UnboundedSender<String>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        if let AsyncMessage::Notification(note) = message? {
            // The receiver lives as long as this future's caller loop.
            let _ = notes.send(note.payload().to_string());
        }
    }
    Ok(())
}

/// Parses `"<shard_id> <head>"` (see advance_heads.sql).
fn forward(payload: &str, changes: &broadcast::Sender<LogChange>) {
    match parse(payload) {
        Some((shard, head)) => {
            let _ = changes.send(LogChange::Appended { shard, head, events: None });
        }
        None => tracing::warn!(payload, "ignoring a malformed log notification"),
    }
}

fn parse(payload: &str) -> Option<(ShardId, Sequence)> {
    let (shard, head) = payload.split_once(' ')?;
    Some((ShardId::parse(shard).ok()?, Sequence(head.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_into_shard_and_head() {
        let (shard, head) = parse("resourcelease.users 42").expect("valid payload");
        assert_eq!(shard.as_str(), "resourcelease.users");
        assert_eq!(head, Sequence(42));
        assert!(parse("no-head").is_none());
        assert!(parse("shard notanumber").is_none());
    }
}
