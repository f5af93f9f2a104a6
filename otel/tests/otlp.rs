//! `init` exports over OTLP/HTTP to the endpoint in `OTEL_EXPORTER_OTLP_ENDPOINT`:
//! a stand-in collector on a local port receives the processor's spans and
//! metrics, with the service name.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Requests received: (path, body).
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal HTTP/1.1 server that answers 200 to every request.
async fn collector(listener: TcpListener, received: Received) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let n = socket.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
                let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buffer.len() < end + 4 + length {
                    continue;
                }
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let body = buffer[end + 4..end + 4 + length].to_vec();
                buffer.drain(..end + 4 + length);
                received.lock().unwrap().push((path, body));
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn init_exports_spans_and_metrics_to_the_otlp_endpoint() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    // SAFETY: no other thread reads the environment yet (the runtime's workers
    // run nothing until the collector is spawned below).
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var(
            brighter_otel::ENDPOINT_VAR,
            format!("http://127.0.0.1:{port}"),
        );
    }
    let received = Received::default();
    runtime.spawn(collector(listener, Arc::clone(&received)));

    let guard = brighter_otel::init("otlp-test-service").unwrap();
    assert!(guard.exporting());
    common::send_and_post(&runtime);
    guard.flush();
    drop(guard);

    let received = received.lock().unwrap();
    let traces: Vec<_> = received.iter().filter(|(p, _)| p == "/v1/traces").collect();
    let metrics: Vec<_> = received
        .iter()
        .filter(|(p, _)| p == "/v1/metrics")
        .collect();
    assert!(
        !traces.is_empty(),
        "no traces exported; got {:?}",
        received.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    assert!(!metrics.is_empty(), "no metrics exported");
    assert!(traces.iter().any(|(_, body)| contains(body, "send Greet")));
    assert!(
        traces
            .iter()
            .any(|(_, body)| contains(body, "greetings publish"))
    );
    assert!(
        traces
            .iter()
            .any(|(_, body)| contains(body, "otlp-test-service"))
    );
    assert!(
        metrics
            .iter()
            .any(|(_, body)| contains(body, "messaging.client.sent.messages"))
    );
}
