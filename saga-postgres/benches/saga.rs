//! Saga benchmark, against a baseline measured in the same run: saga steps
//! per second through the Postgres saga store (load and lock the instance,
//! inbox record, the step posts one event, save the state, commit, send),
//! 8 instances stepped concurrently, vs the same handler without saga state
//! (a `PgUnit` with the same inbox record and the same posted event).
//! Alternating rounds; the ratio is ours / baseline.
//!
//! Needs Postgres at `DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres).
//! Run with: cargo bench -p brighter-saga-postgres --bench saga [-- --quick]
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use async_trait::async_trait;
use brighter_core::pipeline::Pipeline;
use brighter_core::{
    Command, CommandProcessor, Error, Event, Message, Producer, Publication, Request,
    RequestContext, Saga, SagaBuilder, SagaContext, SagaStep,
};
use brighter_inbox_postgres::PgInbox;
use brighter_outbox_postgres::{PgHandler, PgOutbox, PgTx, PgUnit};
use brighter_saga_postgres::PgSagaStore;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const INSTANCES: usize = 8;

#[derive(Clone, Serialize, Deserialize)]
struct Tick {
    id: Uuid,
    key: String,
}
impl Request for Tick {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Tick {}

#[derive(Clone, Serialize, Deserialize)]
struct Ticked {
    id: Uuid,
    key: String,
}
impl Request for Ticked {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for Ticked {}

fn ticked(key: &str) -> Ticked {
    Ticked {
        id: Uuid::now_v7(),
        key: key.to_owned(),
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Count {
    ticks: u64,
}

struct Counter;
impl Saga for Counter {
    type State = Count;
    const NAME: &'static str = "counter";
}
impl SagaStep<Tick> for Counter {
    fn correlate(&self, tick: &Tick, _: &RequestContext) -> String {
        tick.key.clone()
    }
    async fn handle(&self, tick: &Tick, saga: &mut SagaContext<'_, Count>) -> Result<(), Error> {
        saga.state_mut().ticks += 1;
        saga.post(&ticked(&tick.key)).await?;
        Ok(())
    }
}

/// The same work without saga state: the inbox record and the posted event
/// in one unit of work.
struct Plain;
impl PgHandler<Tick> for Plain {
    async fn handle(
        &self,
        tick: &Tick,
        ctx: &mut RequestContext,
        tx: &mut PgTx<'_>,
    ) -> Result<(), Error> {
        tx.deposit_post(ctx, &ticked(&tick.key)).await?;
        Ok(())
    }
}

struct Noop;
#[async_trait]
impl Producer for Noop {
    async fn send(&self, _: &Message) -> Result<(), Error> {
        Ok(())
    }
}

/// Steps per second: `INSTANCES` tasks, each sending `per_instance` ticks to
/// its own instance one after another.
async fn steps(processor: &CommandProcessor, per_instance: usize) -> f64 {
    let round = Uuid::now_v7().simple().to_string();
    let start = Instant::now();
    let tasks: Vec<_> = (0..INSTANCES)
        .map(|i| {
            let processor = processor.clone();
            let key = format!("{round}-{i}");
            tokio::spawn(async move {
                for _ in 0..per_instance {
                    let tick = Tick {
                        id: Uuid::now_v7(),
                        key: key.clone(),
                    };
                    processor.send(&tick).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (INSTANCES * per_instance) as f64 / start.elapsed().as_secs_f64()
}

async fn run(quick: bool) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .unwrap();
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let inbox = PgInbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let store = PgSagaStore::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let publication = || Publication::event("bench.ticked");
    let saga = CommandProcessor::builder()
        .inbox(inbox.clone())
        .outbox(outbox.clone())
        .saga(SagaBuilder::new(Counter, store).starts::<Tick>())
        .publication::<Ticked>(publication())
        .producer(Noop)
        .build()
        .unwrap();
    let plain = CommandProcessor::builder()
        .outbox(outbox.clone())
        .command_with(
            Pipeline::new().step(PgUnit::new(outbox.clone()).inbox(inbox, "plain")),
            Plain,
        )
        .publication::<Ticked>(publication())
        .producer(Noop)
        .build()
        .unwrap();
    let (per_instance, runs) = if quick { (50, 3) } else { (250, 5) };

    steps(&plain, 20).await; // warm up
    steps(&saga, 20).await;
    let (mut ours, mut baseline, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let b = steps(&plain, per_instance).await;
        let o = steps(&saga, per_instance).await;
        ratios.push(o / b);
        baseline.push(b);
        ours.push(o);
    }
    let (o, b, ratio) = (
        benchkit::median(ours),
        benchkit::median(baseline),
        benchkit::median(ratios),
    );
    println!(
        "saga steps, {INSTANCES} instances in parallel, median of {runs} rounds of {} steps:",
        INSTANCES * per_instance
    );
    println!(
        "  saga: {o:>8.0} steps/s   same handler without saga state: {b:>8.0} steps/s   ratio {ratio:.2}"
    );
    benchkit::record_with_ratio(
        "saga step (Postgres store) vs the same handler without saga state",
        o,
        b,
        ratio,
        "steps/s",
        benchkit::Goal::None,
        &format!(
            "{INSTANCES} instances in parallel; each step: inbox record, one posted event, sent after commit; the saga also loads (FOR UPDATE) and saves its state; median of {runs} paired rounds"
        ),
    );
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

fn main() {
    benchkit::main("saga", run);
}
