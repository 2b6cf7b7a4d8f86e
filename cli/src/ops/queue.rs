//! `omnirelay dead-letters list|show|redrive|purge` and `omnirelay queue
//! show`: a node's queues, through its ResourceLease procedures over
//! HTTP/JSON (`ListDeadLetters`, `GetDeadLetter`, `RedriveDeadLetter`,
//! `PurgeDeadLetters`, `Stats`) and its `/omnirelay/control/queue`
//! diagnostics endpoint (the pending and leased items with their leases).

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Outcome, progress_bar, text};
use crate::control::Target;

/// Dead letters asked for in one `ListDeadLetters` call (the node caps it
/// at its own maximum).
pub const DEAD_LETTER_PAGE: u32 = 500;

/// Most dead letters `list` prints unless `--limit` says otherwise: a
/// terminal's worth of rows, not a whole backlog.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// Most dead-letter ids one `PurgeDeadLetters` call carries, so that one
/// request stays well under the node's request-size limit.
pub const PURGE_IDS_PER_CALL: usize = 1_000;

/// Which queue.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// The node.
    #[command(flatten)]
    pub target: Target,
    /// The queue's namespace.
    #[arg(long, default_value = "resourcelease")]
    pub namespace: String,
}

/// Some dead letters by id, or all of them.
#[derive(Debug, Clone, Args)]
pub struct Which {
    /// Item ids (or --all).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub item_ids: Vec<String>,
    /// Every dead letter of the queue.
    #[arg(long)]
    pub all: bool,
}

/// `omnirelay dead-letters ...`.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Lists dead letters, oldest first.
    List {
        /// The queue.
        #[command(flatten)]
        queue: QueueArgs,
        /// Most dead letters to list (following the node's pages).
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
    },
    /// One dead letter with its whole attempt history.
    Show {
        /// The queue.
        #[command(flatten)]
        queue: QueueArgs,
        /// The item id.
        item_id: String,
    },
    /// Re-enqueues dead letters as fresh pending items (same id, attempts
    /// reset).
    Redrive {
        /// The queue.
        #[command(flatten)]
        queue: QueueArgs,
        /// Which dead letters.
        #[command(flatten)]
        which: Which,
    },
    /// Deletes dead letters for good.
    Purge {
        /// The queue.
        #[command(flatten)]
        queue: QueueArgs,
        /// Which dead letters.
        #[command(flatten)]
        which: Which,
    },
}

/// `omnirelay queue ...`.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// One queue's counts and items: pending, leased (owner, fencing token,
    /// expiry) and dead-lettered.
    Show {
        /// The node.
        #[command(flatten)]
        target: Target,
        /// The queue's namespace.
        namespace: String,
        /// Most items of each kind to list (the node lists at most 1,000).
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
    },
}

/// Runs a `dead-letters` command.
pub async fn dead_letters(command: DeadLettersCommand) -> anyhow::Result<Outcome> {
    match command {
        DeadLettersCommand::List { queue, limit } => {
            let (letters, more) = list(&queue, limit).await?;
            let json = json!({ "namespace": queue.namespace, "dead_letters": letters, "more": more });
            let mut out = dead_letter_table(&letters, "");
            if more {
                out.push_str(&format!("(more than {limit}; raise --limit)\n"));
            }
            Ok(Outcome::ok(json, out))
        }
        DeadLettersCommand::Show { queue, item_id } => {
            let response =
                queue.target.call(&queue.namespace, "get_dead_letter", &json!({ "item_id": item_id })).await?;
            let letter = response["dead_letter"].clone();
            let text = render_dead_letter(&letter);
            Ok(Outcome::ok(letter, text))
        }
        DeadLettersCommand::Redrive { queue, which } => {
            let ids = if which.all {
                list(&queue, usize::MAX)
                    .await?
                    .0
                    .iter()
                    .map(|letter| text(&letter["item"], "item_id").to_string())
                    .collect()
            } else {
                which.item_ids
            };
            let bar = progress_bar(ids.len() as u64, "redrive");
            let mut redriven = Vec::new();
            let mut failed = Vec::new();
            for id in &ids {
                match queue.target.call(&queue.namespace, "redrive_dead_letter", &json!({ "item_id": id })).await {
                    Ok(_) => redriven.push(id.clone()),
                    Err(err) => failed.push(json!({ "item_id": id, "error": format!("{err:#}") })),
                }
                bar.inc(1);
            }
            bar.finish_and_clear();
            let mut out = format!("redrove {} of {} dead letters\n", redriven.len(), ids.len());
            for failure in &failed {
                out.push_str(&format!("failed {}: {}\n", text(failure, "item_id"), text(failure, "error")));
            }
            let code = u8::from(!failed.is_empty());
            Ok(Outcome { json: json!({ "redriven": redriven, "failed": failed }), text: out, code })
        }
        DeadLettersCommand::Purge { queue, which: Which { item_ids, all } } => {
            if all {
                let response =
                    queue.target.call(&queue.namespace, "purge_dead_letters", &json!({ "all": true })).await?;
                let purged = response["purged"].as_u64().unwrap_or(0);
                return Ok(Outcome::ok(json!({ "purged": purged }), format!("purged {purged} dead letters\n")));
            }
            let chunks: Vec<&[String]> = item_ids.chunks(PURGE_IDS_PER_CALL).collect();
            let bar = progress_bar(item_ids.len() as u64, "purge");
            let mut purged = 0;
            for chunk in chunks {
                let response =
                    queue.target.call(&queue.namespace, "purge_dead_letters", &json!({ "item_ids": chunk })).await?;
                purged += response["purged"].as_u64().unwrap_or(0);
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            Ok(Outcome::ok(
                json!({ "purged": purged }),
                format!("purged {purged} of {} dead letters\n", item_ids.len()),
            ))
        }
    }
}

/// Up to `limit` dead letters, following the node's pages; and whether
/// more are left. `usize::MAX` reads them all (the list is bounded by the
/// queue's capacity).
async fn list(queue: &QueueArgs, limit: usize) -> anyhow::Result<(Vec<Value>, bool)> {
    let mut letters = Vec::new();
    let mut token = String::new();
    loop {
        let page_size =
            DEAD_LETTER_PAGE.min(u32::try_from((limit - letters.len()).saturating_add(1)).unwrap_or(u32::MAX));
        let response = queue
            .target
            .call(&queue.namespace, "list_dead_letters", &json!({ "page_size": page_size, "page_token": token }))
            .await?;
        letters.extend(response["dead_letters"].as_array().cloned().unwrap_or_default());
        token = text(&response, "next_page_token").to_string();
        if letters.len() > limit {
            letters.truncate(limit);
            return Ok((letters, true));
        }
        if token.is_empty() {
            return Ok((letters, false));
        }
    }
}

/// Dead letters as a table, each line after `indent`.
fn dead_letter_table(letters: &[Value], indent: &str) -> String {
    let mut out =
        format!("{indent}{:<28} {:>8} {:<14} {:<30} LAST_ERROR\n", "ITEM_ID", "ATTEMPTS", "REASON", "DEAD_LETTERED_AT");
    for letter in letters {
        let item = &letter["item"];
        out.push_str(&format!(
            "{indent}{:<28} {:>8} {:<14} {:<30} {}\n",
            text(item, "item_id"),
            item["attempt"].as_u64().unwrap_or(0),
            text(letter, "reason"),
            text(letter, "dead_lettered_at"),
            text(item, "last_error"),
        ));
    }
    out
}

/// A dead letter with its attempt history, as text.
fn render_dead_letter(letter: &Value) -> String {
    let item = &letter["item"];
    let payload = &item["payload"];
    let mut out = format!(
        "item {}\n  resource        {}/{}\n  reason          {}\n  dead-lettered   {}\n  enqueued        {}\n  attempts        {}\n  last error      {}\n",
        text(item, "item_id"),
        text(payload, "resource_type"),
        text(payload, "resource_id"),
        text(letter, "reason"),
        text(letter, "dead_lettered_at"),
        text(item, "enqueued_at"),
        item["attempt"].as_u64().unwrap_or(0),
        text(item, "last_error"),
    );
    out.push_str(&format!(
        "  {:>7} {:<24} {:>8} {:<30} {:<30} {:<28} ERROR\n",
        "ATTEMPT", "OWNER", "TOKEN", "LEASED_AT", "ENDED_AT", "OUTCOME"
    ));
    for attempt in item["history"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:>7} {:<24} {:>8} {:<30} {:<30} {:<28} {}\n",
            attempt["attempt"].as_u64().unwrap_or(0),
            text(attempt, "owner"),
            attempt["fencing_token"].as_u64().unwrap_or(0),
            text(attempt, "leased_at"),
            text(attempt, "ended_at"),
            text(attempt, "outcome"),
            text(attempt, "error"),
        ));
    }
    out
}

/// Runs a `queue` command.
pub async fn queue(command: QueueCommand) -> anyhow::Result<Outcome> {
    let QueueCommand::Show { target, namespace, limit } = command;
    if namespace.trim().is_empty() {
        bail!("namespace: must not be empty");
    }
    let path = format!("{}?namespace={}&limit={limit}", omnirelay_client::node::QUEUE_PATH, encode_query(&namespace));
    let view = target.get(&path).await.with_context(|| format!("read queue {namespace}"))?;
    let text = render_queue(&view);
    Ok(Outcome::ok(view, text))
}

/// Percent-encodes a query value (namespaces are dotted words; anything
/// else is escaped).
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A queue view (the node's `/omnirelay/control/queue`, or a replayed
/// state) as text: counts, then a table per kind of item.
pub fn render_queue(view: &Value) -> String {
    let count = |key: &str| view[key].as_u64().unwrap_or(0);
    let mut out = format!(
        "queue {} at sequence {}: pending {}, leased {}, dead letters {}{}\n",
        text(view, "namespace"),
        count("last_sequence"),
        count("pending"),
        count("active"),
        count("dead_letters"),
        if view["draining"] == true { ", draining" } else { "" }
    );
    let listed = |key: &str| view[key].as_array().map_or(0, Vec::len) as u64;
    let note = |shown: u64, total: u64| {
        if shown < total { format!(" (first {shown} of {total})") } else { String::new() }
    };
    out.push_str(&format!("\npending{}\n", note(listed("pending_items"), count("pending"))));
    out.push_str(&format!(
        "  {:<28} {:>8} {:<24} {:<30} {:<30}\n",
        "ITEM_ID", "ATTEMPTS", "RESOURCE", "ENQUEUED_AT", "NOT_BEFORE"
    ));
    for item in view["pending_items"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<28} {:>8} {:<24} {:<30} {:<30}\n",
            text(item, "item_id"),
            item["attempt"].as_u64().unwrap_or(0),
            format!("{}/{}", text(&item["payload"], "resource_type"), text(&item["payload"], "resource_id")),
            text(item, "enqueued_at"),
            text(item, "not_before"),
        ));
    }
    out.push_str(&format!("\nleased{}\n", note(listed("leased_items"), count("active"))));
    out.push_str(&format!(
        "  {:<28} {:>8} {:<24} {:>8} {:<30}\n",
        "ITEM_ID", "ATTEMPT", "OWNER", "TOKEN", "EXPIRES_AT"
    ));
    for item in view["leased_items"].as_array().into_iter().flatten() {
        let lease = &item["lease"];
        out.push_str(&format!(
            "  {:<28} {:>8} {:<24} {:>8} {:<30}\n",
            text(item, "item_id"),
            item["attempt"].as_u64().unwrap_or(0),
            text(lease, "owner"),
            lease["fencing_token"].as_u64().unwrap_or(0),
            text(lease, "expires_at"),
        ));
    }
    out.push_str(&format!("\ndead letters{}\n", note(listed("dead_letter_items"), count("dead_letters"))));
    let letters = view["dead_letter_items"].as_array().cloned().unwrap_or_default();
    out.push_str(&dead_letter_table(&letters, "  "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query("resourcelease.users"), "resourcelease.users");
        assert_eq!(encode_query("a b&c"), "a%20b%26c");
    }
}
