//! Delays that cannot lose a message, with a fixed number of broker objects
//! whatever the delays: a ladder of [`DELAY_LEVELS`] delay levels (the scheme
//! NServiceBus uses). Level `L` is a topic exchange and a queue whose messages
//! all wait `2^L` ms (a queue TTL, so they expire in the order they came); a
//! delayed message's routing key spells its delay in binary, one word per
//! level from the highest, then its destination queue. Each level's exchange
//! routes a message whose bit is set through its queue and one whose bit is
//! clear straight on to the next level down; the last level hands it to the
//! delivery exchange, where each destination queue is bound by name.
//!
//! No level queue expires (no `x-expires`, nothing per delay to clean up),
//! they are quorum queues that dead-letter *at least once*, so a broker
//! restart or crash in the middle of a wait loses nothing, and the ladder
//! (named [`DELAY_LADDER`]`.*`) is shared by every queue of the vhost,
//! whatever its exchange: `2 × 27 + 1` objects in all, plus one binding per
//! destination queue.

use std::time::Duration;

use brighter_core::Error;
use lapin::types::AMQPValue;
use lapin::{Channel, ExchangeKind};

use crate::amqp::{SHORT_STRING_MAX, arguments, bind, declare_exchange, declare_queue, text};
use crate::connection::transport;

/// Levels in the ladder: `2^0` to `2^26` ms, so the longest delay is
/// `2^27 - 1` ms (37.3 h), past [`brighter_core::wire::MAX_DELAY`].
pub const DELAY_LEVELS: u32 = 27;

/// The longest delay the ladder holds, in ms.
const MAX_DELAY_MS: u64 = (1 << DELAY_LEVELS) - 1;

/// The prefix of the delay ladder's exchanges and queues, one ladder per
/// vhost: `brighter.delay.level.00` to `.26` and `brighter.delay.deliver`.
/// Keep policies that expire queues (`expires`) off these names.
pub const DELAY_LADDER: &str = "brighter.delay";

/// The exchange and queue of delay level `level`.
pub(crate) fn level_name(level: u32) -> String {
    format!("{DELAY_LADDER}.level.{level:02}")
}

/// The exchange delayed messages leave the ladder through.
pub(crate) fn delivery_exchange() -> String {
    format!("{DELAY_LADDER}.deliver")
}

/// Whole milliseconds of `delay`, rounded up (never early) and cut to the
/// longest the ladder holds.
fn delay_ms(delay: Duration) -> u64 {
    let ms = delay.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).min(MAX_DELAY_MS)
}

/// The routing key a message to `queue` delayed by `delay` enters the ladder
/// with: one word per level, highest first (`1`: wait at this level), then
/// the queue name.
pub(crate) fn routing_key(delay: Duration, queue: &str) -> Result<String, Error> {
    check_queue_name(queue)?;
    let ms = delay_ms(delay);
    let mut key = String::with_capacity(2 * DELAY_LEVELS as usize + queue.len());
    for level in (0..DELAY_LEVELS).rev() {
        key.push(if ms >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(queue);
    Ok(key)
}

/// A queue can be a destination of the ladder when its name fits the routing
/// key beside the delay bits and has no topic wildcards (its binding on the
/// delivery exchange is its name, matched word for word).
fn check_queue_name(queue: &str) -> Result<(), Error> {
    let room = SHORT_STRING_MAX - 2 * DELAY_LEVELS as usize;
    if queue.len() > room {
        return Err(Error::validation(format!(
            "queue '{}…' is {} bytes: a delayed requeue through RabbitMQ's delay levels needs a queue name of at most {room}",
            queue.chars().take(40).collect::<String>(),
            queue.len()
        )));
    }
    if queue.contains(['*', '#']) {
        return Err(Error::validation(format!(
            "queue '{queue}' has a '*' or '#': a delayed requeue through RabbitMQ's delay levels needs a name without topic wildcards"
        )));
    }
    Ok(())
}

/// The binding pattern at level `level` for bit value `bit`.
fn level_pattern(level: u32, bit: char) -> String {
    let mut pattern = "*.".repeat((DELAY_LEVELS - 1 - level) as usize);
    pattern.push(bit);
    pattern.push_str(".#");
    pattern
}

/// Declares the ladder (idempotent: the same arguments every time, so a
/// second declaration changes nothing).
pub(crate) async fn declare_ladder(channel: &Channel) -> Result<(), Error> {
    let deliver = delivery_exchange();
    declare_exchange(channel, &deliver, ExchangeKind::Topic, false).await?;
    for level in 0..DELAY_LEVELS {
        let name = level_name(level);
        let below = if level == 0 {
            deliver.clone()
        } else {
            level_name(level - 1)
        };
        declare_exchange(channel, &name, ExchangeKind::Topic, false).await?;
        let args = arguments(&[
            ("x-queue-type", text("quorum")),
            ("x-message-ttl", AMQPValue::LongLongInt(1_i64 << level)),
            ("x-dead-letter-exchange", text(&below)),
            ("x-dead-letter-strategy", text("at-least-once")),
            // What at-least-once dead-lettering requires.
            ("x-overflow", text("reject-publish")),
        ]);
        declare_queue(channel, &name, true, false, args).await?;
        bind(channel, &name, &name, &level_pattern(level, '1')).await?;
        channel
            .exchange_bind(
                below.as_str().into(),
                name.as_str().into(),
                level_pattern(level, '0').as_str().into(),
                lapin::options::ExchangeBindOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .map_err(|e| transport(&format!("bind exchange '{below}' to '{name}'"), e))?;
    }
    Ok(())
}

/// Binds `queue` to the ladder's delivery exchange, so delayed messages to
/// it arrive.
pub(crate) async fn bind_destination(channel: &Channel, queue: &str) -> Result<(), Error> {
    check_queue_name(queue)?;
    let pattern = format!("{}{queue}", "*.".repeat(DELAY_LEVELS as usize));
    bind(channel, queue, &delivery_exchange(), &pattern).await
}

/// The exchange a delayed message enters the ladder through.
pub(crate) fn entry_exchange() -> String {
    level_name(DELAY_LEVELS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routing_key_spells_the_delay_in_binary_highest_level_first() {
        let key = routing_key(Duration::from_millis(5), "q.a").expect("a routing key");
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words.len(), DELAY_LEVELS as usize + 2);
        assert_eq!(
            &words[DELAY_LEVELS as usize - 3..],
            ["1", "0", "1", "q", "a"]
        );
        assert!(words[..DELAY_LEVELS as usize - 3].iter().all(|w| *w == "0"));
    }

    #[test]
    fn delays_round_up_to_the_millisecond_and_stop_at_the_top_of_the_ladder() {
        assert_eq!(delay_ms(Duration::from_micros(1500)), 2);
        assert_eq!(delay_ms(Duration::from_secs(10 * 24 * 3600)), MAX_DELAY_MS);
        assert!(Duration::from_millis(MAX_DELAY_MS) >= brighter_core::wire::MAX_DELAY);
    }

    #[test]
    fn each_level_looks_at_its_own_word() {
        assert_eq!(level_pattern(DELAY_LEVELS - 1, '1'), "1.#");
        assert_eq!(level_pattern(0, '0'), format!("{}0.#", "*.".repeat(26)));
    }

    #[test]
    fn queue_names_that_cannot_be_destinations_are_refused() {
        assert!(routing_key(Duration::from_secs(1), "a.#").is_err());
        assert!(routing_key(Duration::from_secs(1), &"q".repeat(250)).is_err());
    }
}
