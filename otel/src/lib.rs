//! # brighter-otel
//!
//! Opt-in OpenTelemetry set-up for applications built on brighter (the samples
//! use it). [`init`] installs, as the globals:
//! - the W3C trace-context and baggage propagators, which brighter uses to carry
//!   a trace in message headers;
//! - when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (e.g. `http://localhost:4318`,
//!   Jaeger's OTLP/HTTP port, or `http://localhost:4317` for gRPC), a tracer
//!   provider and a meter provider that export over OTLP, with `service.name`
//!   set to the given name (or `OTEL_SERVICE_NAME`). The transport is what
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` (or the per-signal
//!   `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `_METRICS_PROTOCOL`) says, as the
//!   OpenTelemetry specification has it: `grpc`, `http/protobuf` (the default)
//!   or `http/json`; gRPC needs `init` to be called inside a Tokio runtime;
//! - a `tracing` log subscriber (`RUST_LOG`, default `warn`), unless one is
//!   set; when exporting, with [`tracing_layer`] in it, so the application's
//!   own `tracing` spans (an HTTP framework's request span, a handler's
//!   `info_span!`) are exported too, in the same traces as brighter's.
//!
//! With a subscriber of your own, add [`tracing_layer`] to it to get the same
//! join: a `tracing` span entered around a `send`, `post` or `deposit_post` is
//! the parent of brighter's spans, and a `tracing` span made inside a handler
//! is a child of brighter's `process` span. brighter's own `tracing` spans
//! (the pump's `process`, the `RequestTracing` step's `handle`) are left out
//! of it, since brighter exports those operations as OpenTelemetry spans
//! already: one span per operation.
//!
//! Call it first thing, before building the command processor: the processor
//! takes its tracer and meter from the globals when it is built. Keep the
//! returned guard alive; dropping it flushes and shuts the exporters down.
//!
//! ```no_run
//! fn main() -> Result<(), brighter_otel::OtelError> {
//!     let _telemetry = brighter_otel::init("greetings")?;
//!     // build the processor, run the service ...
//!     Ok(())
//! }
//! ```

#![forbid(unsafe_code)]

use opentelemetry::global;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The environment variable naming the OTLP endpoint.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The environment variable choosing the OTLP transport: `grpc`,
/// `http/protobuf` (the default) or `http/json`.
pub const PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";

/// Setting up an exporter failed.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The OTLP exporter could not be built (e.g. a malformed endpoint).
    #[error("cannot build the OTLP {signal} exporter for {endpoint}: {source}")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The endpoint from the environment.
        endpoint: String,
        /// What the exporter said.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// An OTLP protocol variable names no protocol there is.
    #[error("{var}={value:?}: use grpc, http/protobuf or http/json")]
    Protocol {
        /// The variable.
        var: String,
        /// What it said.
        value: String,
    },
}

/// Keeps the exporters running; dropping it flushes what is buffered and shuts
/// them down.
#[derive(Debug)]
pub struct OtelGuard {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl OtelGuard {
    /// Whether traces and metrics are exported (an endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Exports everything buffered now.
    pub fn flush(&self) {
        if let Some(provider) = &self.tracer_provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(%error, "flushing spans failed");
        }
        if let Some(provider) = &self.meter_provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(%error, "flushing metrics failed");
        }
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            let _ = provider.shutdown();
        }
        if let Some(provider) = self.meter_provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The OTLP protocol `signal_var` (e.g. `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`)
/// or else `OTEL_EXPORTER_OTLP_PROTOCOL` names: `grpc`, `http/protobuf` or
/// `http/json`; `http/protobuf` when neither is set.
fn protocol(signal_var: &str) -> Result<Protocol, OtelError> {
    let (var, value) = [signal_var, PROTOCOL_VAR]
        .into_iter()
        .find_map(|var| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| (var, v))
        })
        .unwrap_or((PROTOCOL_VAR, "http/protobuf".to_owned()));
    match value.trim() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        _ => Err(OtelError::Protocol {
            var: var.to_owned(),
            value,
        }),
    }
}

/// A `tracing` layer that exports the application's `tracing` spans as
/// OpenTelemetry spans through `tracer`, joined with brighter's (see the crate
/// docs). Spans of brighter's own crates are left out: brighter exports those
/// operations itself.
pub fn tracing_layer<S, T>(tracer: T) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    T: opentelemetry::trace::Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
            !is_brighters(metadata.target())
        }))
}

/// Whether a `tracing` target is one of brighter's crates.
fn is_brighters(target: &str) -> bool {
    target.starts_with("brighter_") || target.starts_with("brighter::")
}

/// The log subscriber: `RUST_LOG` (default `warn`), and the join of `tracing`
/// spans when a tracer provider exports. Leaves a subscriber already set alone.
fn install_subscriber(tracer_provider: Option<&SdkTracerProvider>) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let join = tracer_provider.map(|provider| tracing_layer(provider.tracer("brighter-otel")));
    let _ = tracing_subscriber::registry()
        .with(join)
        .with(tracing_subscriber::fmt::layer().with_filter(filter))
        .try_init();
}

/// Sets up propagation, OTLP export (when `OTEL_EXPORTER_OTLP_ENDPOINT` is set)
/// and logging for the service `service_name`. See the crate docs.
pub fn init(service_name: &str) -> Result<OtelGuard, OtelError> {
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let endpoint = std::env::var(ENDPOINT_VAR).unwrap_or_default();
    if endpoint.trim().is_empty() {
        install_subscriber(None);
        return Ok(OtelGuard {
            tracer_provider: None,
            meter_provider: None,
        });
    }
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| service_name.to_owned());
    let resource = Resource::builder().with_service_name(service_name).build();
    // The exporters read the endpoint (and OTEL_EXPORTER_OTLP_HEADERS, timeouts)
    // from the environment themselves, adding /v1/traces and /v1/metrics.
    // The transport: OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL, else
    // OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf (the specification's
    // default). gRPC needs a Tokio runtime: call `init` inside one.
    let exporter_error = |signal: &'static str| {
        let endpoint = endpoint.clone();
        move |source| OtelError::Exporter {
            signal,
            endpoint,
            source,
        }
    };
    let traces_protocol = protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")?;
    let spans = match traces_protocol {
        Protocol::Grpc => SpanExporter::builder().with_tonic().build(),
        http => SpanExporter::builder()
            .with_http()
            .with_protocol(http)
            .build(),
    }
    .map_err(exporter_error("traces"))?;
    let metrics = match protocol("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")? {
        Protocol::Grpc => MetricExporter::builder().with_tonic().build(),
        http => MetricExporter::builder()
            .with_http()
            .with_protocol(http)
            .build(),
    }
    .map_err(exporter_error("metrics"))?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(spans)
        .build();
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(PeriodicReader::builder(metrics).build())
        .build();
    global::set_tracer_provider(tracer_provider.clone());
    global::set_meter_provider(meter_provider.clone());
    install_subscriber(Some(&tracer_provider));
    tracing::info!(%endpoint, protocol = ?traces_protocol, "exporting traces and metrics over OTLP");
    Ok(OtelGuard {
        tracer_provider: Some(tracer_provider),
        meter_provider: Some(meter_provider),
    })
}
