//! Cases 1 and 2: `kill -9` the process that sweeps the outbox, or the one that
//! consumes, several times mid-stream, then count what arrived and what was done.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use brighter_core::pipeline::OnDuplicate;
use brighter_core::{Dispatcher, Message, Outbox, Producer};
use brighter_kafka::KafkaProducer;
use brighter_rabbitmq::RabbitProducer;
use uuid::Uuid;

use crate::Outcome;
use crate::rig::{Res, Rig, Transport, deposit, kill9, ping_message, wait_until};

/// A random number below `n` (the suite needs no better randomness).
pub(crate) fn random_below(n: u64) -> u64 {
    (Uuid::new_v4().as_u128() % u128::from(n.max(1))) as u64
}

/// Rows the sweeper has marked dispatched so far.
async fn dispatched(outbox: &impl Outbox, deposited: &std::sync::atomic::AtomicU64) -> u64 {
    let outstanding = outbox.outstanding_count().await.unwrap_or(u64::MAX);
    deposited
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(outstanding)
}

/// Case 1: deposit `total` messages while the sweeper's process is killed
/// `kills` times, each time after it has sent a random part of the backlog;
/// then read the topic or queue: every deposited message must be there.
pub(crate) async fn sweeper_kill(transport: Transport, total: u64, kills: u32) -> Res<Outcome> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let rig = Rig::new(transport, "sweep").await?;
    rig.prepare().await?;
    let outbox = rig.outbox().await?;

    // Deposit in a task of its own, up to 500 at a time, so that the sweeper
    // works through a backlog and a kill lands mid-batch; a small total goes
    // in smaller batches, so that depositing lasts long enough (about 2 s)
    // for every kill to come before the end.
    let batch_size = (total / 40).clamp(50, 500);
    let deposited = Arc::new(AtomicU64::new(0));
    let depositing = {
        let (rig, outbox, deposited) = (rig.clone(), outbox.clone(), Arc::clone(&deposited));
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            let mut seq = 0;
            while seq < total {
                let batch: Vec<Message> = (seq..(seq + batch_size).min(total))
                    .map(|i| ping_message(&rig.topic, i))
                    .collect();
                deposit(&outbox, &rig.pool, &rig.schema, &batch).await?;
                ids.extend(batch.iter().map(Message::id));
                seq += batch.len() as u64;
                deposited.store(seq, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Res::Ok(ids)
        })
    };

    let mut sweeper = rig.spawn("sweep")?;
    for kill in 0..kills {
        // Kill once it has sent a random 200-1,000 more messages (mid-batch),
        // fewer when the rest must still leave room for the kills to come:
        // with a small total, a step past the end would never be reached.
        let from = dispatched(&outbox, &deposited).await;
        let room = total.saturating_sub(from) / u64::from(kills - kill + 1);
        let step = (200 + random_below(800)).min(room).max(1);
        let progressed = wait_until(Duration::from_secs(120), || async {
            dispatched(&outbox, &deposited).await >= from + step
        })
        .await;
        if !progressed {
            return Err("the sweeper made no progress for 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(random_below(200))).await;
        kill9(&mut sweeper).await?;
        sweeper = rig.spawn("sweep")?;
    }
    let ids = depositing.await??;
    let drained = wait_until(Duration::from_secs(300), || async {
        outbox.outstanding_count().await.ok() == Some(0)
    })
    .await;
    kill9(&mut sweeper).await?;
    if !drained {
        return Err("the outbox was not drained within 300 s of the last deposit".into());
    }

    let source = match transport {
        Transport::Kafka => rig.topic.clone(),
        Transport::Rabbit => rig.channel.clone(),
    };
    let received = rig.read_all(&source, Duration::from_secs(5)).await?;
    let arrived: HashSet<Uuid> = received.iter().filter_map(|r| r.id).collect();
    let missing = ids.difference(&arrived).count();
    let resent = received.len() - arrived.len();
    rig.drop_schema().await;
    Ok(Outcome::new(
        missing == 0 && ids.len() as u64 == total,
        format!(
            "{} deposited, {} delivered, {missing} missing ({} records: {resent} sent again after a kill), sweeper killed {kills}x",
            ids.len(),
            ids.len() - missing,
            received.len()
        ),
    ))
}

/// Publishes `total` pings to the rig's topic, straight through a producer.
async fn publish(rig: &Rig, total: u64) -> Res<()> {
    let producer: Arc<dyn Producer> = match rig.transport {
        Transport::Kafka => Arc::new(KafkaProducer::new(rig.kafka_config())?),
        Transport::Rabbit => Arc::new(RabbitProducer::new(rig.rabbit())),
    };
    let mut seq = 0;
    while seq < total {
        let batch: Vec<Message> = (seq..(seq + 500).min(total))
            .map(|i| ping_message(&rig.topic, i))
            .collect();
        for result in producer.send_batch(&batch).await {
            result?;
        }
        seq += batch.len() as u64;
    }
    Ok(())
}

/// Case 2: `total` pings consumed by a pump whose handler writes one effect row
/// per message under the Postgres inbox, its process killed `kills` times:
/// exactly `total` effect rows, one per message.
pub(crate) async fn consumer_kill(transport: Transport, total: u64, kills: u32) -> Res<Outcome> {
    let rig = Rig::new(transport, "consume").await?;
    rig.prepare().await?;
    rig.create_effects().await?;
    rig.inbox().await?;
    let publishing = {
        let rig = rig.clone();
        tokio::spawn(async move { publish(&rig, total).await })
    };
    let mut consumer = rig.spawn("consume")?;
    let spacing = total / (u64::from(kills) + 1);
    for kill in 0..u64::from(kills) {
        // Kill around each 1/(kills+1) of the way, a random few hundred either side.
        let at = (spacing * (kill + 1) + random_below(600)).saturating_sub(300);
        let reached = wait_until(Duration::from_secs(180), || async {
            rig.effect_rows().await >= at
        })
        .await;
        if !reached {
            return Err(format!("the consumer did not reach {at} effect rows within 180 s").into());
        }
        kill9(&mut consumer).await?;
        consumer = rig.spawn("consume")?;
    }
    publishing.await??;
    let done = wait_until(Duration::from_secs(300), || async {
        rig.handled().await >= total
    })
    .await;
    // Give a late second handling time to show.
    tokio::time::sleep(Duration::from_secs(5)).await;
    kill9(&mut consumer).await?;
    let (rows, distinct) = rig.effects().await?;
    let inbox: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".inbox", rig.schema))
        .fetch_one(&rig.pool)
        .await?;
    rig.drop_schema().await;
    let skipped = rig.log_lines("consume", "duplicate request skipped");
    Ok(Outcome::new(
        done && rows as u64 == total && distinct as u64 == total,
        format!(
            "{total} published, {rows} effect rows for {distinct} messages, {inbox} inbox rows, \
             {skipped} redeliveries skipped by the inbox, consumer killed {kills}x"
        ),
    ))
}

/// The worker killed in case 1: the sweeper, until killed.
pub(crate) async fn sweep_worker() -> Res<()> {
    let rig = Rig::from_env().await?;
    let outbox = rig.outbox().await?;
    let _sweeper = rig.start_sweeper(outbox, Duration::ZERO).await?;
    futures::future::pending::<()>().await;
    Ok(())
}

/// The worker killed in case 2: the pump, until killed.
pub(crate) async fn consume_worker() -> Res<()> {
    let rig = Rig::from_env().await?;
    let processor = rig.consumer(OnDuplicate::Skip).await?;
    let dispatcher = Dispatcher::builder(processor)
        .subscription(rig.subscription()?.performers(2))
        .build()?;
    dispatcher.start().await?;
    futures::future::pending::<()>().await;
    Ok(())
}

/// Case 3: `total` messages scheduled `ahead` in the outbox; the sweeper's
/// process is killed (`kill -9`) twice and restarted before they are due,
/// then each must arrive once, and none before it was due.
pub(crate) async fn scheduled_kill(
    transport: Transport,
    total: u64,
    ahead: Duration,
) -> Res<Outcome> {
    let rig = Rig::new(transport, "sched").await?;
    rig.prepare().await?;
    let outbox = rig.outbox().await?;
    let source = match transport {
        Transport::Kafka => rig.topic.clone(),
        Transport::Rabbit => rig.channel.clone(),
    };
    let mut ids = HashSet::new();
    let mut seq = 0;
    while seq < total {
        let batch: Vec<Message> = (seq..(seq + 500).min(total))
            .map(|i| {
                let mut message = ping_message(&rig.topic, i);
                message.header.delay = ahead;
                message
            })
            .collect();
        deposit(&outbox, &rig.pool, &rig.schema, &batch).await?;
        ids.extend(batch.iter().map(Message::id));
        seq += batch.len() as u64;
    }
    let deposited = tokio::time::Instant::now();
    let mut sweeper = rig.spawn("sweep")?;
    // Two kills before they are due, each after the sweeper has run a while.
    for at in [ahead / 3, ahead * 2 / 3] {
        tokio::time::sleep_until(deposited + at).await;
        kill9(&mut sweeper).await?;
        sweeper = rig.spawn("sweep")?;
    }
    // Nothing may be out before the due time: the outbox still has them all.
    let early = total.saturating_sub(scheduled(&rig).await?);
    let before_due = deposited.elapsed();
    let drained = wait_until(ahead + Duration::from_secs(120), || async {
        outbox.outstanding_count().await.ok() == Some(0) && scheduled(&rig).await.ok() == Some(0)
    })
    .await;
    kill9(&mut sweeper).await?;
    if !drained {
        return Err("the scheduled messages were not sent within 120 s of their due time".into());
    }
    let received = rig.read_all(&source, Duration::from_secs(5)).await?;
    let arrived: HashSet<Uuid> = received.iter().filter_map(|r| r.id).collect();
    let missing = ids.difference(&arrived).count();
    let twice = received.len() - arrived.len();
    rig.drop_schema().await;
    Ok(Outcome::new(
        missing == 0 && twice == 0 && early == 0,
        format!(
            "{total} scheduled {}s ahead, sweeper killed 2x before due; {early} sent before due (checked at {}s), {} delivered, {missing} missing, {twice} twice",
            ahead.as_secs(),
            before_due.as_secs(),
            arrived.len()
        ),
    ))
}

/// Scheduled rows of the rig's outbox not sent yet.
async fn scheduled(rig: &Rig) -> Res<u64> {
    let count: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.outbox WHERE dispatched IS NULL AND due_at IS NOT NULL",
        rig.schema
    ))
    .fetch_one(&rig.pool)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}
