//! A span and a metric for every gRPC call the scheduler serves.
//!
//! The span (`rpc.system = grpc`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`)
//! continues the caller's W3C `traceparent` header; handlers read its own traceparent
//! from the request's [`CallTrace`] extension, so an enrollment's run continues the call's
//! trace. `touchpoint_scheduler_grpc_requests_total{method,code}` counts each call by the
//! status it ended with (the header of an immediate error, otherwise `OK` at response
//! headers; a stream's later failure is counted as `OK` there).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap};
use touchpoint_proto::metrics::{GrpcLabels, metrics};
use touchpoint_proto::telemetry::continue_trace;
use tower::Layer;
use tracing::{Instrument as _, Span, field::Empty, info_span};

/// The traceparent of the gRPC call's own span.
#[derive(Debug, Clone)]
pub(crate) struct CallTrace(pub(crate) String);

/// Wraps every route in a call span and counts calls.
#[derive(Debug, Clone, Default)]
pub(crate) struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

/// The service [`ObserveLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub(crate) struct Observe<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let span = info_span!(
            "grpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        let parent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let own = continue_trace(&span, parent);
        request.extensions_mut().insert(CallTrace(own));
        let future = self.inner.call(request);
        let recorded = span.clone();
        Box::pin(
            async move {
                let result = future.await;
                let code = match &result {
                    Ok(response) => status_of(response.headers()),
                    Err(_) => tonic::Code::Internal,
                };
                record(&recorded, &path, code);
                result
            }
            .instrument(span),
        )
    }
}

fn status_of(headers: &HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

fn record(span: &Span, path: &str, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
    metrics()
        .scheduler
        .grpc_requests
        .get_or_create(&GrpcLabels {
            method: bounded_method(path),
            code: code_name(code),
        })
        .inc();
}

/// Known methods as they are; anything else as `other`, so probes of random paths
/// cannot grow the label set.
fn bounded_method(path: &str) -> String {
    let known = path.starts_with("/touchpoint.v1.")
        || path.starts_with("/grpc.health.v1.")
        || path.starts_with("/grpc.reflection.");
    if known && path.len() <= 80 {
        path.trim_start_matches('/').to_owned()
    } else {
        "other".to_owned()
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How often the due backlog and the dead letters are counted (all partitions, one
/// pipelined round trip).
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Keeps `touchpoint_scheduler_due_backlog` and `touchpoint_scheduler_dead_letters`
/// current (only when metrics are served: it costs two commands per partition).
pub(crate) fn sample_backlog(
    store: crate::store::Store,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            match store.backlog(crate::clock::now_ms()).await {
                Ok((due, dead)) => {
                    let m = &metrics().scheduler;
                    m.due_backlog.set(i64::try_from(due).unwrap_or(i64::MAX));
                    m.dead_letters.set(i64::try_from(dead).unwrap_or(i64::MAX));
                }
                Err(err) => tracing::debug!(error = %err, "sampling the backlog failed"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_stay_bounded() {
        assert_eq!(
            bounded_method("/touchpoint.v1.EnrollmentService/Enroll"),
            "touchpoint.v1.EnrollmentService/Enroll"
        );
        assert_eq!(bounded_method("/evil/x"), "other");
        let long = format!("/touchpoint.v1.{}", "x".repeat(100));
        assert_eq!(bounded_method(&long), "other");
    }

    #[test]
    fn status_comes_from_the_grpc_status_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_of(&headers), tonic::Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(status_of(&headers), tonic::Code::Unavailable);
    }
}
