//! Greetings: a command and an event through the command processor, the outbox
//! and the message pump, all in memory (no services needed).
//!
//! 1. `send` runs the `Greet` handler directly; it publishes a `Greeted` event,
//!    which two event handlers receive.
//! 2. `post` puts a `Greet` command in the outbox and sends it through the
//!    broker (in memory, or RabbitMQ or Kafka with `--transport`) to a dispatcher, whose handler does the same; the
//!    correlation id is printed at each step.
//!
//! With `--outbox postgres` the outbox is a Postgres table (`DATABASE_URL`) and a
//! `PgSweeper` sends from it. With `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g.
//! `http://localhost:4318`, Jaeger from docker-compose) the spans and metrics
//! are exported.
//!
//! Run with: cargo run -p greetings
//!           cargo run -p greetings -- --transport rabbitmq   (RabbitMQ at AMQP_ADDR or 127.0.0.1:5672)
//!           cargo run -p greetings -- --transport kafka      (Kafka at KAFKA_BROKERS or 127.0.0.1:9092)
//!           cargo run -p greetings -- --transport kafka --outbox postgres
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use brighter_core::pipeline::{Pipeline, RequestTracing, Retry, Validate};
use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, Event, Handler, InMemoryOutbox, Outbox,
    Publication, RequestContext, Subscription,
};
use brighter_outbox_postgres::{PgOutbox, PgSweeper};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Asks for someone to be greeted.
#[derive(Debug, Clone, Command, Serialize, Deserialize)]
struct Greet {
    id: Uuid,
    name: String,
}

/// Someone was greeted.
#[derive(Debug, Clone, Event, Serialize, Deserialize)]
struct Greeted {
    id: Uuid,
    greeting: String,
}

/// Where the handler was called from.
fn origin(ctx: &RequestContext) -> String {
    match ctx.message() {
        Some(message) => format!(
            "message {} from topic '{}'",
            message.id(),
            message.header.topic
        ),
        None => "a direct send".to_owned(),
    }
}

struct GreetHandler;
impl Handler<Greet> for GreetHandler {
    async fn handle(&self, cmd: &Greet, ctx: &mut RequestContext) -> Result<(), Error> {
        let greeting = format!("Hello, {}!", cmd.name);
        println!(
            "  [command handler] {greeting}   (correlation {}, via {})",
            ctx.correlation_id(),
            origin(ctx)
        );
        let event = Greeted {
            id: Uuid::now_v7(),
            greeting,
        };
        ctx.publish(&event).await
    }
}

struct Printer(&'static str);
impl Handler<Greeted> for Printer {
    async fn handle(&self, event: &Greeted, ctx: &mut RequestContext) -> Result<(), Error> {
        println!(
            "  [event handler: {}] heard \"{}\"   (correlation {})",
            self.0,
            event.greeting,
            ctx.correlation_id()
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let options = sample_support::options(std::env::args().skip(1), "memory", "memory")?;
    let _telemetry = sample_support::telemetry("greetings")?;
    let transport = sample_support::transport(&options.transport, "greetings")?;

    // The outbox: in memory, or a Postgres table (schema `greetings`) that a
    // sweeper sends from.
    let (outbox, pg_outbox): (Arc<dyn Outbox>, Option<PgOutbox>) = match options.outbox.as_str() {
        "postgres" => {
            let pool = sample_support::postgres().await?;
            let outbox = PgOutbox::builder(pool).schema("greetings").build().await?;
            (Arc::new(outbox.clone()), Some(outbox))
        }
        _ => (Arc::new(InMemoryOutbox::new()), None),
    };
    let processor = CommandProcessor::builder()
        .command_with(
            Pipeline::new()
                .step(RequestTracing)
                .step(Retry::new(3).backoff(Duration::from_millis(50), Duration::from_secs(1)))
                .step(Validate::new(|g: &Greet| {
                    if g.name.trim().is_empty() {
                        Err("name is empty".to_owned())
                    } else {
                        Ok(())
                    }
                })),
            GreetHandler,
        )
        .event(Printer("audit"))
        .event(Printer("welcome mail"))
        .publication::<Greet>(
            Publication::command("greeting.command").source("urn:sample:greetings"),
        )
        .producer(Arc::clone(&transport.producer))
        .outbox(outbox.clone())
        .build()?;

    println!("1. send: the command handler runs at once and publishes an event");
    let direct = Greet {
        id: Uuid::now_v7(),
        name: "Ada".into(),
    };
    println!("  [send] Greet {} (correlation {})", direct.id, direct.id);
    processor.send(&direct).await?;

    println!();
    println!(
        "2. post: command -> {} outbox -> {} -> message pump -> handler -> event",
        options.outbox, transport.name
    );
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Greet>(
            "greetings",
            "greeting.command",
            Arc::clone(&transport.channels),
        ))
        .build()?;
    dispatcher.start().await?;
    // The subscription declares its queue when its channel opens: post after that.
    sample_support::wait_until(
        "the subscription's start",
        Duration::from_secs(10),
        async || {
            dispatcher
                .subscription_health("greetings")
                .is_some_and(|h| h.is_healthy())
        },
    )
    .await?;

    let posted = Greet {
        id: Uuid::now_v7(),
        name: "Grace".into(),
    };
    let id = processor.deposit_post(&posted, None).await?;
    println!(
        "  [outbox] deposited message {id} (correlation {})",
        posted.id
    );
    let sweeper = match pg_outbox {
        // A sweeper sends it, as it would from another process.
        Some(pg) => Some(
            PgSweeper::new(pg, processor.clone())
                .min_age(Duration::ZERO)
                .start()
                .await?,
        ),
        None => {
            processor.clear_outbox(&[id]).await?;
            None
        }
    };
    sample_support::wait_until(
        "dispatch from the outbox",
        Duration::from_secs(10),
        async || {
            outbox
                .get(&[id])
                .await
                .map(|outstanding| outstanding.is_empty())
                .unwrap_or(false)
        },
    )
    .await?;
    println!("  [outbox] sent to topic 'greeting.command' and marked dispatched");

    // Wait until the pump has handled and acked the message.
    sample_support::wait_until(
        "handling the posted greeting",
        Duration::from_secs(10),
        async || {
            dispatcher
                .subscription_health("greetings")
                .is_some_and(|h| h.handled > 0)
        },
    )
    .await?;
    dispatcher.shutdown().await;
    if let Some(sweeper) = sweeper {
        sweeper.stop().await;
    }
    let health = dispatcher.health();
    println!();
    println!(
        "done: subscription '{}' handled {} message(s), dead-lettered {}",
        health[0].name, health[0].handled, health[0].dead_lettered
    );
    Ok(())
}
