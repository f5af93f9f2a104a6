//! Greetings: a command and an event through the command processor, the outbox
//! and the message pump, all in memory (no services needed).
//!
//! 1. `send` runs the `Greet` handler directly; it publishes a `Greeted` event,
//!    which two event handlers receive.
//! 2. `post` puts a `Greet` command in the outbox and sends it through the
//!    broker (in memory, or RabbitMQ with `--transport rabbitmq`) to a dispatcher, whose handler does the same; the
//!    correlation id is printed at each step.
//!
//! Run with: cargo run -p greetings
//!           cargo run -p greetings -- --transport rabbitmq   (RabbitMQ at AMQP_ADDR or 127.0.0.1:5672)
//!           cargo run -p greetings -- --transport kafka      (Kafka at KAFKA_BROKERS or 127.0.0.1:9092)
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use brighter_core::pipeline::{Pipeline, RequestTracing, Retry, Validate};
use brighter_core::{
    ChannelFactory, Command, CommandProcessor, Dispatcher, Error, Event, Handler, InMemoryBroker,
    InMemoryOutbox, JsonMapper, Producer, Publication, Request, RequestContext, Subscription,
};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
use brighter_rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Asks for someone to be greeted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Greet {
    id: Uuid,
    name: String,
}
impl Request for Greet {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Greet {}

/// Someone was greeted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Greeted {
    id: Uuid,
    greeting: String,
}
impl Request for Greeted {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for Greeted {}

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
        let processor = ctx.processor().expect("set by the processor").clone();
        let event = Greeted {
            id: Uuid::now_v7(),
            greeting,
        };
        processor.publish_with(&event, &mut ctx.child()).await
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

/// A broker: its name, a producer to it, and channels from it.
type Transport = (&'static str, Arc<dyn Producer>, Arc<dyn ChannelFactory>);

/// The broker the sample runs over, from `--transport`.
fn transport() -> Result<Transport, Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let chosen = match args.as_slice() {
        [] => "memory",
        [flag, value] if flag == "--transport" => value.as_str(),
        _ => {
            return Err(Error::configuration(
                "usage: greetings [--transport memory|rabbitmq]",
            ));
        }
    };
    match chosen {
        "memory" => {
            let broker = InMemoryBroker::new();
            Ok((
                "in-memory broker",
                Arc::new(broker.clone()),
                Arc::new(broker),
            ))
        }
        "rabbitmq" => {
            let config = RabbitConfig::from_env()
                .exchange("greetings")
                .connection_name("greetings-sample");
            println!("RabbitMQ at {}", config.redacted_uri());
            let connection = RabbitConnection::new(config);
            Ok((
                "RabbitMQ",
                Arc::new(RabbitProducer::new(connection.clone())),
                Arc::new(RabbitChannelFactory::new(connection)),
            ))
        }
        "kafka" => {
            let config = KafkaConfig::from_env();
            println!("Kafka at {config:?}");
            let producer = KafkaProducer::new(config.clone())?;
            Ok((
                "Kafka",
                Arc::new(producer.clone()),
                Arc::new(KafkaChannelFactory::new(config, producer)),
            ))
        }
        other => Err(Error::configuration(format!(
            "unknown transport '{other}': use memory, rabbitmq or kafka"
        ))),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let (broker_name, producer, channels) = transport()?;
    let outbox = InMemoryOutbox::new();
    let processor = CommandProcessor::builder()
        .command_with::<Greet, _, _>(
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
        .event::<Greeted>(Printer("audit"))
        .event::<Greeted>(Printer("welcome mail"))
        .mapper::<Greet>(JsonMapper)
        .publication::<Greet>(
            Publication::command("greeting.command").source("urn:sample:greetings"),
        )
        .producer(producer)
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
    println!("2. post: command -> outbox -> {broker_name} -> message pump -> handler -> event");
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Greet>(
            "greetings",
            "greeting.command",
            channels,
        ))
        .build()?;
    dispatcher.start().await?;
    // The subscription declares its queue when its channel opens: post after that.
    wait_until(|| {
        dispatcher
            .subscription_health("greetings")
            .is_some_and(|h| h.is_healthy())
    })
    .await
    .map_err(|()| Error::configuration("the subscription did not start within 10 s"))?;

    let posted = Greet {
        id: Uuid::now_v7(),
        name: "Grace".into(),
    };
    let id = processor.deposit_post(&posted, None).await?;
    println!(
        "  [outbox] deposited message {id} (correlation {})",
        posted.id
    );
    processor.clear_outbox(&[id]).await?;
    let dispatched = outbox
        .entry(id)
        .and_then(|e| e.dispatched)
        .map_or_else(|| "not yet".to_owned(), |at| at.to_rfc3339());
    println!("  [outbox] sent to topic 'greeting.command', marked dispatched at {dispatched}");

    // Wait until the pump has handled and acked the message.
    wait_until(|| {
        dispatcher
            .subscription_health("greetings")
            .is_some_and(|h| h.handled > 0)
    })
    .await
    .map_err(|()| Error::configuration("the posted greeting was not handled within 10 s"))?;
    dispatcher.shutdown().await;
    let health = dispatcher.health();
    println!();
    println!(
        "done: subscription '{}' handled {} message(s), dead-lettered {}",
        health[0].name, health[0].handled, health[0].dead_lettered
    );
    Ok(())
}

async fn wait_until(done: impl Fn() -> bool) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
