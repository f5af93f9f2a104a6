//! Request-reply: a client asks a pricing service for a quote with `call` and
//! waits for the reply (matched by correlation id on a private reply channel);
//! then it calls a service that never answers and gets a timeout error.
//!
//! `--asyncapi` prints the sample's AsyncAPI document and exits.
//!
//! Run with: cargo run -p request-reply
//!           cargo run -p request-reply --features rabbitmq -- --transport rabbitmq
//!           cargo run -p request-reply --features kafka -- --transport kafka
#![allow(clippy::print_stdout)]

use std::time::Duration;

use brighter::uuid::Uuid;
use brighter::{
    ChannelSpec, Command, CommandProcessor, Dispatcher, Error, ErrorKind, Handler, Publication,
    RequestContext, Subscription,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Asks for the price of `quantity` of `sku`.
#[derive(Debug, Clone, Command, Serialize, Deserialize, JsonSchema)]
struct QuoteRequest {
    id: Uuid,
    sku: String,
    quantity: u32,
}

/// The reply: a price in cents.
#[derive(Debug, Clone, Command, Serialize, Deserialize, JsonSchema)]
struct Quote {
    id: Uuid,
    sku: String,
    cents: u64,
}

/// Asks a service that is not running.
#[derive(Debug, Clone, Command, Serialize, Deserialize, JsonSchema)]
struct StockCheck {
    id: Uuid,
    sku: String,
}

/// The pricing service: replies to each quote request.
struct Pricing;
impl Handler<QuoteRequest> for Pricing {
    async fn handle(&self, request: &QuoteRequest, ctx: &mut RequestContext) -> Result<(), Error> {
        let cents = 250 * u64::from(request.quantity);
        println!(
            "  [pricing] {} x {} costs {cents} cents   (correlation {})",
            request.quantity,
            request.sku,
            ctx.correlation_id()
        );
        ctx.reply(&Quote {
            id: Uuid::now_v7(),
            sku: request.sku.clone(),
            cents,
        })
        .await
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let options = sample_support::options(std::env::args().skip(1), "memory", "memory")?;
    let _telemetry = sample_support::telemetry("request-reply")?;
    let transport = sample_support::transport(&options.transport, "request-reply")?;
    let suffix = Uuid::now_v7().simple().to_string();
    let (quotes, stock) = (format!("quotes.{suffix}"), format!("stock.{suffix}"));

    // One processor plays both sides here; in a real system they are two services.
    let processor = CommandProcessor::builder()
        .command(Pricing)
        .publication::<QuoteRequest>(Publication::command(&quotes).replies_with::<Quote>())
        .publication::<StockCheck>(Publication::command(&stock).replies_with::<Quote>())
        .producer(transport.producer.clone())
        .reply_channels(transport.channels.clone())
        .build()?;
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<QuoteRequest>(
            format!("pricing.{suffix}"),
            &quotes,
            transport.channels.clone(),
        ))
        .build()?;
    if options.asyncapi {
        sample_support::print_asyncapi(
            "request-reply",
            "A client calls a pricing service (request-reply over a private reply channel) and a stock service that never answers",
            &[&processor],
            &[&dispatcher],
        );
        return Ok(());
    }
    dispatcher.start().await?;
    sample_support::wait_until(
        "the pricing subscription's start",
        Duration::from_secs(30),
        async || dispatcher.health().iter().all(|h| h.is_healthy()),
    )
    .await?;
    // The stock service's queue or topic exists, but nobody consumes it.
    let mut unanswered = transport
        .channels
        .create_channel(&ChannelSpec::new(
            format!("stock.{suffix}"),
            &stock,
            format!("stock.{suffix}"),
        ))
        .await?;
    unanswered.close().await?;

    println!(
        "1. call: a quote request over {}, waiting up to 10 s for the reply",
        transport.name
    );
    let request = QuoteRequest {
        id: Uuid::now_v7(),
        sku: "tea".into(),
        quantity: 4,
    };
    let quote: Quote = processor.call(&request, Duration::from_secs(10)).await?;
    println!(
        "  [client] got a quote: {} cents for {}",
        quote.cents, quote.sku
    );
    if quote.cents != 1000 {
        return Err(Error::configuration(format!(
            "wrong price: {} cents",
            quote.cents
        )));
    }

    println!();
    println!("2. call: a stock check that nobody answers, waiting up to 1 s");
    let check = StockCheck {
        id: Uuid::now_v7(),
        sku: "tea".into(),
    };
    match processor
        .call::<StockCheck, Quote>(&check, Duration::from_secs(1))
        .await
    {
        Err(error) if error.kind() == ErrorKind::CallTimeout => {
            println!("  [client] no reply: {error}");
        }
        Err(error) => return Err(error),
        Ok(_) => return Err(Error::configuration("a reply came from nowhere")),
    }
    dispatcher.shutdown().await;
    println!();
    println!("done: one reply received, one call timed out");
    Ok(())
}
