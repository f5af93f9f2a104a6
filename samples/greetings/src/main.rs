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
//! `--asyncapi` prints the sample's AsyncAPI document and exits.
//!
//! Run with: cargo run -p greetings
//!           cargo run -p greetings --features rabbitmq -- --transport rabbitmq   (RabbitMQ at AMQP_ADDR or 127.0.0.1:5672)
//!           cargo run -p greetings --features kafka -- --transport kafka         (Kafka at KAFKA_BROKERS or 127.0.0.1:9092)
//!           cargo run -p greetings --features full -- --transport kafka --outbox postgres
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use brighter::pipeline::{Pipeline, RequestTracing, Retry, Validate};
use brighter::uuid::Uuid;
use brighter::{
    ChannelFactory, Command, CommandProcessor, CommandProcessorBuilder, Dispatcher, Error, Event,
    Handler, Publication, RequestContext, Subscription,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Asks for someone to be greeted.
#[derive(Debug, Clone, Command, Serialize, Deserialize, JsonSchema)]
struct Greet {
    id: Uuid,
    name: String,
}

/// Someone was greeted.
#[derive(Debug, Clone, Event, Serialize, Deserialize, JsonSchema)]
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

/// The sample's handlers and publication, on `builder` (which brings the
/// producer and outbox: the chosen broker here, the test kit in the tests).
fn greetings(builder: CommandProcessorBuilder) -> Result<CommandProcessor, Error> {
    builder
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
        .build()
}

/// The subscription of the sample's dispatcher, on `channels`.
fn subscription(channels: Arc<dyn ChannelFactory>) -> Subscription {
    Subscription::command::<Greet>("greetings", "greeting.command", channels)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let options = sample_support::options(std::env::args().skip(1), "memory", "memory")?;
    let _telemetry = sample_support::telemetry("greetings")?;
    let transport = sample_support::transport(&options.transport, "greetings")?;

    // The outbox: in memory, or a Postgres table (schema `greetings`) that a
    // sweeper sends from.
    let chosen = sample_support::outbox(&options.outbox, "greetings").await?;
    let outbox = Arc::clone(&chosen.outbox);
    let processor = greetings(
        CommandProcessor::builder()
            .producer(Arc::clone(&transport.producer))
            .outbox(outbox.clone()),
    )?;
    if options.asyncapi {
        let dispatcher = Dispatcher::builder(processor.clone())
            .subscription(subscription(Arc::clone(&transport.channels)))
            .build()?;
        sample_support::print_asyncapi(
            "greetings",
            "Greets people: a Greet command, handled in process or through the outbox and the message pump",
            &[&processor],
            &[&dispatcher],
        );
        return Ok(());
    }

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
        .subscription(subscription(Arc::clone(&transport.channels)))
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
    // From a table, a sweeper sends it, as it would from another process.
    let sweeper = chosen.start_sweeper(&processor).await?;
    if !chosen.is_swept() {
        processor.clear_outbox(&[id]).await?;
    }
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

#[cfg(test)]
mod tests {
    //! The sample's handlers under the test kit: what they send, publish and
    //! post, and what the pump dead-letters, with no broker.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use brighter::testing::TestKit;

    async fn started(kit: &TestKit) -> (CommandProcessor, Dispatcher) {
        let processor = greetings(kit.processor()).unwrap();
        let dispatcher = Dispatcher::builder(processor.clone())
            .subscription(subscription(kit.channels()))
            .build()
            .unwrap();
        dispatcher.start().await.unwrap();
        kit.until_subscribed(&dispatcher, Duration::from_secs(10))
            .await
            .unwrap();
        (processor, dispatcher)
    }

    #[tokio::test]
    async fn a_posted_greeting_is_handled_once_and_its_event_reaches_both_handlers() {
        let kit = TestKit::new();
        let (processor, dispatcher) = started(&kit).await;
        let greet = Greet {
            id: Uuid::now_v7(),
            name: "Grace".into(),
        };
        processor.post(&greet).await.unwrap();
        kit.until_quiet(Duration::from_secs(10)).await.unwrap();

        let posted = kit.posted_to("greeting.command");
        assert_eq!(posted.len(), 1);
        assert_eq!(posted[0].id(), greet.id);
        assert_eq!(posted[0].body_json::<Greet>().unwrap().name, "Grace");
        let published = kit.published::<Greeted>();
        assert_eq!(published.len(), 1, "one Greeted event: {published:?}");
        assert_eq!(published[0].correlation_id, greet.id);
        let health = dispatcher.subscription_health("greetings").unwrap();
        assert_eq!((health.handled, health.dead_lettered), (1, 0));
        assert!(kit.dead_lettered().is_empty());
        dispatcher.shutdown().await;
    }

    #[tokio::test]
    async fn a_greeting_without_a_name_is_dead_lettered_with_the_reason() {
        let kit = TestKit::new();
        let (processor, dispatcher) = started(&kit).await;
        processor
            .post(&Greet {
                id: Uuid::now_v7(),
                name: " ".into(),
            })
            .await
            .unwrap();
        kit.until_quiet(Duration::from_secs(10)).await.unwrap();

        let dead = kit.dead_lettered();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].0, "greetings");
        assert!(
            dead[0].1.reason.contains("name is empty"),
            "{}",
            dead[0].1.reason
        );
        assert!(kit.published::<Greeted>().is_empty());
        dispatcher.shutdown().await;
    }

    #[tokio::test]
    async fn send_runs_the_handler_in_process_and_posts_nothing() {
        let kit = TestKit::new();
        let processor = greetings(kit.processor()).unwrap();
        let greet = Greet {
            id: Uuid::now_v7(),
            name: "Ada".into(),
        };
        processor.send(&greet).await.unwrap();
        kit.until_quiet(Duration::from_secs(10)).await.unwrap();

        assert_eq!(kit.sent::<Greet>().len(), 1);
        assert_eq!(kit.published::<Greeted>().len(), 1);
        assert!(kit.posted().is_empty());
    }
}
