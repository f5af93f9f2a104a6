//! Case 4: `kill -9` the process that runs a saga, again and again, while
//! sagas go through three steps each. Each step writes its effect row in
//! the step's transaction (with the saga's state, its inbox record and the
//! message that starts the next step) and the first one schedules a timeout
//! to the saga, due after every saga should have finished. Then: every saga
//! completed, each step's effect recorded once, and every timeout came and
//! was ignored, none fired.

use std::time::Duration;

use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, Message, MessageHeader, MessageType, Publication,
    Request, RequestContext, Saga, SagaBuilder, SagaContext, SagaStep, Subscription,
};
use brighter_outbox_postgres::pg_transaction;
use brighter_saga_postgres::PgSagaStore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Outcome;
use crate::kill::random_below;
use crate::rig::{Res, Rig, deposit, kill9, wait_until};

/// Starts the saga `key`: its first step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Begin {
    id: Uuid,
    key: String,
}

/// Step 2 or 3 of saga `key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Advance {
    id: Uuid,
    key: String,
    step: i32,
}

/// The timeout saga `key` set itself in its first step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Expire {
    id: Uuid,
    key: String,
}

macro_rules! command {
    ($($name:ident),*) => {$(
        impl Request for $name {
            fn id(&self) -> Uuid {
                self.id
            }
        }
        impl Command for $name {}
    )*};
}
command!(Begin, Advance, Expire);

/// The step the timeout's effect row is written as.
const TIMED_OUT: i32 = 0;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Steps {
    done: i32,
}

/// Three steps, each writing its effect row in its transaction.
struct ThreeSteps {
    effect: String,
    timeout: Duration,
}

impl ThreeSteps {
    async fn effect(&self, ctx: &mut RequestContext, key: &str, step: i32) -> Result<(), Error> {
        sqlx::query(&self.effect)
            .bind(key)
            .bind(step)
            .execute(pg_transaction(ctx)?)
            .await
            .map_err(|e| Error::store("write the effect row", e))?;
        Ok(())
    }
}

impl Saga for ThreeSteps {
    type State = Steps;
    const NAME: &'static str = "three-steps";
}

impl SagaStep<Begin> for ThreeSteps {
    fn correlate(&self, begin: &Begin, _: &RequestContext) -> String {
        begin.key.clone()
    }

    async fn handle(&self, begin: &Begin, saga: &mut SagaContext<'_, Steps>) -> Result<(), Error> {
        self.effect(saga.context(), &begin.key, 1).await?;
        saga.post(&Advance {
            id: Uuid::now_v7(),
            key: begin.key.clone(),
            step: 2,
        })
        .await?;
        saga.schedule(
            &Expire {
                id: Uuid::now_v7(),
                key: begin.key.clone(),
            },
            self.timeout,
        )
        .await?;
        saga.state_mut().done = 1;
        Ok(())
    }
}

impl SagaStep<Advance> for ThreeSteps {
    fn correlate(&self, advance: &Advance, _: &RequestContext) -> String {
        advance.key.clone()
    }

    async fn handle(
        &self,
        advance: &Advance,
        saga: &mut SagaContext<'_, Steps>,
    ) -> Result<(), Error> {
        if advance.step != saga.state().done + 1 {
            return Err(Error::reject(format!(
                "step {} of saga {} came after step {}",
                advance.step,
                advance.key,
                saga.state().done
            )));
        }
        self.effect(saga.context(), &advance.key, advance.step)
            .await?;
        saga.state_mut().done = advance.step;
        if advance.step == 3 {
            saga.complete();
        } else {
            saga.post(&Advance {
                id: Uuid::now_v7(),
                key: advance.key.clone(),
                step: advance.step + 1,
            })
            .await?;
        }
        Ok(())
    }
}

impl SagaStep<Expire> for ThreeSteps {
    fn correlate(&self, expire: &Expire, _: &RequestContext) -> String {
        expire.key.clone()
    }

    async fn handle(
        &self,
        expire: &Expire,
        saga: &mut SagaContext<'_, Steps>,
    ) -> Result<(), Error> {
        self.effect(saga.context(), &expire.key, TIMED_OUT).await?;
        saga.fail("timed out");
        Ok(())
    }
}

/// The case's topics, each consumed through a channel of its own.
struct Topics {
    begin: String,
    advance: String,
    expire: String,
}

impl Topics {
    fn of(rig: &Rig) -> Topics {
        Topics {
            begin: format!("{}.begin", rig.topic),
            advance: format!("{}.advance", rig.topic),
            expire: format!("{}.expire", rig.topic),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.begin, &self.advance, &self.expire]
    }
}

fn channel(topic: &str) -> String {
    format!("{topic}.q")
}

/// The environment variable that tells the worker the timeout.
const TIMEOUT_VAR: &str = "CHAOS_SAGA_TIMEOUT_MS";

/// The worker killed in case 4: the saga's pump and the outbox sweeper.
pub(crate) async fn saga_worker() -> Res<()> {
    let rig = Rig::from_env().await?;
    let timeout = Duration::from_millis(
        std::env::var(TIMEOUT_VAR)
            .map_err(|_| format!("{TIMEOUT_VAR} is not set"))?
            .parse()?,
    );
    let topics = Topics::of(&rig);
    let outbox = rig.outbox().await?;
    let store = PgSagaStore::builder(rig.pool.clone())
        .schema(&rig.schema)
        .build()
        .await?;
    let saga = SagaBuilder::new(
        ThreeSteps {
            effect: format!(
                "INSERT INTO \"{}\".saga_effects (key, step) VALUES ($1, $2)",
                rig.schema
            ),
            timeout,
        },
        store,
    )
    .starts::<Begin>()
    .handles::<Advance>()
    .handles::<Expire>();
    let builder = CommandProcessor::builder()
        .saga(saga)
        .inbox(rig.inbox().await?)
        .outbox(outbox.clone())
        .publication::<Advance>(Publication::command(&topics.advance))
        .publication::<Expire>(Publication::command(&topics.expire));
    let processor = rig.with_producer(builder)?.build()?;
    let factory = rig.factory()?;
    let dispatcher = Dispatcher::builder(processor)
        .subscription(
            Subscription::command::<Begin>("begin", &topics.begin, factory.clone())
                .channel(channel(&topics.begin))
                .performers(2)
                .buffer_size(100),
        )
        .subscription(
            Subscription::command::<Advance>("advance", &topics.advance, factory.clone())
                .channel(channel(&topics.advance))
                .performers(2)
                .buffer_size(100),
        )
        .subscription(
            Subscription::command::<Expire>("expire", &topics.expire, factory)
                .channel(channel(&topics.expire))
                .performers(2)
                .buffer_size(100),
        )
        .build()?;
    dispatcher.start().await?;
    // The sweeper sends what a killed worker deposited and did not send, and
    // the timeouts when due; the saga sends its own messages after commit.
    let _sweeper = rig.start_sweeper(outbox, Duration::from_secs(1)).await?;
    futures::future::pending::<()>().await;
    Ok(())
}

/// A `Begin` for saga `key`, as the outbox stores it.
fn begin_message(topic: &str, key: String) -> Message {
    let begin = Begin {
        id: Uuid::now_v7(),
        key,
    };
    let mut header = MessageHeader::new(topic, MessageType::Command);
    header.id = begin.id;
    Message::new(header, serde_json::to_vec(&begin).unwrap_or_default())
}

/// One count of the case's tables.
async fn count(rig: &Rig, sql: &str) -> i64 {
    sqlx::query_scalar(&sql.replace("{s}", &format!("\"{}\"", rig.schema)))
        .fetch_one(&rig.pool)
        .await
        .unwrap_or(-1)
}

/// Case 4: `total` sagas of three steps, the worker running them killed
/// `kills` times; each saga's timeout due `timeout` after its first step.
pub(crate) async fn saga_kill(
    transport: crate::rig::Transport,
    total: u64,
    kills: u32,
    timeout: Duration,
) -> Res<Outcome> {
    let rig = Rig::new(transport, "saga").await?;
    let topics = Topics::of(&rig);
    for topic in topics.all() {
        rig.prepare_channel(topic, &channel(topic)).await?;
    }
    sqlx::query(&format!(
        "CREATE TABLE \"{}\".saga_effects (key text NOT NULL, step int NOT NULL, at timestamptz NOT NULL DEFAULT now())",
        rig.schema
    ))
    .execute(&rig.pool)
    .await?;
    // Every table, made once here rather than by workers racing at start.
    let outbox = rig.outbox().await?;
    rig.inbox().await?;
    PgSagaStore::builder(rig.pool.clone())
        .schema(&rig.schema)
        .build()
        .await?;

    let started = tokio::time::Instant::now();
    let timeout_ms = timeout.as_millis().to_string();
    let env = [(TIMEOUT_VAR, timeout_ms.as_str())];
    let mut worker = rig.spawn_with("saga", &env)?;
    let mut seq = 0;
    while seq < total {
        let batch: Vec<Message> = (seq..(seq + 500).min(total))
            .map(|i| begin_message(&topics.begin, format!("saga-{i}")))
            .collect();
        deposit(&outbox, &rig.pool, &rig.schema, &batch).await?;
        seq += batch.len() as u64;
    }
    let finished = "SELECT count(*) FROM {s}.saga_effects WHERE step = 3";
    for kill in 0..u64::from(kills) {
        // Kill around each 1/(kills+1) of the last steps, a little either side.
        let spread = (total / 20).max(1);
        let at = (total * (kill + 1) / (u64::from(kills) + 1) + random_below(spread))
            .saturating_sub(spread / 2);
        let reached = wait_until(Duration::from_secs(180), || async {
            count(&rig, finished).await >= at as i64
        })
        .await;
        if !reached {
            return Err(format!("the sagas did not reach {at} finished within 180 s").into());
        }
        kill9(&mut worker).await?;
        worker = rig.spawn_with("saga", &env)?;
    }
    let completed = "SELECT count(*) FROM {s}.sagas WHERE status = 'completed'";
    let done = wait_until(Duration::from_secs(300), || async {
        count(&rig, completed).await >= total as i64
    })
    .await;
    let all_done = started.elapsed();
    // Every saga's timeout comes after it finished: recorded by the inbox
    // (as handled, and ignored), one per saga.
    let inbox = "SELECT count(*) FROM {s}.inbox";
    let expected_inbox = 4 * total as i64;
    let timeouts_came = done
        && wait_until(timeout + Duration::from_secs(120), || async {
            count(&rig, inbox).await >= expected_inbox
        })
        .await;
    // A late second handling would show by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill9(&mut worker).await?;

    let rows = count(&rig, "SELECT count(*) FROM {s}.saga_effects WHERE step > 0").await;
    let distinct = count(
        &rig,
        "SELECT count(*) FROM (SELECT DISTINCT key, step FROM {s}.saga_effects WHERE step > 0) d",
    )
    .await;
    let fired = count(&rig, "SELECT count(*) FROM {s}.saga_effects WHERE step = 0").await;
    let completed = count(&rig, completed).await;
    let versions = count(
        &rig,
        "SELECT count(*) FROM {s}.sagas WHERE status = 'completed' AND version = 3",
    )
    .await;
    // The case tests something only if every saga finished before its own
    // timeout was due.
    let late = count(
        &rig,
        &format!(
            "SELECT count(*) FROM (SELECT key, max(at) - min(at) AS took FROM {{s}}.saga_effects \
             WHERE step > 0 GROUP BY key) t WHERE took >= interval '{} milliseconds'",
            timeout.as_millis()
        ),
    )
    .await;
    let inbox_rows = count(&rig, inbox).await;
    let skipped = rig.log_lines("saga", "duplicate message skipped");
    rig.drop_schema().await;
    let steps = 3 * total as i64;
    Ok(Outcome::new(
        done && timeouts_came
            && late == 0
            && completed == total as i64
            && versions == total as i64
            && rows == steps
            && distinct == steps
            && fired == 0,
        format!(
            "{total} sagas x 3 steps, worker killed {kills}x, timeouts {}s ahead: {completed} completed \
             (all in {}s; {late} after their timeout was due), \
             {rows} effect rows for {distinct} of {steps} steps, {inbox_rows} of {expected_inbox} \
             messages recorded, timeouts fired for a finished saga: {fired}, \
             {skipped} redeliveries skipped by the inbox",
            timeout.as_secs(),
            all_done.as_secs()
        ),
    ))
}
