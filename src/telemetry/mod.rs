//! Logging setup: human-readable text, or one JSON object per line for a log pipeline; and
//! traces ([`trace`]), when an OTLP endpoint is configured.
//!
//! JSON lines have stable field names: `timestamp` (RFC 3339, UTC, µs), `level`, `target`,
//! `message`, then the fields of every enclosing span, outermost first (so `request_id`,
//! `method`, `route`, `key` of an API request and `generation_id` of a generation appear on
//! every line logged inside them, including the generation's own task), then the event's own
//! fields. tracing-subscriber's JSON formatter nests span fields in a `spans` list; flat
//! fields are what log queries filter on.

use std::{fmt, time::SystemTime};

use serde_json::{Map, Value};
use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    layer::{Context, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
    EnvFilter, Layer,
};

use crate::config::{LogFormat, TelemetryConfig};

pub mod trace;

/// Installs the process's log subscriber (and the trace exporter, with an OTLP endpoint);
/// `TOKENFAN_LOG` (an `EnvFilter`, default `info`) chooses what is logged. Call it on the
/// runtime: trace exports run there. The returned exporter must be shut down at exit, to send
/// the last spans.
pub fn init(config: &TelemetryConfig) -> Result<Option<trace::Tracing>, trace::TraceError> {
    let filter = EnvFilter::try_from_env("TOKENFAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (traces, tracing) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let (layer, tracing) = trace::layer(endpoint)?;
            (Some(layer), Some(tracing))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(traces);
    match config.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .init(),
        LogFormat::Json => registry
            .with(SpanFields)
            .with(tracing_subscriber::fmt::layer().event_format(FlatJson))
            .init(),
    }
    Ok(tracing)
}

/// Keeps each span's fields as JSON values in the span's extensions, for [`FlatJson`].
struct SpanFields;

struct Recorded(Map<String, Value>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanFields {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(Recorded(fields));
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(Recorded(fields)) = extensions.get_mut::<Recorded>() {
            values.record(&mut JsonVisitor(fields));
        }
    }
}

/// One JSON object per event, span fields flattened (see the module doc).
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        let now = humantime::format_rfc3339_micros(SystemTime::now());
        line.insert("timestamp".into(), now.to_string().into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(Recorded(fields)) = span.extensions().get::<Recorded>() {
                    line.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
