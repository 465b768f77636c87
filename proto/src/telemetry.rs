//! Logs and traces of the scheduler and the worker, set up the same way in both.
//!
//! - **Logs** go to stderr as text (default) or JSON lines (`--log-format json`). A JSON
//!   line written inside a span of a run carries that run's `trace_id` and the `span_id`
//!   of the span, so a log search and the trace view meet.
//! - **Traces** are exported over OTLP when the standard variables say where:
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), with
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` = `grpc` or `http/protobuf` (the default),
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*` for batching. Spans are
//!   batched and flushed by [`Telemetry::shutdown`]. With none of them set there is no
//!   exporter and no OpenTelemetry layer at all: trace context is still carried from
//!   caller to receiver (W3C `traceparent`), so a later export joins the same traces.
//!
//! One run is one trace: see [`continue_trace`].

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing::{Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` inside a run's spans.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "invalid log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// The observability flags the scheduler and the worker share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Log lines as `text` or `json` (JSON lines carry trace_id and span_id).
    #[arg(long, env = "TOUCHPOINT_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Serve Prometheus `/metrics` and `/healthz` on this address (e.g. 0.0.0.0:9464);
    /// off when unset.
    #[arg(long, env = "TOUCHPOINT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl TelemetryArgs {
    /// Starts the metrics endpoint when one is configured.
    pub async fn serve_metrics(&self) -> std::io::Result<Option<std::net::SocketAddr>> {
        match self.metrics_listen {
            Some(addr) => crate::metrics::serve(addr).await.map(Some),
            None => Ok(None),
        }
    }
}

/// Whether the environment asks for trace export.
fn export_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
        && std::env::var("OTEL_TRACES_EXPORTER").map_or(true, |value| value != "none")
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sets up logging (filtered by `RUST_LOG`, default `info`) on stderr in `format`, and
    /// trace export when the `OTEL_*` variables ask for it. `service` names the process
    /// unless `OTEL_SERVICE_NAME` does. Call once, inside a tokio runtime.
    pub fn init(service: &'static str, format: LogFormat) -> Self {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let (provider, export_error) = if export_requested() {
            match tracer_provider(service) {
                Ok(provider) => (Some(provider), None),
                Err(err) => (None, Some(err)),
            }
        } else {
            (None, None)
        };
        let otel = provider.as_ref().map(|provider| {
            EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing_opentelemetry::layer().with_tracer(provider.tracer("touchpoint"))
        });
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .event_format(JsonWithTrace)
                .boxed(),
        };
        let installed = tracing_subscriber::registry()
            .with(TraceIdsLayer)
            .with(otel)
            .with(fmt.with_filter(filter))
            .try_init();
        if installed.is_err() {
            // A test harness or an embedding program set one up already.
            eprintln!("touchpoint: a tracing subscriber is already installed; keeping it");
        }
        if let Some(err) = export_error {
            tracing::warn!(error = %err, "cannot set up trace export (OTEL_* variables); traces are not exported");
        } else if provider.is_some() {
            tracing::info!("exporting traces over OTLP (OTEL_* variables)");
        }
        Self { provider }
    }

    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still batched and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            eprintln!("touchpoint: flushing traces failed: {err}");
        }
    }
}

fn tracer_provider(service: &'static str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .map_err(|err| err.to_string())?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name.
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Joins `span` to the trace of `parent` (a W3C `traceparent`; empty or invalid: a new
/// trace) and returns the `traceparent` that names `span` itself, to pass on to the next
/// hop. Records the ids as the span's `trace_id` and `span_id` fields when it declares
/// them (`trace_id = tracing::field::Empty`), which is how JSON log lines get them.
///
/// One run is one trace: the enroll call's span is the root (or continues the caller's
/// trace), the run keeps its `traceparent`, and every step's dispatch, the worker's
/// delivery, the adapter's call and the receiver hang below it. A three-day journey is
/// then one search away (`tp run get` prints the trace id), which on-call engineers
/// prefer over following links between per-step traces.
pub fn continue_trace(span: &Span, parent: &str) -> String {
    // Without export there is no OpenTelemetry layer to ask: skip the propagator, which
    // costs as much as the rest of a step's hand-out.
    let context = if EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        let parent_cx = TraceContextPropagator::new().extract(&HashMap::from([(
            "traceparent".to_owned(),
            parent.to_owned(),
        )]));
        if parent_cx.span().span_context().is_valid() {
            let _ = span.set_parent(parent_cx);
        }
        span.context().span().span_context().clone()
    } else {
        opentelemetry::trace::SpanContext::empty_context()
    };
    let traceparent = if context.is_valid() {
        format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        )
    } else {
        // No OpenTelemetry layer (export off): mint the ids ourselves.
        use rand::Rng as _;
        let mut rng = rand::rng();
        // Zero ids are invalid; `| 1` keeps them off it.
        let span_id = rng.random::<u64>() | 1;
        match trace_id(parent) {
            Some(trace) => format!("00-{trace}-{span_id:016x}-01"),
            None => format!("00-{:032x}-{span_id:016x}-01", rng.random::<u128>() | 1),
        }
    };
    if let Some(trace) = trace_id(&traceparent) {
        span.record("trace_id", trace);
    }
    if let Some(span_id) = traceparent.get(36..52) {
        span.record("span_id", span_id);
    }
    traceparent
}

/// The trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    valid.then_some(trace)
}

/// Set once an OpenTelemetry exporter is installed ([`Telemetry::init`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The `trace_id` / `span_id` a span recorded, kept in its extensions.
#[derive(Debug, Clone, Default)]
struct TraceIds {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for TraceIds {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value.to_owned()),
            "span_id" => self.span_id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if matches!(field.name(), "trace_id" | "span_id") {
            self.record_str(field, format!("{value:?}").trim_matches('"'));
        }
    }
}

/// Remembers the ids spans record, for [`JsonWithTrace`].
struct TraceIdsLayer;

impl<S> Layer<S> for TraceIdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut ids = TraceIds::default();
        attrs.record(&mut ids);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(ids) = extensions.get_mut::<TraceIds>() {
                values.record(ids);
            }
        }
    }
}

/// JSON lines: `timestamp` (RFC 3339), `level`, `target`, the event's fields, the
/// innermost span's name, and the `trace_id` / `span_id` of the nearest span that has them.
struct JsonWithTrace;

/// An event's fields as JSON values.
#[derive(Default)]
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".to_owned(),
            serde_json::Value::String(
                humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            ),
        );
        line.insert(
            "level".to_owned(),
            serde_json::Value::String(event.metadata().level().to_string()),
        );
        line.insert(
            "target".to_owned(),
            serde_json::Value::String(event.metadata().target().to_owned()),
        );
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        line.extend(fields.0);
        if let Some(scope) = ctx.event_scope() {
            let mut first = true;
            let mut found = TraceIds::default();
            for span in scope {
                if first {
                    line.insert(
                        "span".to_owned(),
                        serde_json::Value::String(span.name().to_owned()),
                    );
                    first = false;
                }
                if let Some(ids) = span.extensions().get::<TraceIds>() {
                    found.trace_id = found.trace_id.or_else(|| ids.trace_id.clone());
                    found.span_id = found.span_id.or_else(|| ids.span_id.clone());
                }
                if found.trace_id.is_some() && found.span_id.is_some() {
                    break;
                }
            }
            if let Some(trace_id) = found.trace_id {
                line.insert("trace_id".to_owned(), serde_json::Value::String(trace_id));
            }
            if let Some(span_id) = found.span_id {
                line.insert("span_id".to_owned(), serde_json::Value::String(span_id));
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_name_the_choices() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.contains("text or json"), "{err}");
    }

    #[test]
    fn without_export_a_span_still_continues_the_callers_trace() {
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = tracing::info_span!("t", trace_id = tracing::field::Empty);
        let own = continue_trace(&span, caller);
        assert_eq!(trace_id(&own), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_ne!(own, caller);
        let fresh = continue_trace(&span, "garbage");
        assert!(trace_id(&fresh).is_some());
        assert_ne!(trace_id(&fresh), trace_id(&own));
    }

    #[test]
    fn trace_ids_are_checked() {
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-01"), None);
        assert_eq!(trace_id(""), None);
    }
}
