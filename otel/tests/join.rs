//! `tracing_layer` joins an application's `tracing` spans and brighter's
//! OpenTelemetry spans into one trace: a `tracing` span around a `post` (an
//! HTTP framework's request span, say) is the root, brighter's publish and
//! process spans are under it, a `tracing` span inside the handler is under
//! the process span, and each operation is one span (brighter's own `tracing`
//! spans are not exported a second time).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use brighter_core::{
    CommandProcessor, Dispatcher, Error, Event, Handler, InMemoryBroker, Publication, Request,
    RequestContext, Subscription, Telemetry,
};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(serde::Serialize, serde::Deserialize)]
struct Charged {
    id: uuid::Uuid,
}
impl Request for Charged {
    fn id(&self) -> uuid::Uuid {
        self.id
    }
}
impl Event for Charged {}

struct Ledger;
impl Handler<Charged> for Ledger {
    async fn handle(&self, _: &Charged, _: &mut RequestContext) -> Result<(), Error> {
        // The user's own span inside the handler.
        async { tokio::time::sleep(Duration::from_millis(1)).await }
            .instrument(tracing::info_span!("write ledger"))
            .await;
        Ok(())
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Whether a span named `ancestor` is among `span`'s parents, grandparents ...
fn is_under(spans: &[SpanData], span: &SpanData, ancestor: &str) -> bool {
    let by_id = |id: SpanId| spans.iter().find(|s| s.span_context.span_id() == id);
    let mut parent = by_id(span.parent_span_id);
    while let Some(up) = parent {
        if up.name == ancestor {
            return true;
        }
        parent = by_id(up.parent_span_id);
    }
    false
}

#[tokio::test]
async fn an_applications_tracing_spans_and_brighters_spans_are_one_trace_one_span_per_operation() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber =
        tracing_subscriber::registry().with(brighter_otel::tracing_layer(provider.tracer("app")));
    let _default = tracing::subscriber::set_default(subscriber);

    let broker = InMemoryBroker::new();
    let processor = CommandProcessor::builder()
        .telemetry(Telemetry::from_providers(
            &provider,
            &SdkMeterProvider::default(),
        ))
        .event_with(
            brighter_core::pipeline::Pipeline::new().step(brighter_core::pipeline::RequestTracing),
            Ledger,
        )
        .publication::<Charged>(Publication::event("charges"))
        .producer(broker.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::event::<Charged>(
            "ledger",
            "charges",
            Arc::new(broker.clone()),
        ))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    while !dispatcher
        .subscription_health("ledger")
        .is_some_and(|h| h.is_healthy())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The application's request span, as axum's tower-http layer would make.
    async {
        processor
            .post(&Charged {
                id: uuid::Uuid::now_v7(),
            })
            .await
            .unwrap();
    }
    .instrument(tracing::info_span!("POST /charges"))
    .await;
    while dispatcher.subscription_health("ledger").unwrap().handled == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dispatcher.shutdown().await;
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    let request = named(&spans, "POST /charges");
    assert_eq!(request.len(), 1, "{names:?}");
    let request = request[0];
    assert_eq!(
        request.parent_span_id,
        SpanId::INVALID,
        "the request is the root"
    );
    let trace = request.span_context.trace_id();
    assert!(
        spans.iter().all(|s| s.span_context.trace_id() == trace),
        "one trace: {names:?}"
    );

    // One span per operation: brighter's `process` and `handle` tracing spans
    // are not exported beside its OpenTelemetry ones.
    let process: Vec<_> = spans
        .iter()
        .filter(|s| s.name.ends_with("process"))
        .collect();
    assert_eq!(process.len(), 1, "{names:?}");
    assert_eq!(process[0].name, "charges process");
    assert!(named(&spans, "process").is_empty(), "{names:?}");
    assert!(named(&spans, "handle").is_empty(), "{names:?}");

    // brighter's publish span is under the request span...
    let publish = named(&spans, "charges publish");
    assert_eq!(publish.len(), 1, "{names:?}");
    assert!(
        is_under(&spans, publish[0], "POST /charges"),
        "publish is not under the request: {names:?}"
    );
    // ...and the handler's own span under brighter's process span.
    let ledger = named(&spans, "write ledger");
    assert_eq!(ledger.len(), 1, "{names:?}");
    assert!(
        is_under(&spans, ledger[0], "charges process"),
        "the handler's span is not under process: {names:?}"
    );
}
