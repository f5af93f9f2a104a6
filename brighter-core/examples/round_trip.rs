//! The smallest complete round trip, in memory: a command handler that
//! publishes an event, an event handler, and a post through the outbox and
//! the broker to a dispatcher.
//!
//! Run with: cargo run -p brighter-core --example round_trip
#![allow(clippy::print_stdout)]

use std::time::Duration;

use brighter_core::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Command, Serialize, Deserialize)]
struct Greet {
    id: Uuid,
    name: String,
}

#[derive(Event, Serialize, Deserialize)]
struct Greeted {
    id: Uuid,
    greeting: String,
}

struct GreetHandler;
impl Handler<Greet> for GreetHandler {
    async fn handle(&self, greet: &Greet, ctx: &mut RequestContext) -> Result<(), Error> {
        let greeting = format!("hello, {}", greet.name);
        ctx.publish(&Greeted {
            id: Uuid::now_v7(),
            greeting,
        })
        .await
    }
}

struct Printer;
impl Handler<Greeted> for Printer {
    async fn handle(&self, event: &Greeted, _: &mut RequestContext) -> Result<(), Error> {
        println!("{}", event.greeting);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let broker = InMemoryBroker::new();
    let processor = CommandProcessor::builder()
        .command(GreetHandler)
        .event(Printer)
        .publication::<Greet>(Publication::command("greetings"))
        .producer(broker.clone())
        .build()?;
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Greet>("greet", "greetings", broker))
        .build()?;
    dispatcher.start().await?;
    processor
        .send(&Greet {
            id: Uuid::now_v7(),
            name: "Ada".into(),
        })
        .await?; // in process
    processor
        .post(&Greet {
            id: Uuid::now_v7(),
            name: "Grace".into(),
        })
        .await?; // outbox, broker, pump
    tokio::time::sleep(Duration::from_millis(300)).await;
    dispatcher.shutdown().await;
    Ok(())
}
