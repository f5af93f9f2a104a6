//! `brighter asyncapi`: a service's document from a file and from the URL a
//! service serves it at (the shop serves `/asyncapi.json`), summarized as
//! servers and operations, or printed whole with `--json`.

#![allow(clippy::unwrap_used)]

mod common;

use brighter::kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
use brighter::uuid::Uuid;
use brighter::{
    AsyncApi, Command, CommandProcessor, Dispatcher, Error, Handler, Publication, RequestContext,
    Subscription,
};
use common::brighter;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Command, Serialize, Deserialize)]
struct Reserve {
    id: Uuid,
}

struct Reserving;
impl Handler<Reserve> for Reserving {
    async fn handle(&self, _: &Reserve, _: &mut RequestContext) -> Result<(), Error> {
        Ok(())
    }
}

fn document() -> serde_json::Value {
    let config = KafkaConfig::new("kafka-1:9092");
    let producer = KafkaProducer::new(config.clone()).unwrap();
    let processor = CommandProcessor::builder()
        .command(Reserving)
        .publication::<Reserve>(Publication::command("stock.reserve"))
        .producer(producer.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Reserve>(
            "reserving",
            "stock.reserve",
            KafkaChannelFactory::new(config, producer),
        ))
        .build()
        .unwrap();
    AsyncApi::new("stock", "2.0.0")
        .processor(&processor)
        .dispatcher(&dispatcher)
        .document()
}

#[tokio::test]
async fn a_document_from_a_file_or_a_url_is_summarized() {
    let document = document();
    let file = std::env::temp_dir().join(format!("asyncapi-{}.json", Uuid::now_v7()));
    std::fs::write(&file, document.to_string()).unwrap();
    let path = file.to_string_lossy().into_owned();
    let summary = brighter(&["asyncapi", &path], &[]).await;
    assert!(summary.ok, "{}", summary.stderr);
    assert!(
        summary
            .stdout
            .contains("stock 2.0.0 (AsyncAPI 3.0.0): 1 server(s), 1 channel(s), 2 operation(s)"),
        "{}",
        summary.stdout
    );
    assert!(summary.stdout.contains("| kafka"), "{}", summary.stdout);
    assert!(
        summary.stdout.contains("| send    | Reserve"),
        "{}",
        summary.stdout
    );
    assert!(
        summary.stdout.contains("| receive | Reserve"),
        "{}",
        summary.stdout
    );
    let whole = brighter(&["--json", "asyncapi", &path], &[]).await.json();
    assert_eq!(whole, document);

    // Served over HTTP, as the shop serves /asyncapi.json.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/asyncapi.json", listener.local_addr().unwrap());
    let body = document.to_string();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 4096];
        let _ = socket.read(&mut request).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(body.as_bytes()).await.unwrap();
    });
    let fetched = brighter(&["--json", "asyncapi", &url], &[]).await.json();
    assert_eq!(fetched, document);

    std::fs::write(&file, "{\"openapi\": \"3.1.0\"}").unwrap();
    let wrong = brighter(&["asyncapi", &path], &[]).await;
    assert!(
        !wrong.ok && wrong.stderr.contains("not an AsyncAPI 3 document"),
        "{}",
        wrong.stderr
    );
    let _ = std::fs::remove_file(&file);
}
