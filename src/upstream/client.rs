//! The upstream client every provider dialect shares: one streaming request per generation.
//!
//! A call has two phases. [`open`] sends the request and retries failures without a response
//! (connect errors, resets), 429 and 5xx until a 2xx `text/event-stream` answers; no token
//! exists yet, so a retry cannot duplicate one. [`Reader`] then decodes the body into
//! [`UpstreamEvent`]s and never retries. The HTTP client ([`http1`]) only applies the connect
//! timeout; every other deadline (first token, idle gap, total) is enforced with one tokio
//! timer per call. What differs between providers (path, key headers, request body, event
//! decoding) is their [`Dialect`].

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use ::metrics::SharedString;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::time::{timeout_at, Instant};

use super::{
    dialect::{self, Dialect},
    http1::{self, HttpError, Response},
    reader::{body_error, protocol, Reader},
    redact::{self, LogSafe},
    UpstreamError, UpstreamEvent,
};
use crate::config::UpstreamConfig;

/// Provider messages are cut to this many characters: they end up in every subscriber's
/// `error` event and in logs.
pub(super) const MAX_MESSAGE_CHARS: usize = 500;

/// Most bytes read from an error response's body to find its message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Most bytes of a model list read (OpenAI's is ~10 KB); a longer one is cut and then invalid.
const MAX_MODELS_BODY_BYTES: usize = 1024 * 1024;

/// Idle pooled connections are closed after this; providers drop theirs after about a minute.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// TCP keep-alive probes find a provider that vanished without a FIN under a long generation.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A client for one provider; cheap to clone, shared by all generations.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    client: http1::Client,
    /// `GET {url}/models`.
    models: http1::Client,
    dialect: Box<dyn Dialect>,
    /// The configured key and extra header values: removed from any provider text we pass on.
    secrets: Vec<String>,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    total_timeout: Duration,
    max_retries: u32,
    retry_backoff: Duration,
}

impl Upstream {
    /// `base_url` ends in `/v1`; requests go to `{base_url}/chat/completions` (or
    /// `{base_url}/messages` for Anthropic).
    pub fn new(config: &UpstreamConfig, base_url: &str) -> Result<Self, UpstreamError> {
        let dialect = dialect::of_kind(config.kind);
        let url = format!("{}/{}", base_url.trim_end_matches('/'), dialect.path());
        let url = url::Url::parse(&url)
            .map_err(|error| invalid_config(format!("invalid upstream URL: {error}")))?;
        let proxy = config
            .proxy
            .as_ref()
            .map(|proxy| url::Url::parse(proxy.expose()))
            .transpose()
            .map_err(|_| invalid_config("the upstream proxy is not a valid URL"))?;
        let headers = default_headers(config, dialect.as_ref())?;
        let client_for = |method, url: &url::Url, headers: &HeaderMap| {
            http1::Client::new(&http1::Settings {
                method,
                url,
                proxy: proxy.as_ref(),
                headers,
                ca_file: config.ca_file.as_deref(),
                connect_timeout: config.connect_timeout,
                tcp_keepalive: TCP_KEEPALIVE,
                pool_idle_timeout: POOL_IDLE_TIMEOUT,
            })
            .map_err(|error| invalid_config(format!("invalid upstream settings: {error}")))
        };
        let client = client_for("POST", &url, &headers)?;
        // The model list: the same provider, key and headers, asking for JSON.
        let models_url = url::Url::parse(&format!("{}/models", base_url.trim_end_matches('/')))
            .map_err(|error| invalid_config(format!("invalid upstream URL: {error}")))?;
        let mut models_headers = headers.clone();
        models_headers.remove(header::CONTENT_TYPE);
        models_headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let models = client_for("GET", &models_url, &models_headers)?;
        let header_values = config
            .headers
            .iter()
            .filter_map(|line| line.split_once(':'))
            .map(|(_, value)| value.trim().to_owned());
        let secrets = config
            .api_key
            .iter()
            .map(|key| key.expose().to_owned())
            .chain(header_values)
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                models,
                dialect,
                secrets,
                first_token_timeout: config.first_token_timeout,
                idle_timeout: config.idle_timeout,
                total_timeout: config.total_timeout,
                max_retries: config.max_retries,
                retry_backoff: config.retry_backoff,
            }),
        })
    }

    /// The provider's models, as OpenAI's list (`{"object":"list","data":[{"id",…}]}`), within
    /// the first-token deadline; not retried (the caller may ask again).
    pub async fn models(&self) -> Result<Value, UpstreamError> {
        let inner = &self.inner;
        let ask = async {
            let mut response = inner.models.send(&[], &[]).await.map_err(send_error)?;
            if !response.status.is_success() {
                return Err(UpstreamError::Http {
                    status: response.status.as_u16(),
                    message: error_message(response).await,
                });
            }
            let body = read_body(&mut response, MAX_MODELS_BODY_BYTES)
                .await
                .map_err(body_error)?;
            let answer: Value = serde_json::from_slice(&body).map_err(protocol)?;
            Ok(inner.dialect.models(answer))
        };
        match tokio::time::timeout(inner.first_token_timeout, ask).await {
            Ok(answer) => answer.map_err(|error| inner.redact(error)),
            Err(_) => Err(UpstreamError::Timeout("first_token")),
        }
    }

    /// Starts one streaming chat completion. `request` is the client's body; `stream: true` and
    /// `stream_options.include_usage: true` are forced. Dropping the stream cancels the call.
    ///
    /// The first-token and total deadlines run from this call. The stream ends after its first
    /// error. `model` labels the attempt metrics: the generation's model label, which is the
    /// client's model name even when the upstream is asked for another (a prefix route).
    pub fn stream(
        &self,
        request: Map<String, Value>,
        model: SharedString,
    ) -> impl Stream<Item = Result<UpstreamEvent, UpstreamError>> + Send + 'static {
        let now = Instant::now();
        let deadlines = Deadlines {
            first_token: deadline_after(now, self.inner.first_token_timeout),
            total: deadline_after(now, self.inner.total_timeout),
        };
        let start = Phase::Open(self.inner.clone(), request, model, deadlines);
        let inner = self.inner.clone();
        let events = futures_util::stream::unfold(start, |phase| async move {
            let mut reader = match phase {
                Phase::Open(inner, request, model, deadlines) => {
                    let span = tracing::info_span!("upstream_request");
                    let opened = open(&inner, request, &model, deadlines);
                    match tracing::Instrument::instrument(opened, span).await {
                        Ok(response) => Box::new(Reader::new(
                            response,
                            inner.dialect.decoder(),
                            deadlines,
                            inner.idle_timeout,
                        )),
                        Err(error) => return Some((Err(error), Phase::Done)),
                    }
                }
                Phase::Read(reader) => reader,
                Phase::Done => return None,
            };
            match reader.next().await? {
                Ok(event) => Some((Ok(event), Phase::Read(reader))),
                Err(error) => Some((Err(error), Phase::Done)),
            }
        });
        events.map(move |item| item.map_err(|error| inner.redact(error)))
    }
}

impl Inner {
    /// Errors leave the upstream without credentials: they reach every viewer and the log.
    fn redact(&self, error: UpstreamError) -> UpstreamError {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        error.redacted(|text| redact::redact(text, &secrets))
    }
}

/// Where a call's stream stands between two items. The reader is boxed once per call so that
/// each item moves a pointer, not the whole reader.
enum Phase {
    Open(Arc<Inner>, Map<String, Value>, SharedString, Deadlines),
    Read(Box<Reader>),
    Done,
}

/// The call's fixed deadlines; the idle deadline moves with each chunk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadlines {
    pub(super) first_token: Instant,
    pub(super) total: Instant,
}

impl Deadlines {
    /// The earliest deadline still running, with its name for [`UpstreamError::Timeout`].
    pub(super) fn earliest(&self, token_seen: bool) -> (Instant, &'static str) {
        if !token_seen && self.first_token < self.total {
            (self.first_token, "first_token")
        } else {
            (self.total, "total")
        }
    }
}

/// `now + timeout`, where an absurd configured timeout means "never" rather than a panic.
pub(super) fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now + timeout.min(CENTURY)
}

/// `Accept`, `Content-Type`, the configured extra headers and the dialect's key headers.
fn default_headers(
    config: &UpstreamConfig,
    dialect: &dyn Dialect,
) -> Result<HeaderMap, UpstreamError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("tokenfan/", env!("CARGO_PKG_VERSION"))),
    );
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (position, line) in config.headers.iter().enumerate() {
        if line.trim().is_empty() {
            continue; // A trailing `;` in TOKENFAN_UPSTREAM_HEADERS.
        }
        // The value is never echoed: extra headers often carry keys.
        let (name, value) = parse_header(line).ok_or_else(|| {
            invalid_config(format!(
                "upstream header #{} is not a valid `Name: value` header",
                position + 1
            ))
        })?;
        headers.append(name, value);
    }
    if let Some(key) = &config.api_key {
        for (name, value) in dialect.key_headers(key.expose()) {
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| invalid_config("the upstream API key is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
    }
    Ok(headers)
}

fn parse_header(line: &str) -> Option<(HeaderName, HeaderValue)> {
    let (name, value) = line.split_once(':')?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
    let mut value = HeaderValue::from_str(value.trim()).ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

/// Configuration errors surface as connect errors: the gateway cannot reach the upstream.
fn invalid_config(message: impl Into<String>) -> UpstreamError {
    UpstreamError::Connect(message.into())
}

/// Why one attempt failed, and whether another may succeed.
struct Failure {
    error: UpstreamError,
    retryable: bool,
    /// The provider's `Retry-After`, replacing our backoff.
    retry_after: Option<Duration>,
}

/// Sends the request until a 2xx event stream answers, retrying failures without a response,
/// 429 and 5xx with jittered exponential backoff. Gives up early when the wait would outlast the
/// first-token deadline: the provider's own error says more than a timeout would.
async fn open(
    inner: &Inner,
    request: Map<String, Value>,
    model: &SharedString,
    deadlines: Deadlines,
) -> Result<Response, UpstreamError> {
    let body = inner.dialect.request_body(request)?;
    // The provider's spans join the trace as children of this call's span.
    let extra_head = crate::telemetry::trace::traceparent()
        .map(|traceparent| format!("traceparent: {traceparent}\r\n"))
        .unwrap_or_default();
    let (deadline, which) = deadlines.earliest(false);
    let mut attempt = 0;
    loop {
        let sent = Instant::now();
        let answer = timeout_at(deadline, send(inner, extra_head.as_bytes(), body.clone())).await;
        let status = match &answer {
            Ok(Ok(response)) => Some(response.status.as_u16()),
            Ok(Err(Failure {
                error: UpstreamError::Http { status, .. },
                ..
            })) => Some(*status),
            _ => None,
        };
        crate::metrics::record_upstream_attempt(model, status, answer.is_err(), sent.elapsed());
        let failure = match answer {
            Err(_) => return Err(UpstreamError::Timeout(which)),
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(failure)) => failure,
        };
        let delay = failure
            .retry_after
            .unwrap_or_else(|| backoff(inner.retry_backoff, attempt));
        let retry_at = Instant::now().checked_add(delay);
        let error = inner.redact(failure.error);
        if !failure.retryable
            || attempt >= inner.max_retries
            || retry_at.is_none_or(|at| at >= deadline)
        {
            return Err(error);
        }
        attempt += 1;
        crate::metrics::record_upstream_retry(model);
        tracing::warn!(
            attempt,
            max_retries = inner.max_retries,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %LogSafe(&error.to_string()),
            "retrying the upstream request"
        );
        tokio::time::sleep(delay).await;
    }
}

/// One attempt: a 2xx `text/event-stream` response, or why not.
async fn send(inner: &Inner, extra_head: &[u8], body: Bytes) -> Result<Response, Failure> {
    let response = inner
        .client
        .send(extra_head, &body)
        .await
        .map_err(|error| Failure {
            // No response means no token: retrying is always safe.
            retryable: true,
            error: send_error(error),
            retry_after: None,
        })?;
    let status = response.status;
    if status.is_success() {
        return match content_type_essence(&response.headers) {
            Some(essence) if essence.eq_ignore_ascii_case("text/event-stream") => Ok(response),
            other => Err(Failure {
                error: UpstreamError::Protocol(format!(
                    "expected a text/event-stream response, got content-type {:?}",
                    truncated(other.unwrap_or("none"))
                )),
                retryable: false,
                retry_after: None,
            }),
        };
    }
    let retry_after = retry_after(&response.headers, SystemTime::now());
    Err(Failure {
        error: UpstreamError::Http {
            status: status.as_u16(),
            message: error_message(response).await,
        },
        retryable: status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
        retry_after,
    })
}

fn send_error(error: HttpError) -> UpstreamError {
    match error {
        HttpError::Connect(message) => UpstreamError::Connect(message),
        HttpError::ConnectTimeout => UpstreamError::Timeout("connect"),
        other => UpstreamError::Interrupted(other.to_string()),
    }
}

/// `text/event-stream` of `text/event-stream; charset=utf-8`.
fn content_type_essence(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    value.split(';').next().map(str::trim)
}

/// The provider's `Retry-After`, in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `base · 2^attempt`, drawn uniformly from its upper half so that the retries of many
/// generations failing together spread out.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(16));
    ceiling / 2 + (ceiling / 2).mul_f64(rand::random::<f64>())
}

/// The provider's `error.message` from an error response; else the start of its body; else
/// the status's reason phrase.
async fn error_message(mut response: Response) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: Value,
    }
    let status = response.status;
    // A body cut short still has a start worth showing.
    let body = read_body(&mut response, MAX_ERROR_BODY_BYTES)
        .await
        .unwrap_or_default();
    if let Ok(ErrorBody { error }) = serde_json::from_slice(&body) {
        return provider_message(&error);
    }
    let text = String::from_utf8_lossy(&body);
    match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("no reason given")
            .to_owned(),
        text => truncated(text),
    }
}

/// A response body up to about `limit` bytes (whole chunks: at most one chunk beyond).
async fn read_body(response: &mut Response, limit: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.body.chunk().await? {
            Some(chunk) => body.extend_from_slice(&chunk),
            None => break,
        }
    }
    Ok(body)
}

/// The message of an OpenAI error object (`{"message": …}`), or of a bare error string.
pub(super) fn provider_message(error: &Value) -> String {
    match error
        .get("message")
        .and_then(Value::as_str)
        .or(error.as_str())
    {
        Some(message) => truncated(message),
        None => truncated(&error.to_string()),
    }
}

pub(super) fn truncated(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let header = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(header("7"), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(header(&later), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(header(&earlier), Some(Duration::ZERO));
        assert_eq!(header("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_in_the_upper_half() {
        let base = Duration::from_millis(100);
        for _ in 0..100 {
            let first = backoff(base, 0);
            assert!(first >= base / 2 && first <= base, "{first:?}");
            let fourth = backoff(base, 3);
            assert!(fourth >= base * 4 && fourth <= base * 8, "{fourth:?}");
        }
        assert!(backoff(base, u32::MAX) > Duration::ZERO);
    }
}
