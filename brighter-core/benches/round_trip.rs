//! In-memory deposit -> handled throughput: commands deposited in the outbox,
//! cleared to the in-memory broker and handled by a one-performer dispatcher, vs a
//! baseline measured in the same run: the same JSON serialized, sent through a
//! bounded tokio mpsc channel to one consumer task and deserialized.
//!
//! Run with: cargo bench -p brighter-core --bench round_trip
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, Handler, InMemoryBroker, Message, MessageHeader,
    MessageType, Publication, Request, RequestContext, Subscription,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const N: usize = 20_000;
const CHUNK: usize = 100;
const RUNS: usize = 3;

#[derive(Clone, Serialize, Deserialize)]
struct Ping {
    id: Uuid,
    seq: usize,
    text: String,
}
impl Request for Ping {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Ping {}

struct Count(Arc<AtomicUsize>);
impl Handler<Ping> for Count {
    async fn handle(&self, _: &Ping, _: &mut RequestContext) -> Result<(), Error> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn pings() -> Vec<Ping> {
    (0..N)
        .map(|seq| Ping {
            id: Uuid::now_v7(),
            seq,
            text: "hello, world".into(),
        })
        .collect()
}

async fn ours() -> f64 {
    let broker = InMemoryBroker::new();
    broker.declare("pings", "pings").unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .command(Count(Arc::clone(&handled)))
        .publication::<Ping>(Publication::command("pings"))
        .producer(broker.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Ping>("pings", "pings", broker)
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let pings = pings();
    let start = Instant::now();
    for chunk in pings.chunks(CHUNK) {
        let ids = processor.deposit_post_batch(chunk, None).await.unwrap();
        processor.clear_outbox(&ids).await.unwrap();
    }
    while handled.load(Ordering::Relaxed) < N {
        tokio::task::yield_now().await;
    }
    let elapsed = start.elapsed();
    dispatcher.shutdown().await;
    N as f64 / elapsed.as_secs_f64()
}

async fn baseline() -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(10);
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let consumer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            let ping: Ping = serde_json::from_slice(&message.body).unwrap();
            std::hint::black_box(ping);
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let pings = pings();
    let start = Instant::now();
    for ping in &pings {
        let header = MessageHeader::new("pings", MessageType::Command);
        let message = Message::new(header, serde_json::to_vec(ping).unwrap());
        tx.send(message).await.unwrap();
    }
    drop(tx);
    consumer.await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(handled.load(Ordering::Relaxed), N);
    N as f64 / elapsed.as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("round_trip: bench");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        b.push(rt.block_on(baseline()));
        o.push(rt.block_on(ours()));
    }
    let (o, b) = (benchkit::median(o), benchkit::median(b));
    println!("in-memory deposit -> handled, {N} messages, median of {RUNS} runs:");
    println!("  ours (outbox + broker + pump): {o:>10.0} msg/s");
    println!("  baseline (JSON over tokio mpsc): {b:>8.0} msg/s");
    println!("  ratio ours/baseline: {:.2}", o / b);
}
