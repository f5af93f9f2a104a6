//! [`PgSweeper`]: the core [`OutboxSweeper`] over a [`PgOutbox`]. The loop, the
//! per-key hold-back and the backoff are core's; what needs SQL (claiming
//! with `FOR UPDATE SKIP LOCKED`, which rows of a key are outstanding,
//! `LISTEN/NOTIFY`, archiving) is the store's, in [`PgOutbox`]'s
//! [`Outbox`](brighter_core::Outbox) implementation.

use std::collections::{HashMap, HashSet};

use brighter_core::{CommandProcessor, Error, OutboxSweeper};

use crate::outbox::{PgOutbox, store};
use crate::row::OutboxRow;

/// The outbox sweeper for [`PgOutbox`]: [`OutboxSweeper`] with the outbox
/// given, sending through `processor`'s messenger.
///
/// - claims outstanding rows oldest first with `FOR UPDATE SKIP LOCKED` and
///   holds the claim (the transaction) until the batch is marked;
/// - per partition key, only the sweeper holding a key's oldest outstanding
///   row sends that key, and within a batch one message at a time;
/// - wakes on `LISTEN/NOTIFY` (a deferred trigger announces a commit while
///   the sweeper waits for one) and polls as a fallback; backs off per failing topic; deletes or archives
///   dispatched rows after a retention.
#[derive(Debug, Clone, Copy)]
pub struct PgSweeper;

impl PgSweeper {
    /// A sweeper of `outbox` sending through `processor`'s producers, with
    /// [`OutboxSweeper`]'s defaults (2 workers, batches of 500, every row
    /// but those leased to their writer as soon as it commits, polling every
    /// 1 s).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(outbox: PgOutbox, processor: CommandProcessor) -> OutboxSweeper {
        OutboxSweeper::new(processor).outbox(outbox)
    }
}

/// Splits claimed rows into those that may be sent now and those held back. For
/// each partition key, the outstanding rows of that key up to the last one
/// claimed are read; only the leading run of them that this batch holds may go.
/// A row of the key that another sweeper holds (or that is not visible yet)
/// stops the run, so a later message of a key never goes before an earlier one.
/// Only the holder of a key's oldest outstanding row can pass, so this also
/// keeps several sweepers from sending one key at once.
pub(crate) async fn split_by_key_order(
    sql: &str,
    tx: &mut sqlx::PgConnection,
    claimed: Vec<OutboxRow>,
) -> Result<(Vec<OutboxRow>, Vec<OutboxRow>), Error> {
    let mut last: HashMap<String, i64> = HashMap::new();
    for row in &claimed {
        if let Some(key) = &row.message.header.partition_key {
            last.insert(key.clone(), row.position);
        }
    }
    if last.is_empty() {
        return Ok((claimed, Vec::new()));
    }
    let (keys, lasts): (Vec<String>, Vec<i64>) = last.into_iter().unzip();
    let outstanding: Vec<(String, i64)> = sqlx::query_as(sql)
        .bind(keys)
        .bind(lasts)
        .fetch_all(&mut *tx)
        .await
        .map_err(store("read partition key order"))?;
    let mut by_key: HashMap<&str, Vec<i64>> = HashMap::new();
    for (key, position) in &outstanding {
        by_key.entry(key.as_str()).or_default().push(*position);
    }
    // Claimed rows are in position order; walk each key's outstanding list in step.
    let mut next_index: HashMap<String, usize> = HashMap::new();
    let mut stopped: HashSet<String> = HashSet::new();
    let (mut ready, mut held) = (Vec::new(), Vec::new());
    for row in claimed {
        let Some(key) = row.message.header.partition_key.clone() else {
            ready.push(row);
            continue;
        };
        let index = next_index.entry(key.clone()).or_insert(0);
        let expected = by_key
            .get(key.as_str())
            .and_then(|p| p.get(*index))
            .copied();
        if !stopped.contains(&key) && expected == Some(row.position) {
            *index += 1;
            ready.push(row);
        } else {
            stopped.insert(key);
            held.push(row);
        }
    }
    Ok((ready, held))
}
