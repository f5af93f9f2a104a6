//! `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` makes `init` export over OTLP/gRPC: a
//! stand-in collector (the OTLP trace and metrics gRPC services, served by
//! tonic on a local port) receives the processor's spans, under the service
//! name, and its metrics. (One test in this file: it sets the environment.)

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// What the stand-in collector received: (service.name, span name) pairs and
/// metric names.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String)>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
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
                    self.spans
                        .lock()
                        .unwrap()
                        .push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    self.metrics.lock().unwrap().push(metric.name);
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[test]
fn the_protocol_variable_grpc_exports_spans_and_metrics_over_otlp_grpc() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    // SAFETY: no other thread reads the environment yet (the runtime's workers
    // run nothing until the collector is spawned below).
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var(
            brighter_otel::ENDPOINT_VAR,
            format!("http://127.0.0.1:{port}"),
        );
        std::env::set_var(brighter_otel::PROTOCOL_VAR, "grpc");
    }
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    runtime.spawn(server);

    // gRPC needs the runtime when the exporters are built.
    let guard = runtime
        .block_on(async { brighter_otel::init("grpc-test-service") })
        .unwrap();
    assert!(guard.exporting());
    common::send_and_post(&runtime);
    guard.flush();
    drop(guard);

    let spans = collector.spans.lock().unwrap().clone();
    assert!(
        spans.contains(&("grpc-test-service".into(), "send Greet".into())),
        "{spans:?}"
    );
    assert!(
        spans.contains(&("grpc-test-service".into(), "greetings publish".into())),
        "{spans:?}"
    );
    let metrics = collector.metrics.lock().unwrap().clone();
    assert!(
        metrics
            .iter()
            .any(|m| m == "messaging.client.sent.messages"),
        "{metrics:?}"
    );
}
