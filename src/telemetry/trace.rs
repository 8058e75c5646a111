//! OpenTelemetry traces over OTLP/HTTP (`--otlp-endpoint`, off by default).
//!
//! The tracing spans the gateway already has become OpenTelemetry spans: `request` (one per API
//! request, `api/request_id.rs`), its child `generation` (the generation's task), and that
//! one's child `upstream_request` (the provider call, retries included). A caller's W3C
//! `traceparent` becomes the request span's parent, and the upstream request carries a
//! `traceparent` naming the `upstream_request` span, so the provider's spans join the trace.
//!
//! Spans are exported in batches by the SDK's own thread; the POST itself runs on the
//! gateway's runtime (a few lines over a TCP socket: the collector is a plain-HTTP sidecar or
//! service, and the HTTP clients the exporter offers would pull a second stack in).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{registry::LookupSpan, Layer};

/// Longest an export may take, connect to response.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a collector's answer read (its status line is what matters).
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "--otlp-endpoint must be an http:// URL (e.g. http://collector:4318/v1/traces), got {0:?}"
    )]
    Endpoint(String),
    #[error("could not set up the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The exporting side: flushes what is left when the process ends.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports the spans still buffered; blocks until done (or the SDK's timeout).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "exporting the last spans failed");
        }
    }
}

/// The layer that turns tracing spans into OpenTelemetry spans exported to `endpoint`.
pub fn layer<S>(endpoint: &str) -> Result<(impl Layer<S>, Tracing), TraceError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if !endpoint.starts_with("http://") {
        return Err(TraceError::Endpoint(endpoint.to_owned()));
    }
    let client = RuntimeClient {
        runtime: tokio::runtime::Handle::current(),
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("tokenfan").build())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tokenfan"));
    Ok((layer, Tracing { provider }))
}

/// Makes the caller's `traceparent`, if any, the parent of `span`.
pub fn adopt_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        // Fails only when tracing is off, and then there is nothing to join.
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` naming the current span, when traces are on.
pub fn traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        )
    })
}

/// Runs each export's POST on the gateway's runtime; the SDK's export thread waits for it.
#[derive(Debug)]
struct RuntimeClient {
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The timer too must be made on the runtime: this thread has none.
        let post = async move { tokio::time::timeout(EXPORT_TIMEOUT, post(request)).await };
        let status = self.runtime.spawn(post).await???;
        Ok(Response::builder().status(status).body(Bytes::new())?)
    }
}

/// POSTs `request` on a new connection and returns the answer's status.
async fn post(request: Request<Bytes>) -> Result<u16, HttpError> {
    let uri = request.uri();
    let host = uri.host().ok_or("the OTLP endpoint has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |target| target.as_str());
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        request.body().len()
    );
    for (name, value) in request.headers() {
        head.push_str(&format!("{name}: {}\r\n", value.to_str()?));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect((host, port)).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(request.body()).await?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .await?;
    let status = answer
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| answer.strip_prefix(b"HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse().ok())
        .ok_or("the OTLP endpoint did not answer HTTP")?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_endpoints_are_taken() {
        let refused = layer::<tracing_subscriber::Registry>("https://collector:4318/v1/traces");
        assert!(matches!(refused, Err(TraceError::Endpoint(_))));
    }

    #[test]
    fn without_traces_no_traceparent_is_sent() {
        let span = tracing::info_span!("upstream_request");
        assert_eq!(span.in_scope(traceparent), None);
    }
}
