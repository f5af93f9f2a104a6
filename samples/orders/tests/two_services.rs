//! The orders saga as two processes, two services, over RabbitMQ and
//! Postgres (`AMQP_ADDR`, `DATABASE_URL`): `orders --service payments` and
//! `orders --service orders`, each exporting OTLP/HTTP to a stand-in
//! collector in this test. Each order is one trace spanning both
//! `service.name`s, the consumer's `process` span a child of the producer's
//! `publish` span in the other service.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

/// A span as the collector got it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    kind: SpanKind,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

/// A stand-in OTLP/HTTP collector: decodes each `/v1/traces` request
/// (protobuf) and answers 200 to everything.
async fn collector(listener: TcpListener, spans: Spans) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let spans = Arc::clone(&spans);
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 16384];
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
                if path == "/v1/traces" {
                    record(&body, &spans);
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
    }
}

fn record(body: &[u8], spans: &Spans) {
    let request = ExportTraceServiceRequest::decode(body).unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(name) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.lock().unwrap().push(Span {
                    service: service.clone(),
                    kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                    name: span.name,
                    trace: span.trace_id,
                    id: span.span_id,
                    parent: span.parent_span_id,
                });
            }
        }
    }
}

fn orders(service: &str, run: &str, endpoint: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orders"));
    command
        .args([
            "--service",
            service,
            "--run",
            run,
            "--transport",
            "rabbitmq",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

/// The trace as an indented tree: name [kind] (service).
fn tree(spans: &[&Span]) -> String {
    fn walk(out: &mut String, spans: &[&Span], parent: &[u8], depth: usize) {
        for span in spans.iter().filter(|s| s.parent == parent) {
            out.push_str(&format!(
                "{}{} [{}] ({})\n",
                "  ".repeat(depth),
                span.name,
                span.kind.as_str_name(),
                span.service
            ));
            walk(out, spans, &span.id, depth + 1);
        }
    }
    let ids: HashSet<&[u8]> = spans.iter().map(|s| s.id.as_slice()).collect();
    let mut out = String::new();
    for root in spans.iter().filter(|s| !ids.contains(s.parent.as_slice())) {
        out.push_str(&format!(
            "{} [{}] ({})\n",
            root.name,
            root.kind.as_str_name(),
            root.service
        ));
        walk(&mut out, spans, &root.id, 1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_in_two_processes_make_one_trace_per_order_across_both() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let spans = Spans::default();
    tokio::spawn(collector(listener, Arc::clone(&spans)));
    let run = format!(
        "t{}",
        &brighter::uuid::Uuid::now_v7().simple().to_string()[20..]
    );

    let mut payments = orders("payments", &run, &endpoint).spawn().unwrap();
    let mut lines = BufReader::new(payments.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ready.starts_with("payments service running"), "{ready}");

    let output = tokio::time::timeout(
        Duration::from_secs(120),
        orders("orders", &run, &endpoint).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("done: tea paid and shipped; piano payment failed"),
        "{text}"
    );

    let pid = payments.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(60), payments.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "payments exited {status:?}");

    // Both processes flushed their spans on the way out.
    let spans = spans.lock().unwrap().clone();
    let mut traces: HashMap<&[u8], Vec<&Span>> = HashMap::new();
    for span in &spans {
        traces.entry(span.trace.as_slice()).or_default().push(span);
    }
    let orders_traces: Vec<&Vec<&Span>> = traces
        .values()
        .filter(|t| t.iter().any(|s| s.name == "send PlaceOrder"))
        .collect();
    assert_eq!(orders_traces.len(), 2, "one trace per order: {spans:#?}");
    let take = format!("payments.take.{run}");
    for trace in &orders_traces {
        let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(
            services,
            HashSet::from(["orders", "payments"]),
            "{}",
            tree(trace)
        );
        let root = trace.iter().find(|s| s.name == "send PlaceOrder").unwrap();
        assert!(root.parent.is_empty(), "{}", tree(trace));
        assert_eq!(root.service, "orders");
        // orders' publish of TakePayment is the parent of payments' process.
        let by_id = |id: &[u8]| trace.iter().find(|s| s.id == id);
        let process = trace
            .iter()
            .find(|s| s.name == format!("{take} process"))
            .unwrap_or_else(|| panic!("no process span for {take}: {}", tree(trace)));
        assert_eq!(
            (process.service.as_str(), process.kind),
            ("payments", SpanKind::Consumer)
        );
        let publish = by_id(&process.parent).unwrap();
        assert_eq!(publish.name, format!("{take} publish"), "{}", tree(trace));
        assert_eq!(
            (publish.service.as_str(), publish.kind),
            ("orders", SpanKind::Producer)
        );
        // And back: payments' reply is processed by orders, under payments'
        // publish.
        let back = trace
            .iter()
            .find(|s| s.service == "orders" && s.kind == SpanKind::Consumer)
            .unwrap_or_else(|| panic!("no reply processed by orders: {}", tree(trace)));
        let reply = by_id(&back.parent).unwrap();
        assert_eq!(
            (reply.service.as_str(), reply.kind),
            ("payments", SpanKind::Producer)
        );
    }
    let tea = orders_traces
        .iter()
        .find(|t| t.iter().any(|s| s.name.contains("payment-taken")))
        .unwrap();
    println!("the tea order's trace:\n{}", tree(tea));
}
