//! The drill's independent checker: it reads what the callers recorded
//! (every call as invoked, then ok, fail or unknown) and what the hub's log
//! holds, and counts what must never happen. It knows nothing of the nodes'
//! state; the log is the truth, the history is what callers were told.
//!
//! - **lost**: an acknowledged enqueue whose item the log does not create
//!   (`Enqueued` with that item id and request id), or an acknowledged
//!   complete the log does not record (`Completed` with that item and
//!   token);
//! - **stale accepted**: an acknowledged lease whose fencing token is not
//!   the sequence of that item's `Leased` event in the log: an owner that
//!   was no longer the shard's writer granted it;
//! - **double owned**: an item two callers held at once: acknowledged
//!   completes under two different tokens, or a second lease acknowledged
//!   before the first one's expiry while the first was neither completed
//!   nor failed;
//! - **gaps**: a shard's log whose sequences are not consecutive from its
//!   lowest to its head, or whose chain does not verify (the reader checks
//!   each link);
//! - **stale rejected**: writes of stale owners the system refused (the
//!   hub's stale-epoch refusals and the nodes' own fences), counted from
//!   the processes' metrics. The drill must see some: a run without them
//!   did not exercise fencing.
//!
//! Pass: 0 lost, 0 double owned, 0 stale accepted, 0 gaps, stale rejected
//! above 0.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

/// One call as the caller saw it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// Who answered: a node id, or `mesh` for the routing client.
    pub(crate) via: String,
    pub(crate) namespace: String,
    pub(crate) call: Call,
    pub(crate) outcome: Outcome,
    pub(crate) invoked: SystemTime,
    pub(crate) answered: SystemTime,
}

/// What was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Enqueue { request_id: String },
    Lease { worker: String },
    Complete { item: String, token: u64 },
}

/// What the caller was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Acknowledged.
    Ok(Answer),
    /// Refused: certainly not done.
    Fail(String),
    /// No answer (deadline, connection lost): may or may not be done.
    Unknown(String),
}

/// An acknowledgement's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Enqueued {
        item: String,
    },
    Leased {
        item: String,
        token: u64,
        expires_at: SystemTime,
    },
    /// A lease call that found nothing to lease.
    Empty,
    Completed,
}

/// A logged event, reduced to what the checker needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Logged {
    Enqueued { item: String, request_id: String },
    Leased { item: String },
    Completed { item: String, token: u64 },
    Other,
}

/// One shard's log as read back.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardLog {
    /// `(sequence, event)` in the order read.
    pub(crate) events: Vec<(u64, Logged)>,
    /// The lowest sequence stored and the head when read.
    pub(crate) low: u64,
    pub(crate) head: u64,
    /// A read error (a broken chain link, an undecodable event).
    pub(crate) error: Option<String>,
}

/// What the checker found; each list names the cases.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) calls: usize,
    pub(crate) acknowledged: usize,
    pub(crate) failed: usize,
    pub(crate) unknown: usize,
    pub(crate) lost: Vec<String>,
    pub(crate) stale_accepted: Vec<String>,
    pub(crate) double_owned: Vec<String>,
    pub(crate) gaps: Vec<String>,
    pub(crate) stale_rejected: u64,
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.stale_accepted.is_empty()
            && self.double_owned.is_empty()
            && self.gaps.is_empty()
            && self.stale_rejected > 0
    }

    /// The violations only (not the stale-rejected floor).
    pub(crate) fn violations(&self) -> usize {
        self.lost.len() + self.stale_accepted.len() + self.double_owned.len() + self.gaps.len()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "calls {} (acknowledged {}, refused {}, unknown {})",
            self.calls, self.acknowledged, self.failed, self.unknown
        )?;
        for (name, cases) in [
            ("lost", &self.lost),
            ("stale accepted", &self.stale_accepted),
            ("double owned", &self.double_owned),
            ("gaps", &self.gaps),
        ] {
            write!(f, "{name}: {}", cases.len())?;
            for case in cases.iter().take(5) {
                write!(f, "\n  {case}")?;
            }
            if cases.len() > 5 {
                write!(f, "\n  ... and {} more", cases.len() - 5)?;
            }
            writeln!(f)?;
        }
        write!(f, "stale rejected: {}", self.stale_rejected)
    }
}

/// Checks `history` against `logs` (namespace -> log); `stale_rejected` is
/// the refusals of stale writes the processes counted.
pub(crate) fn check(history: &[Record], logs: &BTreeMap<String, ShardLog>, stale_rejected: u64) -> Report {
    let mut report = Report { calls: history.len(), stale_rejected, ..Report::default() };
    for (namespace, log) in logs {
        if let Some(error) = &log.error {
            report.gaps.push(format!("{namespace}: {error}"));
        }
        let mut expected = log.low;
        for (sequence, _) in &log.events {
            if *sequence != expected {
                report.gaps.push(format!("{namespace}: sequence {sequence} where {expected} was due"));
            }
            expected = sequence + 1;
        }
        if log.error.is_none() && expected != log.head + 1 {
            report.gaps.push(format!("{namespace}: read up to {} but the head is {}", expected - 1, log.head));
        }
    }
    // The log, indexed.
    let mut created: HashMap<(&str, &str), &str> = HashMap::new();
    let mut leased: HashMap<(&str, u64), &str> = HashMap::new();
    let mut completed: HashMap<(&str, &str), u64> = HashMap::new();
    for (namespace, log) in logs {
        for (sequence, event) in &log.events {
            match event {
                Logged::Enqueued { item, request_id } => {
                    created.insert((namespace, item), request_id);
                }
                Logged::Leased { item } => {
                    leased.insert((namespace, *sequence), item);
                }
                Logged::Completed { item, token } => {
                    completed.insert((namespace, item), *token);
                }
                Logged::Other => {}
            }
        }
    }
    // Per item: acknowledged leases and completes, in answer order.
    struct Held<'a> {
        record: &'a Record,
        token: u64,
        expires_at: SystemTime,
    }
    let mut leases: BTreeMap<(&str, &str), Vec<Held<'_>>> = BTreeMap::new();
    let mut completes: BTreeMap<(&str, &str), Vec<(u64, &Record)>> = BTreeMap::new();
    for record in history {
        let answer = match &record.outcome {
            Outcome::Ok(answer) => answer,
            Outcome::Fail(_) => {
                report.failed += 1;
                continue;
            }
            Outcome::Unknown(_) => {
                report.unknown += 1;
                continue;
            }
        };
        report.acknowledged += 1;
        let namespace = record.namespace.as_str();
        match (&record.call, answer) {
            (Call::Enqueue { request_id }, Answer::Enqueued { item }) => {
                if created.get(&(namespace, item.as_str())) != Some(&request_id.as_str()) {
                    report.lost.push(format!(
                        "{namespace}: enqueue {request_id} acknowledged by {} as item {item}, not in the log",
                        record.via
                    ));
                }
            }
            (Call::Lease { worker }, Answer::Leased { item, token, expires_at }) => {
                if leased.get(&(namespace, *token)) != Some(&item.as_str()) {
                    report.stale_accepted.push(format!(
                        "{namespace}: lease of {item} to {worker} acknowledged by {} with token {token}, \
                         which is not that item's lease in the log",
                        record.via
                    ));
                }
                leases.entry((namespace, item)).or_default().push(Held {
                    record,
                    token: *token,
                    expires_at: *expires_at,
                });
            }
            (Call::Lease { .. }, Answer::Empty) => {}
            (Call::Complete { item, token }, Answer::Completed) => {
                if completed.get(&(namespace, item.as_str())) != Some(token) {
                    report.lost.push(format!(
                        "{namespace}: complete of {item} with token {token} acknowledged by {}, not in the log",
                        record.via
                    ));
                }
                completes.entry((namespace, item)).or_default().push((*token, record));
            }
            (call, answer) => report.lost.push(format!("{namespace}: {call:?} answered {answer:?}, a mismatch")),
        }
    }
    for ((namespace, item), done) in &completes {
        let mut tokens: Vec<u64> = done.iter().map(|(token, _)| *token).collect();
        tokens.sort_unstable();
        tokens.dedup();
        if tokens.len() > 1 {
            report.double_owned.push(format!("{namespace}: {item} completed under tokens {tokens:?}"));
        }
    }
    for ((namespace, item), held) in &mut leases {
        held.sort_by_key(|lease| lease.record.answered);
        for pair in held.windows(2) {
            let (first, second) = (&pair[0], &pair[1]);
            // The first holder let go if its complete was acknowledged
            // before the second lease was asked for.
            let released = completes.get(&(*namespace, *item)).is_some_and(|done| {
                done.iter().any(|(token, record)| *token == first.token && record.answered <= second.record.invoked)
            });
            if !released && second.record.answered < first.expires_at {
                report.double_owned.push(format!(
                    "{namespace}: {item} leased with token {} (by {}) while token {} (by {}) was still valid",
                    second.token, second.record.via, first.token, first.record.via
                ));
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    //! The checker catches each violation it claims to: a checker that
    //! cannot fail proves nothing.

    use std::time::Duration;

    use super::*;

    fn at(millis: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + millis)
    }

    fn record(via: &str, call: Call, outcome: Outcome, invoked: u64, answered: u64) -> Record {
        Record { via: via.into(), namespace: "ns".into(), call, outcome, invoked: at(invoked), answered: at(answered) }
    }

    fn enqueue(id: &str, item: &str) -> Record {
        record("a", Call::Enqueue { request_id: id.into() }, Outcome::Ok(Answer::Enqueued { item: item.into() }), 0, 1)
    }

    fn lease(via: &str, item: &str, token: u64, answered: u64, expires: u64) -> Record {
        record(
            via,
            Call::Lease { worker: "w".into() },
            Outcome::Ok(Answer::Leased { item: item.into(), token, expires_at: at(expires) }),
            answered - 1,
            answered,
        )
    }

    fn complete(via: &str, item: &str, token: u64, answered: u64) -> Record {
        record(via, Call::Complete { item: item.into(), token }, Outcome::Ok(Answer::Completed), answered - 1, answered)
    }

    /// A log of one item enqueued at 1, leased at 2 and completed at 3.
    fn log() -> BTreeMap<String, ShardLog> {
        let events = vec![
            (1, Logged::Enqueued { item: "i1".into(), request_id: "r1".into() }),
            (2, Logged::Leased { item: "i1".into() }),
            (3, Logged::Completed { item: "i1".into(), token: 2 }),
        ];
        BTreeMap::from([("ns".to_string(), ShardLog { events, low: 1, head: 3, error: None })])
    }

    fn consistent() -> Vec<Record> {
        vec![enqueue("r1", "i1"), lease("a", "i1", 2, 10, 1_000), complete("a", "i1", 2, 20)]
    }

    #[test]
    fn a_consistent_history_passes() {
        let report = check(&consistent(), &log(), 1);
        assert!(report.passed(), "{report}");
        assert_eq!((report.calls, report.acknowledged), (3, 3));
    }

    #[test]
    fn no_stale_rejection_means_fencing_was_not_exercised() {
        let report = check(&consistent(), &log(), 0);
        assert_eq!(report.violations(), 0);
        assert!(!report.passed(), "a run that saw no stale write refused must not pass");
    }

    #[test]
    fn an_acknowledged_enqueue_missing_from_the_log_is_lost() {
        let mut history = consistent();
        history.push(enqueue("r2", "i2"));
        let report = check(&history, &log(), 1);
        assert_eq!(report.lost.len(), 1, "{report}");
        assert!(!report.passed());
    }

    #[test]
    fn an_acknowledged_complete_missing_from_the_log_is_lost() {
        let mut history = consistent();
        history[2] = complete("a", "i1", 7, 20);
        let report = check(&history, &log(), 1);
        assert_eq!(report.lost.len(), 1, "{report}");
    }

    #[test]
    fn a_lease_whose_token_the_log_does_not_hold_was_stale() {
        let mut history = consistent();
        history.push(lease("b", "i1", 3, 15, 1_000));
        let report = check(&history, &log(), 1);
        assert_eq!(report.stale_accepted.len(), 1, "{report}");
    }

    #[test]
    fn two_valid_leases_at_once_are_double_ownership() {
        let mut history = consistent();
        // A second holder while the first (valid until 1000, completed
        // only at 20) still held it.
        history.push(lease("b", "i1", 2, 15, 1_000));
        let report = check(&history, &log(), 1);
        assert_eq!(report.double_owned.len(), 1, "{report}");
        // After the first expired, a new lease is no double ownership.
        let mut history = vec![enqueue("r1", "i1"), lease("a", "i1", 2, 10, 100)];
        history.push(lease("b", "i1", 2, 150, 1_000));
        let report = check(&history, &log(), 1);
        assert!(report.double_owned.is_empty(), "{report}");
    }

    #[test]
    fn completes_under_two_tokens_are_double_ownership() {
        let mut history = consistent();
        history.push(complete("b", "i1", 9, 30));
        let report = check(&history, &log(), 1);
        assert_eq!(report.double_owned.len(), 1, "{report}");
    }

    #[test]
    fn gaps_and_broken_chains_are_found() {
        let mut logs = log();
        logs.get_mut("ns").expect("ns").events.remove(1);
        let report = check(&consistent(), &logs, 1);
        assert!(!report.gaps.is_empty(), "{report}");
        let mut logs = log();
        logs.get_mut("ns").expect("ns").head = 5;
        assert_eq!(check(&consistent(), &logs, 1).gaps.len(), 1);
        let mut logs = log();
        logs.get_mut("ns").expect("ns").error = Some("broken link at 2".into());
        assert_eq!(check(&consistent(), &logs, 1).gaps.len(), 1);
    }

    #[test]
    fn refusals_and_unknowns_are_counted_not_judged() {
        let history = vec![
            record("a", Call::Enqueue { request_id: "x".into() }, Outcome::Fail("invalid".into()), 0, 1),
            record("a", Call::Enqueue { request_id: "y".into() }, Outcome::Unknown("deadline".into()), 0, 1),
        ];
        let report = check(&history, &log(), 1);
        assert_eq!((report.failed, report.unknown, report.violations()), (1, 1, 0));
    }
}
