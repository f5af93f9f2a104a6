//! OpenTelemetry spans, context propagation and metrics, through the
//! `opentelemetry` API only: the application chooses and installs the SDK and
//! exporters (see the `brighter-otel` crate for a ready OTLP set-up).
//!
//! Spans follow the messaging semantic conventions:
//! - internal `send <Type>`, `publish <Type>`, `<topic> deposit` and
//!   `clear outbox` spans on the processor;
//! - a producer span `<topic> publish` when a message goes to the broker;
//! - a consumer span `<topic> process` in the message pump.
//!
//! The W3C trace context (and baggage) of the deposit span is written into the
//! message header, stored with the outbox row, and read back by the sweeper, so
//! the publish span (perhaps in another process, much later) and the consumer's
//! process span continue the trace of the request that deposited the message.
//! Injection and extraction use the global propagator: install
//! `TraceContextPropagator` (and `BaggagePropagator`) at start-up.
//!
//! Metrics (global meter `brighter`):
//! - `messaging.client.sent.messages` (counter; `messaging.destination.name`, `outcome` sent/failed);
//! - `messaging.client.consumed.messages` (counter; destination, subscription, `outcome`
//!   acked/requeued/rejected/invalid/not_acked);
//! - `messaging.process.duration` (histogram, seconds; same attributes);
//! - `brighter.messages.dead_lettered` (counter; destination, `outcome` rejected/invalid);
//! - `brighter.outbox.outstanding` (gauge, recorded by sweepers);
//! - `brighter.outbox.oldest_age` (gauge, seconds: how long the oldest
//!   outstanding message has waited; recorded by sweepers);
//! - `brighter.outbox.parked_rows` (gauge: messages parked now; recorded by
//!   sweepers), beside the counter `brighter.outbox.parked`;
//! - `brighter.subscription.lag` (gauge; destination, subscription: messages
//!   waiting for the subscription: on Kafka its group's committed offsets
//!   against the high watermarks, on RabbitMQ its queue's ready messages;
//!   recorded by the dispatcher);
//! - `brighter.inbox.duplicates` (counter; `brighter.inbox.context`: messages
//!   the inbox found handled already and dropped);
//! - `brighter.handler.retries` (counter; `brighter.request.type`: attempts
//!   a retry step made after a failure).
//!
//! Install the tracer and meter providers before building the processor: it
//! takes its tracer and instruments from the globals when it is built.

use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry::global::{self, BoxedTracer, ObjectSafeTracerProvider};
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};

use crate::error::Error;
use crate::message::{Message, TraceContext};

/// The instrumentation scope name of brighter's tracer and meter.
pub const SCOPE: &str = "brighter";

/// Attribute keys used on spans and metrics.
pub mod attributes {
    /// `messaging.system`: `kafka`, `rabbitmq`, `memory`.
    pub const SYSTEM: &str = "messaging.system";
    /// `messaging.destination.name`: the topic or routing key.
    pub const DESTINATION: &str = "messaging.destination.name";
    /// `messaging.message.id`.
    pub const MESSAGE_ID: &str = "messaging.message.id";
    /// `messaging.message.conversation_id`: the correlation id.
    pub const CONVERSATION_ID: &str = "messaging.message.conversation_id";
    /// `messaging.operation.type`: `create`, `send`, `process`.
    pub const OPERATION_TYPE: &str = "messaging.operation.type";
    /// `messaging.operation.name`: `deposit`, `publish`, `process`, `clear`.
    pub const OPERATION_NAME: &str = "messaging.operation.name";
    /// `messaging.consumer.group.name`: the subscription's channel.
    pub const CONSUMER_GROUP: &str = "messaging.consumer.group.name";
    /// `messaging.batch.message_count`.
    pub const BATCH_COUNT: &str = "messaging.batch.message_count";
    /// `error.type`: the [`ErrorKind`](crate::ErrorKind) of a failure.
    pub const ERROR_TYPE: &str = "error.type";
    /// `outcome`: what became of a message (sent, failed, acked, requeued, ...).
    pub const OUTCOME: &str = "outcome";
    /// `brighter.request.type`: the Rust type of a request.
    pub const REQUEST_TYPE: &str = "brighter.request.type";
    /// `brighter.subscription`: the subscription's name.
    pub const SUBSCRIPTION: &str = "brighter.subscription";
    /// `brighter.inbox.context`: an inbox context key.
    pub const INBOX_CONTEXT: &str = "brighter.inbox.context";
}

use attributes as attr;

/// The tracer and metric instruments of a processor and of what runs with it
/// (sweepers, the message pump). Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when no tracer provider is installed: no spans are made at all.
    tracer: Option<BoxedTracer>,
    metrics: Option<Metrics>,
}

struct Metrics {
    sent: Counter<u64>,
    consumed: Counter<u64>,
    duration: Histogram<f64>,
    dead_lettered: Counter<u64>,
    parked: Counter<u64>,
    unsettled: Counter<u64>,
    outstanding: Gauge<u64>,
    oldest_age: Gauge<f64>,
    parked_rows: Gauge<u64>,
    lag: Gauge<u64>,
    duplicates: Counter<u64>,
    retries: Counter<u64>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &self.tracing_enabled())
            .field("metrics", &self.inner.metrics.is_some())
            .finish()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::global()
    }
}

impl Telemetry {
    /// Spans from the global tracer provider and metrics from the global meter
    /// provider, as installed now. When the global tracer provider is the no-op
    /// one, no span is made at all (not even a no-op one), so an application
    /// without tracing pays nothing for it.
    pub fn global() -> Self {
        let tracer = global::tracer(SCOPE);
        let meter = global::meter(SCOPE);
        Telemetry::from_parts(tracer, &meter)
    }

    /// Spans from `tracer_provider` and metrics from `meter_provider`, not
    /// the globals: for applications that keep their providers to themselves,
    /// and for tests, which then need no process-wide state (so they run in
    /// parallel in one process). Trace context still travels with the global
    /// text-map propagator (install `TraceContextPropagator`).
    pub fn from_providers<T, M>(tracer_provider: &T, meter_provider: &M) -> Self
    where
        T: ObjectSafeTracerProvider,
        M: MeterProvider,
    {
        let scope = opentelemetry::InstrumentationScope::builder(SCOPE).build();
        let tracer = BoxedTracer::new(tracer_provider.boxed_tracer(scope));
        let meter = meter_provider.meter(SCOPE);
        Telemetry::from_parts(tracer, &meter)
    }

    fn from_parts(tracer: BoxedTracer, meter: &opentelemetry::metrics::Meter) -> Self {
        let tracer = is_real_tracer(&tracer).then_some(tracer);
        let metrics = Metrics {
            sent: meter
                .u64_counter("messaging.client.sent.messages")
                .with_description("Messages sent to a broker, by destination and outcome")
                .with_unit("{message}")
                .build(),
            consumed: meter
                .u64_counter("messaging.client.consumed.messages")
                .with_description("Messages consumed by the pump, by destination and outcome")
                .with_unit("{message}")
                .build(),
            duration: meter
                .f64_histogram("messaging.process.duration")
                .with_description("Time to handle and settle one consumed message")
                .with_unit("s")
                .build(),
            dead_lettered: meter
                .u64_counter("brighter.messages.dead_lettered")
                .with_description("Messages moved to the dead-letter or invalid-message channel")
                .with_unit("{message}")
                .build(),
            parked: meter
                .u64_counter("brighter.outbox.parked")
                .with_description("Outbox messages parked after failing to send too often")
                .with_unit("{message}")
                .build(),
            unsettled: meter
                .u64_counter("brighter.messages.unsettled")
                .with_description(
                    "Messages whose ack, requeue, dead-letter or invalid-channel publish failed",
                )
                .with_unit("{message}")
                .build(),
            outstanding: meter
                .u64_gauge("brighter.outbox.outstanding")
                .with_description("Outbox messages not yet dispatched")
                .with_unit("{message}")
                .build(),
            oldest_age: meter
                .f64_gauge("brighter.outbox.oldest_age")
                .with_description("How long the oldest outstanding outbox message has waited")
                .with_unit("s")
                .build(),
            parked_rows: meter
                .u64_gauge("brighter.outbox.parked_rows")
                .with_description("Outbox messages parked now")
                .with_unit("{message}")
                .build(),
            lag: meter
                .u64_gauge("brighter.subscription.lag")
                .with_description("Messages waiting for a subscription: committed offsets behind the high watermarks (Kafka), ready messages in its queue (RabbitMQ)")
                .with_unit("{message}")
                .build(),
            duplicates: meter
                .u64_counter("brighter.inbox.duplicates")
                .with_description("Messages the inbox found handled already, and dropped")
                .with_unit("{message}")
                .build(),
            retries: meter
                .u64_counter("brighter.handler.retries")
                .with_description("Attempts a retry step made after a failure")
                .with_unit("{attempt}")
                .build(),
        };
        Telemetry {
            inner: Arc::new(Inner {
                tracer,
                metrics: Some(metrics),
            }),
        }
    }

    /// No spans and no metrics; trace context in message headers is still passed
    /// on from a consumed message to the messages its handler sends.
    pub fn disabled() -> Self {
        Telemetry {
            inner: Arc::new(Inner {
                tracer: None,
                metrics: None,
            }),
        }
    }

    /// Whether spans are made.
    pub fn tracing_enabled(&self) -> bool {
        self.inner.tracer.is_some()
    }

    /// Starts a span of `kind` under `parent`, named by `name` and with the
    /// attributes `attributes` makes (both only called when spans are made, so
    /// nothing is formatted when tracing is off). Returns `parent` with the span
    /// as its active span, or `None` when tracing is off.
    pub fn start_span<N: Into<Cow<'static, str>>>(
        &self,
        name: impl FnOnce() -> N,
        kind: SpanKind,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        let tracer = self.inner.tracer.as_ref()?;
        let span = tracer
            .span_builder(name())
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(tracer, parent);
        Some(parent.with_span(span))
    }

    /// Records the number of outstanding outbox messages.
    pub fn record_outstanding(&self, outstanding: u64) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.outstanding.record(outstanding, &[]);
        }
    }

    /// Records how long the oldest outstanding outbox message has waited
    /// (zero when none waits) and how many are parked.
    pub fn record_outbox_health(&self, oldest_age: std::time::Duration, parked: u64) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.oldest_age.record(oldest_age.as_secs_f64(), &[]);
            metrics.parked_rows.record(parked, &[]);
        }
    }

    /// Records how many messages wait for `subscription` on `topic`.
    pub fn record_lag(&self, topic: &str, subscription: &str, lag: u64) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.lag.record(
                lag,
                &[
                    KeyValue::new(attr::DESTINATION, topic.to_owned()),
                    KeyValue::new(attr::SUBSCRIPTION, subscription.to_owned()),
                ],
            );
        }
    }

    /// Counts a message the inbox of `context` found handled already.
    pub fn record_duplicate(&self, context: &str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics
                .duplicates
                .add(1, &[KeyValue::new(attr::INBOX_CONTEXT, context.to_owned())]);
        }
    }

    /// Counts an attempt a retry step made for `request_type` after a failure.
    pub fn record_retry(&self, request_type: &'static str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics
                .retries
                .add(1, &[KeyValue::new(attr::REQUEST_TYPE, request_type)]);
        }
    }

    /// Starts the producer span `<topic> publish` for `message`, continuing the
    /// trace in its header, and writes the span's context into the header so the
    /// consumer continues from it. Pair with [`end_publish`](Self::end_publish).
    pub fn start_publish(&self, system: &'static str, message: &mut Message) -> Option<Context> {
        if !self.tracing_enabled() {
            return None;
        }
        let parent = extract(&message.header.trace);
        let header = &message.header;
        let cx = self.start_span(
            || format!("{} publish", header.topic),
            SpanKind::Producer,
            &parent,
            || {
                vec![
                    KeyValue::new(attr::SYSTEM, system),
                    KeyValue::new(attr::DESTINATION, header.topic.to_string()),
                    KeyValue::new(attr::OPERATION_TYPE, "send"),
                    KeyValue::new(attr::OPERATION_NAME, "publish"),
                    KeyValue::new(attr::MESSAGE_ID, header.id.to_string()),
                    KeyValue::new(attr::CONVERSATION_ID, header.correlation_id.to_string()),
                ]
            },
        )?;
        inject(&cx, &mut message.header.trace);
        Some(cx)
    }

    /// Ends a span from [`start_publish`](Self::start_publish) and counts the send.
    pub fn end_publish(&self, span: Option<Context>, topic: &str, result: &Result<(), Error>) {
        if let Some(metrics) = &self.inner.metrics {
            let outcome = if result.is_ok() { "sent" } else { "failed" };
            metrics.sent.add(
                1,
                &[
                    KeyValue::new(attr::DESTINATION, topic.to_owned()),
                    KeyValue::new(attr::OUTCOME, outcome),
                ],
            );
        }
        if let Some(cx) = span {
            end_span(&cx, result.as_ref().err());
        }
    }

    /// Counts one consumed message and its processing time; `dead_lettered` when
    /// it went to the dead-letter or invalid-message channel.
    /// Counts an outbox message to `topic` parked by a sweeper.
    pub(crate) fn record_parked(&self, topic: &str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics
                .parked
                .add(1, &[KeyValue::new(attr::DESTINATION, topic.to_owned())]);
        }
    }

    /// Counts a message of `subscription` that could not be settled.
    pub(crate) fn record_unsettled(&self, topic: &str, subscription: &str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.unsettled.add(
                1,
                &[
                    KeyValue::new(attr::DESTINATION, topic.to_owned()),
                    KeyValue::new(attr::SUBSCRIPTION, subscription.to_owned()),
                ],
            );
        }
    }

    /// The attributes of a subscription's consumed-message metrics, made
    /// once per performer so that recording allocates nothing per message.
    pub(crate) fn consumed_labels(&self, topic: &str, subscription: &str) -> ConsumedLabels {
        let destination = KeyValue::new(
            attr::DESTINATION,
            opentelemetry::StringValue::from(Arc::<str>::from(topic)),
        );
        let subscription = KeyValue::new(
            attr::SUBSCRIPTION,
            opentelemetry::StringValue::from(Arc::<str>::from(subscription)),
        );
        ConsumedLabels {
            by_outcome: CONSUMED_OUTCOMES.map(|outcome| {
                [
                    destination.clone(),
                    subscription.clone(),
                    KeyValue::new(attr::OUTCOME, outcome),
                ]
            }),
        }
    }

    pub(crate) fn record_consumed(
        &self,
        labels: &ConsumedLabels,
        outcome: &'static str,
        dead_lettered: bool,
        seconds: f64,
    ) {
        let Some(metrics) = &self.inner.metrics else {
            return;
        };
        let attributes = labels.of(outcome);
        metrics.consumed.add(1, &attributes);
        metrics.duration.record(seconds, &attributes);
        if dead_lettered {
            metrics.dead_lettered.add(
                1,
                &[attributes[0].clone(), KeyValue::new(attr::OUTCOME, outcome)],
            );
        }
    }
}

/// The outcomes a performer records a consumed message under.
const CONSUMED_OUTCOMES: [&str; 6] = [
    "acked",
    "requeued",
    "rejected",
    "invalid",
    "not_acked",
    "error",
];

/// The attributes every consumed-message metric of one subscription carries,
/// made once per performer for each outcome, so recording a message clones
/// none of them.
#[derive(Debug, Clone)]
pub(crate) struct ConsumedLabels {
    by_outcome: [[KeyValue; 3]; CONSUMED_OUTCOMES.len()],
}

impl ConsumedLabels {
    /// The destination, subscription and `outcome` attributes.
    fn of(&self, outcome: &'static str) -> Cow<'_, [KeyValue]> {
        match CONSUMED_OUTCOMES.iter().position(|known| *known == outcome) {
            Some(index) => Cow::Borrowed(&self.by_outcome[index]),
            None => {
                let [destination, subscription, _] = &self.by_outcome[0];
                Cow::Owned(vec![
                    destination.clone(),
                    subscription.clone(),
                    KeyValue::new(attr::OUTCOME, outcome),
                ])
            }
        }
    }
}

/// Whether `tracer` comes from a real provider rather than the no-op one. It
/// starts a span under a telemetry-suppressed remote parent: the no-op tracer
/// hands back the parent's context, while an SDK makes an empty, non-recording
/// span for a suppressed context. Nothing is recorded or exported either way.
fn is_real_tracer(tracer: &BoxedTracer) -> bool {
    let probe_parent = SpanContext::new(
        TraceId::from(1u128),
        SpanId::from(1u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let parent = Context::new()
        .with_remote_span_context(probe_parent.clone())
        .with_telemetry_suppressed();
    let span = tracer.start_with_context("brighter.probe", &parent);
    use opentelemetry::trace::Span as _;
    *span.span_context() != probe_parent
}

/// Ends the active span of `cx`, with an error status when `error` is given.
pub fn end_span(cx: &Context, error: Option<&Error>) {
    let span = cx.span();
    if let Some(error) = error {
        span.set_attribute(KeyValue::new(
            attr::ERROR_TYPE,
            format!("{:?}", error.kind()),
        ));
        span.set_status(Status::error(error.to_string()));
    }
    span.end();
}

/// Writes the trace context of `cx` into `trace` with the global propagator.
pub fn inject(cx: &Context, trace: &mut TraceContext) {
    global::get_text_map_propagator(|propagator| propagator.inject_context(cx, trace));
}

/// Reads a context from `trace` with the global propagator; an empty context
/// when it holds none.
pub fn extract(trace: &TraceContext) -> Context {
    if trace.traceparent.is_none() && trace.baggage.is_none() {
        return Context::new();
    }
    global::get_text_map_propagator(|propagator| propagator.extract(trace))
}

impl Injector for TraceContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            crate::message::wire::TRACEPARENT => self.traceparent = Some(value),
            crate::message::wire::TRACESTATE => self.tracestate = Some(value),
            crate::message::wire::BAGGAGE => self.baggage = Some(value),
            _ => {}
        }
    }
}

impl Extractor for TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            crate::message::wire::TRACEPARENT => self.traceparent.as_deref(),
            crate::message::wire::TRACESTATE => self.tracestate.as_deref(),
            crate::message::wire::BAGGAGE => self.baggage.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::with_capacity(3);
        if self.traceparent.is_some() {
            keys.push(crate::message::wire::TRACEPARENT);
        }
        if self.tracestate.is_some() {
            keys.push(crate::message::wire::TRACESTATE);
        }
        if self.baggage.is_some() {
            keys.push(crate::message::wire::BAGGAGE);
        }
        keys
    }
}

/// Runs `future` with `span` (a context from [`Telemetry::start_span`]) as the
/// current context, then ends the span with the future's outcome. Without a
/// span, just runs the future.
///
/// The future returned holds `future` once, in place: not an `async fn`,
/// whose state would keep its argument beside the future it awaits, twice
/// the size, and copy it from one to the other.
pub fn traced<T, F>(
    span: Option<Context>,
    future: F,
) -> impl std::future::Future<Output = Result<T, Error>>
where
    F: std::future::Future<Output = Result<T, Error>>,
{
    use futures::future::{Either, FutureExt as _};
    use opentelemetry::context::FutureExt as _;
    match span {
        None => Either::Left(future),
        Some(cx) => Either::Right(future.with_context(cx.clone()).map(move |result| {
            end_span(&cx, result.as_ref().err());
            result
        })),
    }
}
