//! The OpenAI-compatible chat-completions client: one streaming request per generation.
//!
//! A call has two phases. [`open`] sends the request and retries failures without a response
//! (connect errors, resets), 429 and 5xx until a 2xx `text/event-stream` answers; no token
//! exists yet, so a retry cannot duplicate one. [`Reader`] then decodes the body into
//! [`UpstreamEvent`]s and never retries. The HTTP client ([`http1`]) only applies the connect
//! timeout; every other deadline (first token, idle gap, total) is enforced here with one tokio
//! timer per call.

use std::{
    borrow::Cow,
    fmt,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::{FutureExt, Stream};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{
    de::{SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::{Map, Value};
use tokio::time::{timeout_at, Instant, Sleep};

use super::{
    http1::{self, HttpError, Response},
    sse::SseDecoder,
    UpstreamError, UpstreamEvent,
};
use crate::config::UpstreamConfig;

/// Provider messages are cut to this many characters: they end up in every subscriber's
/// `error` event and in logs.
const MAX_MESSAGE_CHARS: usize = 500;

/// Most bytes read from an error response's body to find its message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Idle pooled connections are closed after this; providers drop theirs after about a minute.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// TCP keep-alive probes find a provider that vanished without a FIN under a long generation.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A client for one OpenAI-compatible provider; cheap to clone, shared by all generations.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    client: http1::Client,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    total_timeout: Duration,
    max_retries: u32,
    retry_backoff: Duration,
}

impl Upstream {
    /// `base_url` ends in `/v1`; requests go to `{base_url}/chat/completions`.
    pub fn new(config: &UpstreamConfig, base_url: &str) -> Result<Self, UpstreamError> {
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let url = url::Url::parse(&url)
            .map_err(|error| invalid_config(format!("invalid upstream URL: {error}")))?;
        let proxy = config
            .proxy
            .as_ref()
            .map(|proxy| url::Url::parse(proxy.expose()))
            .transpose()
            .map_err(|_| invalid_config("the upstream proxy is not a valid URL"))?;
        let client = http1::Client::new(&http1::Settings {
            url: &url,
            proxy: proxy.as_ref(),
            headers: &default_headers(config)?,
            ca_file: config.ca_file.as_deref(),
            connect_timeout: config.connect_timeout,
            tcp_keepalive: TCP_KEEPALIVE,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
        })
        .map_err(|error| invalid_config(format!("invalid upstream settings: {error}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                first_token_timeout: config.first_token_timeout,
                idle_timeout: config.idle_timeout,
                total_timeout: config.total_timeout,
                max_retries: config.max_retries,
                retry_backoff: config.retry_backoff,
            }),
        })
    }

    /// Starts one streaming chat completion. `request` is the client's body; `stream: true` and
    /// `stream_options.include_usage: true` are forced. Dropping the stream cancels the call.
    ///
    /// The first-token and total deadlines run from this call. The stream ends after its first
    /// error.
    pub fn stream(
        &self,
        request: Map<String, Value>,
    ) -> impl Stream<Item = Result<UpstreamEvent, UpstreamError>> + Send + 'static {
        let now = Instant::now();
        let deadlines = Deadlines {
            first_token: deadline_after(now, self.inner.first_token_timeout),
            total: deadline_after(now, self.inner.total_timeout),
        };
        let start = Phase::Open(self.inner.clone(), request, deadlines);
        futures_util::stream::unfold(start, |phase| async move {
            let mut reader = match phase {
                Phase::Open(inner, request, deadlines) => {
                    let span = tracing::info_span!("upstream_request");
                    match tracing::Instrument::instrument(open(&inner, request, deadlines), span)
                        .await
                    {
                        Ok(response) => {
                            Box::new(Reader::new(response, deadlines, inner.idle_timeout))
                        }
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
        })
    }
}

/// Where a call's stream stands between two items. The reader is boxed once per call so that
/// each item moves a pointer, not the whole reader.
enum Phase {
    Open(Arc<Inner>, Map<String, Value>, Deadlines),
    Read(Box<Reader>),
    Done,
}

/// The call's fixed deadlines; the idle deadline moves with each chunk.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    first_token: Instant,
    total: Instant,
}

impl Deadlines {
    /// The earliest deadline still running, with its name for [`UpstreamError::Timeout`].
    fn earliest(&self, token_seen: bool) -> (Instant, &'static str) {
        if !token_seen && self.first_token < self.total {
            (self.first_token, "first_token")
        } else {
            (self.total, "total")
        }
    }
}

/// `now + timeout`, where an absurd configured timeout means "never" rather than a panic.
fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now + timeout.min(CENTURY)
}

/// `Accept`, `Content-Type`, the configured extra headers and the bearer key.
fn default_headers(config: &UpstreamConfig) -> Result<HeaderMap, UpstreamError> {
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
        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| invalid_config("the upstream API key is not a valid header value"))?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
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

/// Serializes the client's request with streaming and usage reporting forced on; other
/// `stream_options` fields are kept.
fn streaming_body(mut request: Map<String, Value>) -> Result<Bytes, UpstreamError> {
    request.insert("stream".to_owned(), Value::Bool(true));
    let options = request.entry("stream_options").or_insert(Value::Null);
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    if let Value::Object(options) = options {
        options.insert("include_usage".to_owned(), Value::Bool(true));
    }
    serde_json::to_vec(&request)
        .map(Bytes::from)
        .map_err(|error| UpstreamError::Protocol(format!("cannot encode the request: {error}")))
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
    deadlines: Deadlines,
) -> Result<Response, UpstreamError> {
    let model = crate::metrics::model_label(&request);
    let body = streaming_body(request)?;
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
        crate::metrics::record_upstream_attempt(&model, status, answer.is_err(), sent.elapsed());
        let failure = match answer {
            Err(_) => return Err(UpstreamError::Timeout(which)),
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(failure)) => failure,
        };
        let delay = failure
            .retry_after
            .unwrap_or_else(|| backoff(inner.retry_backoff, attempt));
        let retry_at = Instant::now().checked_add(delay);
        if !failure.retryable
            || attempt >= inner.max_retries
            || retry_at.is_none_or(|at| at >= deadline)
        {
            return Err(failure.error);
        }
        attempt += 1;
        crate::metrics::record_upstream_retry(&model);
        tracing::warn!(
            attempt,
            max_retries = inner.max_retries,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %failure.error,
            "retrying the upstream request"
        );
        tokio::time::sleep(delay).await;
    }
}

/// One attempt: a 2xx `text/event-stream` response, or why not.
async fn send(inner: &Inner, extra_head: &[u8], body: Bytes) -> Result<Response, Failure> {
    let response = inner
        .client
        .post(extra_head, &body)
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

/// A failure while reading the body: the stream was cut, or it broke HTTP framing.
fn body_error(error: HttpError) -> UpstreamError {
    match error {
        HttpError::Protocol(message) => UpstreamError::Protocol(message),
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
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.body.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
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

/// The message of an OpenAI error object (`{"message": …}`), or of a bare error string.
fn provider_message(error: &Value) -> String {
    match error
        .get("message")
        .and_then(Value::as_str)
        .or(error.as_str())
    {
        Some(message) => truncated(message),
        None => truncated(&error.to_string()),
    }
}

fn truncated(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Reads one open event stream into events; never retries.
struct Reader {
    body: http1::Body,
    decoder: SseDecoder,
    pending: ChunkEvents,
    deadlines: Deadlines,
    idle_timeout: Duration,
    /// One timer for the whole call, moved forward before each read: pushing a deadline later
    /// is an atomic update, where a fresh timeout per chunk registers in and leaves the timer
    /// wheel under its lock every time (visible in profiles of the token path).
    deadline: Pin<Box<Sleep>>,
    token_seen: bool,
    finish_seen: bool,
    done: bool,
}

impl Reader {
    fn new(response: Response, deadlines: Deadlines, idle_timeout: Duration) -> Self {
        Self {
            body: response.body,
            decoder: SseDecoder::default(),
            pending: ChunkEvents::default(),
            deadlines,
            idle_timeout,
            deadline: Box::pin(tokio::time::sleep_until(deadlines.first_token)),
            token_seen: false,
            finish_seen: false,
            done: false,
        }
    }

    async fn next(&mut self) -> Option<Result<UpstreamEvent, UpstreamError>> {
        loop {
            if let Some(event) = self.pending.pop() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if let Err(error) = self.fill().await {
                return Some(Err(error));
            }
        }
    }

    /// Decodes buffered events until one yields something, else reads one more chunk.
    async fn fill(&mut self) -> Result<(), UpstreamError> {
        while let Some(data) = self.decoder.next_data().map_err(protocol)? {
            if data.trim_ascii() == "[DONE]" {
                self.done = true;
                self.release_connection();
                return Ok(());
            }
            let events = decode_chunk(data)?;
            self.token_seen |= events.token.is_some();
            self.finish_seen |= events.finish.is_some();
            if !events.is_empty() {
                self.pending = events;
                return Ok(());
            }
        }
        match self.read_chunk().await? {
            Some(chunk) => self.decoder.push(&chunk),
            // Some providers end the body after the finish_reason without `[DONE]`.
            None if self.finish_seen => self.done = true,
            None => {
                return Err(UpstreamError::Interrupted(
                    "the stream ended before a finish_reason or [DONE]".to_owned(),
                ))
            }
        }
        Ok(())
    }

    /// The next body chunk (`None` at the end), within the idle, first-token and total deadlines.
    async fn read_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let (mut deadline, mut which) = self.deadlines.earliest(self.token_seen);
        let idle = deadline_after(Instant::now(), self.idle_timeout);
        if idle < deadline {
            (deadline, which) = (idle, "idle");
        }
        self.deadline.as_mut().reset(deadline);
        tokio::select! {
            biased;
            chunk = self.body.chunk() => chunk.map_err(body_error),
            () = self.deadline.as_mut() => Err(UpstreamError::Timeout(which)),
        }
    }

    /// After `[DONE]` the body's end is usually already buffered: reading it now returns the
    /// connection to the pool instead of closing it, which at thousands of generations a second
    /// spares the client's ephemeral ports. Never waits.
    fn release_connection(&mut self) {
        let _ = self.body.chunk().now_or_never();
    }
}

fn protocol(error: impl fmt::Display) -> UpstreamError {
    UpstreamError::Protocol(error.to_string())
}

/// What one `chat.completion.chunk` carries for us, yielded in this order.
#[derive(Debug, Default, PartialEq)]
struct ChunkEvents {
    token: Option<String>,
    finish: Option<String>,
    usage: Option<Value>,
}

impl ChunkEvents {
    fn is_empty(&self) -> bool {
        self.token.is_none() && self.finish.is_none() && self.usage.is_none()
    }

    fn pop(&mut self) -> Option<UpstreamEvent> {
        if let Some(text) = self.token.take() {
            return Some(UpstreamEvent::Token(text));
        }
        if let Some(reason) = self.finish.take() {
            return Some(UpstreamEvent::Finish(reason));
        }
        self.usage.take().map(UpstreamEvent::Usage)
    }
}

/// A `chat.completion.chunk`, borrowing from the event data: parsing a token chunk allocates
/// nothing but the token's text.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Option<FirstChoice<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// `choices` reduced to the choice with index 0 (with `n > 1` the others interleave), without
/// collecting a `Vec` per chunk.
struct FirstChoice<'a>(Option<Choice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Choices<'a>(PhantomData<Choice<'a>>);

        impl<'de: 'a, 'a> Visitor<'de> for Choices<'a> {
            type Value = FirstChoice<'a>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an array of choices")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut first = None;
                while let Some(choice) = seq.next_element::<Choice<'a>>()? {
                    if choice.index == 0 && first.is_none() {
                        first = Some(choice);
                    }
                }
                Ok(FirstChoice(first))
            }
        }

        deserializer.deserialize_seq(Choices(PhantomData))
    }
}

/// Turns one event's data into events.
///
/// A chunk with neither a choice, a final usage nor an error is ignored rather than rejected:
/// compatible providers interleave such chunks (Azure's `prompt_filter_results`, heartbeat
/// objects), and a stream that never finishes is still caught at its end.
fn decode_chunk(data: &str) -> Result<ChunkEvents, UpstreamError> {
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|error| protocol(format_args!("invalid JSON in a stream chunk: {error}")))?;
    if let Some(error) = chunk.error {
        return Err(UpstreamError::Provider(provider_message(&error)));
    }
    let choice = chunk.choices.and_then(|choices| choices.0);
    let has_choice = choice.is_some();
    let (token, finish) = match choice {
        Some(Choice {
            delta,
            finish_reason,
            ..
        }) => (
            delta
                .and_then(|delta| delta.content)
                .filter(|content| !content.is_empty())
                .map(Cow::into_owned),
            finish_reason.map(Cow::into_owned),
        ),
        None => (None, None),
    };
    // The final usage rides alone (`choices: []`, OpenAI) or next to the finish_reason (some
    // compatible servers). Usage on every chunk (vLLM's continuous stats) is not the total.
    let usage = chunk
        .usage
        .filter(|usage| usage.is_object() && (!has_choice || finish.is_some()));
    Ok(ChunkEvents {
        token,
        finish,
        usage,
    })
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use futures_util::StreamExt;
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    use serde_json::json;
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
    };
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::config::Secret;

    /// What the scripted provider does on one connection after reading the request. The
    /// connection closes after the last step.
    enum Step {
        Write(String),
        /// Reads the next request on the same (kept-alive) connection.
        Request,
        /// Writes this every interval until the client goes away.
        Repeat(String, Duration),
        /// Keeps the connection open until the client closes it, then reports a hang-up.
        Hang,
    }

    struct Provider {
        base_url: String,
        /// Each request as received, head and body.
        requests: mpsc::UnboundedReceiver<String>,
        hangups: mpsc::UnboundedReceiver<()>,
    }

    /// A provider on 127.0.0.1:0 that plays the n-th script to the n-th connection, then stops
    /// listening (so an unexpected retry fails to connect).
    async fn provider(scripts: Vec<Vec<Step>>) -> Provider {
        serve(scripts, None).await
    }

    /// The same over TLS, with a certificate for 127.0.0.1 signed by `testdata/ca.pem`.
    async fn tls_provider(scripts: Vec<Vec<Step>>) -> Provider {
        let dir = std::path::Path::new(TESTDATA);
        let certificates = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certificates, key)
            .unwrap();
        serve(scripts, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/upstream/testdata");

    async fn serve(scripts: Vec<Vec<Step>>, tls: Option<TlsAcceptor>) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A trailing slash, as users write it.
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}/v1/", listener.local_addr().unwrap());
        let (request_tx, requests) = mpsc::unbounded_channel();
        let (hangup_tx, hangups) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for script in scripts {
                let (socket, _) = listener.accept().await.unwrap();
                let (requests, hangups) = (request_tx.clone(), hangup_tx.clone());
                match tls.clone() {
                    None => tokio::spawn(play(socket, script, requests, hangups)),
                    Some(acceptor) => tokio::spawn(async move {
                        // A client that refuses the certificate ends the handshake.
                        if let Ok(socket) = acceptor.accept(socket).await {
                            play(socket, script, requests, hangups).await;
                        }
                    }),
                };
            }
        });
        Provider {
            base_url,
            requests,
            hangups,
        }
    }

    async fn play(
        mut socket: impl AsyncRead + AsyncWrite + Unpin,
        script: Vec<Step>,
        requests: mpsc::UnboundedSender<String>,
        hangups: mpsc::UnboundedSender<()>,
    ) {
        let _ = requests.send(read_request(&mut socket).await);
        for step in script {
            match step {
                Step::Write(bytes) => {
                    if write(&mut socket, &bytes).await.is_err() {
                        return;
                    }
                }
                Step::Request => {
                    let _ = requests.send(read_request(&mut socket).await);
                }
                Step::Repeat(bytes, interval) => {
                    while write(&mut socket, &bytes).await.is_ok() {
                        tokio::time::sleep(interval).await;
                    }
                    return;
                }
                Step::Hang => {
                    let mut buf = [0; 1024];
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = hangups.send(());
                    return;
                }
            }
        }
    }

    async fn write(socket: &mut (impl AsyncWrite + Unpin), text: &str) -> std::io::Result<()> {
        socket.write_all(text.as_bytes()).await?;
        socket.flush().await
    }

    async fn read_request(socket: &mut (impl AsyncRead + Unpin)) -> String {
        let mut request = Vec::new();
        let mut buf = [0; 4096];
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "client closed before sending its request");
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .to_ascii_lowercase()
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse().unwrap());
                if body.len() >= length {
                    return text;
                }
            }
        }
    }

    const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    /// The head of a response after which the connection may carry another request.
    const SSE_HEAD_KEEP_ALIVE: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                       transfer-encoding: chunked\r\n\r\n";
    const LAST_CHUNK: &str = "0\r\n\r\n";

    /// One HTTP chunk holding these SSE bytes.
    fn chunk(sse: &str) -> String {
        format!("{:x}\r\n{sse}\r\n", sse.len())
    }

    fn event(data: &str) -> String {
        chunk(&format!("data: {data}\n\n"))
    }

    fn token(text: &str) -> String {
        event(&completion_chunk(json!({"content": text}), Value::Null))
    }

    fn finish(reason: &str) -> String {
        event(&completion_chunk(json!({}), json!(reason)))
    }

    fn completion_chunk(delta: Value, finish_reason: Value) -> String {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            "usage": null,
        })
        .to_string()
    }

    fn usage_event() -> String {
        event(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#,
        )
    }

    fn http_error(status: &str, extra_headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n{extra_headers}\r\n{body}",
            body.len()
        )
    }

    fn ok_stream() -> Vec<Step> {
        let body = [
            SSE_HEAD,
            &token("Hi"),
            &finish("stop"),
            &event("[DONE]"),
            LAST_CHUNK,
        ];
        vec![Step::Write(body.concat())]
    }

    fn config() -> UpstreamConfig {
        UpstreamConfig {
            url: None,
            api_key: Some(Secret::new("sk-test-key")),
            headers: vec!["X-Org: acme".to_owned(), String::new()],
            proxy: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            first_token_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            total_timeout: Duration::from_secs(5),
            max_retries: 2,
            retry_backoff: Duration::from_millis(10),
        }
    }

    fn request() -> Map<String, Value> {
        let request = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": false,
            "stream_options": {"continuous_usage_stats": false},
        });
        request.as_object().unwrap().clone()
    }

    /// The events of a stream, and the error that ended it, if any.
    async fn run(
        config: UpstreamConfig,
        base_url: &str,
    ) -> (Vec<UpstreamEvent>, Option<UpstreamError>) {
        let upstream = Upstream::new(&config, base_url).unwrap();
        let mut stream = std::pin::pin!(upstream.stream(request()));
        let mut events = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => events.push(event),
                Err(error) => {
                    assert!(
                        stream.next().await.is_none(),
                        "the stream ends after an error"
                    );
                    return (events, Some(error));
                }
            }
        }
        (events, None)
    }

    /// Plays one response to the first connection (a retry fails to connect) and runs a
    /// stream against it.
    async fn run_response(response: &[&str]) -> (Vec<UpstreamEvent>, Option<UpstreamError>) {
        let provider = provider(vec![vec![Step::Write(response.concat())]]).await;
        run(config(), &provider.base_url).await
    }

    /// Checks that a call whose first connection gets `first` is retried, once, and streams
    /// the second connection's answer.
    async fn retried_then_streams(first: Vec<Step>) {
        let mut provider = provider(vec![first, ok_stream()]).await;

        let (events, error) = run(config(), &provider.base_url).await;

        assert!(error.is_none(), "{error:?}");
        assert_eq!(events, hi_stop());
        provider.requests.recv().await.unwrap();
        provider.requests.recv().await.unwrap();
    }

    fn hi() -> UpstreamEvent {
        UpstreamEvent::Token("Hi".to_owned())
    }

    fn hi_stop() -> Vec<UpstreamEvent> {
        vec![hi(), UpstreamEvent::Finish("stop".to_owned())]
    }

    #[tokio::test]
    async fn streams_tokens_finish_and_usage_until_done() {
        let body = [
            SSE_HEAD,
            &event(&completion_chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )),
            &chunk(": OPENROUTER PROCESSING\n\n"),
            &token("Hel"),
            &token("lo"),
            &finish("stop"),
            &usage_event(),
            &event("[DONE]"),
            &token("never read"),
            LAST_CHUNK,
        ];
        let mut provider = provider(vec![vec![Step::Write(body.concat())]]).await;

        let (events, error) = run(config(), &provider.base_url).await;

        assert!(error.is_none(), "{error:?}");
        assert_eq!(
            events,
            [
                UpstreamEvent::Token("Hel".to_owned()),
                UpstreamEvent::Token("lo".to_owned()),
                UpstreamEvent::Finish("stop".to_owned()),
                UpstreamEvent::Usage(
                    json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
                ),
            ]
        );
        let received = provider.requests.recv().await.unwrap();
        let (head, body) = received.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(
            head.starts_with("post /v1/chat/completions http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nauthorization: bearer sk-test-key\r\n"));
        assert!(head.contains("\r\nx-org: acme\r\n"));
        assert!(head.contains("\r\naccept: text/event-stream\r\n"));
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["stream"], json!(true));
        assert_eq!(
            body["stream_options"],
            json!({"continuous_usage_stats": false, "include_usage": true})
        );
        assert_eq!(body["messages"], request()["messages"]);
    }

    fn keep_alive_stream() -> String {
        [
            SSE_HEAD_KEEP_ALIVE,
            &token("Hi"),
            &finish("stop"),
            &event("[DONE]"),
            LAST_CHUNK,
        ]
        .concat()
    }

    /// Streams one call on `upstream` to its end.
    async fn call(upstream: &Upstream) -> Vec<UpstreamEvent> {
        let stream = upstream.stream(request());
        stream.map(Result::unwrap).collect().await
    }

    #[tokio::test]
    async fn a_finished_stream_leaves_its_connection_for_the_next_call() {
        // One connection only: a second connection would be refused.
        let script = vec![
            Step::Write(keep_alive_stream()),
            Step::Request,
            Step::Write(keep_alive_stream()),
        ];
        let mut provider = provider(vec![script]).await;
        let upstream = Upstream::new(&config(), &provider.base_url).unwrap();

        assert_eq!(call(&upstream).await, hi_stop());
        assert_eq!(call(&upstream).await, hi_stop());

        provider.requests.recv().await.unwrap();
        let second = provider.requests.recv().await.unwrap();
        assert!(
            second.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{second}"
        );
    }

    #[tokio::test]
    async fn a_pooled_connection_the_provider_closed_does_not_fail_the_next_call() {
        // The provider closes the first connection after its response.
        let mut provider =
            provider(vec![vec![Step::Write(keep_alive_stream())], ok_stream()]).await;
        let no_retries = UpstreamConfig {
            max_retries: 0,
            ..config()
        };
        let upstream = Upstream::new(&no_retries, &provider.base_url).unwrap();
        assert_eq!(call(&upstream).await, hi_stop());
        provider.requests.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await; // The FIN arrives.

        assert_eq!(call(&upstream).await, hi_stop());
        provider.requests.recv().await.unwrap();
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_as_it_is_reused_costs_no_retry() {
        // The provider reads the second request on the kept-alive connection, then closes it
        // without answering, as one does when its idle timeout races our request.
        let first = vec![Step::Write(keep_alive_stream()), Step::Request];
        let mut provider = provider(vec![first, ok_stream()]).await;
        let no_retries = UpstreamConfig {
            max_retries: 0,
            ..config()
        };
        let upstream = Upstream::new(&no_retries, &provider.base_url).unwrap();
        assert_eq!(call(&upstream).await, hi_stop());

        assert_eq!(call(&upstream).await, hi_stop());

        for _ in 0..3 {
            provider.requests.recv().await.unwrap();
        }
    }

    /// A `CONNECT` proxy on 127.0.0.1:0 that tunnels each connection where it is asked to and
    /// reports each `CONNECT` head it got.
    async fn connect_proxy() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (heads_tx, heads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                let heads = heads_tx.clone();
                tokio::spawn(async move {
                    let head = read_request(&mut client).await;
                    let target = head.split(' ').nth(1).unwrap().to_owned();
                    let _ = heads.send(head);
                    let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                    write(&mut client, "HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (address, heads)
    }

    #[tokio::test]
    async fn streams_through_an_http_proxy_over_plain_http_and_tls() {
        for tls in [false, true] {
            let provider = if tls {
                tls_provider(vec![ok_stream()]).await
            } else {
                provider(vec![ok_stream()]).await
            };
            let (proxy, mut heads) = connect_proxy().await;
            let config = UpstreamConfig {
                proxy: Some(Secret::new(format!("http://user:p%40ss@{proxy}"))),
                ca_file: Some(format!("{TESTDATA}/ca.pem").into()),
                ..config()
            };

            let (events, error) = run(config, &provider.base_url).await;

            assert!(error.is_none(), "tls {tls}: {error:?}");
            assert_eq!(events, hi_stop());
            let head = heads.recv().await.unwrap();
            let authority = provider.base_url.split('/').nth(2).unwrap();
            assert!(
                head.starts_with(&format!("CONNECT {authority} HTTP/1.1\r\n")),
                "{head}"
            );
            // base64("user:p@ss"): the password is percent-decoded first.
            assert!(
                head.contains("\r\nproxy-authorization: Basic dXNlcjpwQHNz\r\n"),
                "{head}"
            );
        }
    }

    #[tokio::test]
    async fn a_proxy_refusing_the_tunnel_is_a_connect_error_that_hides_its_credentials() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            read_request(&mut client).await;
            let refusal = "HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n";
            write(&mut client, refusal).await.unwrap();
        });
        let config = UpstreamConfig {
            proxy: Some(Secret::new(format!("http://user:sk-secret@{proxy}"))),
            max_retries: 0,
            ..config()
        };

        let (_, error) = run(config, "http://127.0.0.1:1/v1").await;

        let Some(UpstreamError::Connect(message)) = error else {
            panic!("not a connect error: {error:?}");
        };
        assert!(message.contains("407"), "{message}");
        assert!(!message.contains("sk-secret"), "{message}");
    }

    #[tokio::test]
    async fn streams_over_tls_from_a_provider_behind_a_private_ca() {
        let provider = tls_provider(vec![ok_stream()]).await;
        let config = UpstreamConfig {
            ca_file: Some(format!("{TESTDATA}/ca.pem").into()),
            ..config()
        };

        let (events, error) = run(config, &provider.base_url).await;

        assert!(error.is_none(), "{error:?}");
        assert_eq!(events, hi_stop());
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_a_connect_error() {
        let provider = tls_provider(vec![ok_stream()]).await;
        let config = UpstreamConfig {
            max_retries: 0,
            ..config()
        };

        let (events, error) = run(config, &provider.base_url).await;

        assert!(events.is_empty());
        assert!(
            matches!(&error, Some(UpstreamError::Connect(message)) if message.contains("TLS")),
            "{error:?}"
        );
    }

    /// The message of the error `Upstream::new` refuses `config` with.
    fn config_error(config: UpstreamConfig, base_url: &str) -> String {
        Upstream::new(&config, base_url).err().unwrap().to_string()
    }

    #[test]
    fn a_proxy_that_is_not_an_http_url_is_a_configuration_error_without_its_value() {
        for proxy in ["socks5://user:sk-secret@127.0.0.1:1080", "sk-secret"] {
            let config = UpstreamConfig {
                proxy: Some(Secret::new(proxy)),
                ..config()
            };
            let message = config_error(config, "http://127.0.0.1:1/v1");
            assert!(message.contains("proxy"), "{message}");
            assert!(!message.contains("sk-secret"), "{message}");
        }
    }

    #[test]
    fn an_unreadable_ca_file_is_a_configuration_error() {
        let config = UpstreamConfig {
            ca_file: Some(format!("{TESTDATA}/missing.pem").into()),
            ..config()
        };
        let message = config_error(config, "https://127.0.0.1:1/v1");
        assert!(message.contains("missing.pem"), "{message}");
    }

    #[tokio::test]
    async fn server_error_is_retried_then_streams() {
        let overloaded = http_error(
            "500 Internal Server Error",
            "",
            r#"{"error":{"message":"overloaded"}}"#,
        );

        retried_then_streams(vec![Step::Write(overloaded)]).await;
    }

    #[tokio::test]
    async fn connection_closed_before_any_response_is_retried() {
        let hang_up = vec![];

        retried_then_streams(hang_up).await;
    }

    #[tokio::test]
    async fn too_many_requests_waits_for_retry_after() {
        let limited = http_error("429 Too Many Requests", "retry-after: 1\r\n", "{}");
        let started = std::time::Instant::now();

        retried_then_streams(vec![Step::Write(limited)]).await;

        // The 10 ms backoff was replaced by the provider's second.
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn retry_after_past_the_first_token_deadline_fails_at_once() {
        let limited = http_error(
            "429 Too Many Requests",
            "retry-after: 18446744073709551615\r\n", // u64::MAX seconds: must not overflow
            r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
        );
        let started = std::time::Instant::now();

        let (events, error) = run_response(&[&limited]).await;

        assert!(events.is_empty());
        assert!(
            matches!(&error, Some(UpstreamError::Http { status: 429, message }) if message == "Rate limit reached"),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn bad_request_is_not_retried_and_keeps_the_provider_message() {
        let body = r#"{"error":{"message":"Unknown parameter: 'foo'.","type":"invalid_request_error","param":"foo","code":"unknown_parameter"}}"#;
        let mut provider = provider(vec![vec![Step::Write(http_error(
            "400 Bad Request",
            "",
            body,
        ))]])
        .await;

        let (events, error) = run(config(), &provider.base_url).await;

        assert!(events.is_empty());
        let error = error.unwrap();
        assert_eq!(error.code(), "upstream_http_error");
        assert!(
            matches!(&error, UpstreamError::Http { status: 400, message } if message == "Unknown parameter: 'foo'."),
            "{error:?}"
        );
        provider.requests.recv().await.unwrap();
        assert!(
            provider.requests.recv().await.is_none(),
            "no second request"
        );
    }

    #[tokio::test]
    async fn refused_connection_is_retried_then_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        drop(listener);

        let (events, error) = run(config(), &base_url).await;

        assert!(events.is_empty());
        let error = error.unwrap();
        assert_eq!(error.code(), "upstream_connect_error", "{error:?}");
    }

    #[tokio::test]
    async fn provider_that_never_answers_hits_the_first_token_deadline() {
        let provider = provider(vec![vec![Step::Hang]]).await;
        let config = UpstreamConfig {
            first_token_timeout: Duration::from_millis(150),
            ..config()
        };

        let (_, error) = run(config, &provider.base_url).await;

        assert!(
            matches!(error, Some(UpstreamError::Timeout("first_token"))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn mid_stream_error_object_is_a_provider_error() {
        let failure =
            r#"{"error":{"message":"mock failure","type":"server_error","code":"mock_error"}}"#;

        let (events, error) =
            run_response(&[SSE_HEAD, &token("Hi"), &event(failure), LAST_CHUNK]).await;

        assert_eq!(events, [hi()]);
        assert!(
            matches!(&error, Some(UpstreamError::Provider(message)) if message == "mock failure"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn invalid_json_chunk_is_a_protocol_error() {
        let truncated = event("{\"choices\": [tru");

        let (events, error) = run_response(&[SSE_HEAD, &token("Hi"), &truncated, LAST_CHUNK]).await;

        assert_eq!(events, [hi()]);
        assert!(
            matches!(error, Some(UpstreamError::Protocol(_))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn body_ending_after_finish_without_done_completes() {
        let (events, error) =
            run_response(&[SSE_HEAD, &token("Hi"), &finish("stop"), LAST_CHUNK]).await;

        assert!(error.is_none(), "{error:?}");
        assert_eq!(events, hi_stop());
    }

    #[tokio::test]
    async fn body_ending_without_finish_is_interrupted() {
        let (events, error) = run_response(&[SSE_HEAD, &token("Hi"), LAST_CHUNK]).await;

        assert_eq!(events, [hi()]);
        assert!(
            matches!(error, Some(UpstreamError::Interrupted(_))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn connection_drop_mid_stream_is_interrupted_and_not_retried() {
        let body = [SSE_HEAD, &token("Hi")];
        let provider = provider(vec![vec![Step::Write(body.concat())], ok_stream()]).await;

        let (events, error) = run(config(), &provider.base_url).await;

        assert_eq!(events, [hi()]);
        assert!(
            matches!(error, Some(UpstreamError::Interrupted(_))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn idle_gap_longer_than_the_idle_timeout_times_out() {
        let body = [SSE_HEAD, &token("Hi")];
        let provider = provider(vec![vec![Step::Write(body.concat()), Step::Hang]]).await;
        let config = UpstreamConfig {
            idle_timeout: Duration::from_millis(100),
            ..config()
        };

        let (events, error) = run(config, &provider.base_url).await;

        assert_eq!(events, [hi()]);
        assert!(
            matches!(error, Some(UpstreamError::Timeout("idle"))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn keep_alives_without_a_token_hit_the_first_token_deadline() {
        let keep_alive = chunk(": keep-alive\n\n");
        let script = vec![
            Step::Write(SSE_HEAD.to_owned()),
            Step::Repeat(keep_alive, Duration::from_millis(20)),
        ];
        let provider = provider(vec![script]).await;
        let config = UpstreamConfig {
            first_token_timeout: Duration::from_millis(150),
            ..config()
        };

        let (events, error) = run(config, &provider.base_url).await;

        assert!(events.is_empty());
        assert!(
            matches!(error, Some(UpstreamError::Timeout("first_token"))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn total_deadline_ends_an_endless_stream() {
        let script = vec![
            Step::Write(SSE_HEAD.to_owned()),
            Step::Repeat(token("x"), Duration::from_millis(20)),
        ];
        let provider = provider(vec![script]).await;
        let config = UpstreamConfig {
            total_timeout: Duration::from_millis(200),
            ..config()
        };

        let (events, error) = run(config, &provider.base_url).await;

        assert!(!events.is_empty());
        assert!(
            matches!(error, Some(UpstreamError::Timeout("total"))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_endless_response_head_or_chunk_line_is_refused_not_buffered() {
        let endless_head = format!("HTTP/1.1 200 OK\r\nx-filler: {}", "a".repeat(80 * 1024));
        let endless_chunk_line = format!("{SSE_HEAD}{}{}", token("Hi"), "f".repeat(8 * 1024));
        for (response, tokens) in [(endless_head, 0), (endless_chunk_line, 1)] {
            let script = vec![Step::Write(response), Step::Hang];
            let config = UpstreamConfig {
                max_retries: 0,
                ..config()
            };
            let provider = provider(vec![script]).await;

            let (events, error) = run(config, &provider.base_url).await;

            assert_eq!(events.len(), tokens);
            assert!(
                matches!(&error, Some(UpstreamError::Interrupted(message) | UpstreamError::Protocol(message)) if message.contains("longer than")),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn non_event_stream_success_is_a_protocol_error() {
        let json_200 = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\
                        connection: close\r\n\r\n{}";

        let (events, error) = run_response(&[json_200]).await;

        assert!(events.is_empty());
        assert!(
            matches!(error, Some(UpstreamError::Protocol(_))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_the_connection() {
        let body = [SSE_HEAD, &token("Hi")];
        let mut provider = provider(vec![vec![Step::Write(body.concat()), Step::Hang]]).await;
        let upstream = Upstream::new(&config(), &provider.base_url).unwrap();
        let mut stream = Box::pin(upstream.stream(request()));
        assert_eq!(stream.next().await.unwrap().unwrap(), hi());

        drop(stream);

        let hangup = tokio::time::timeout(Duration::from_secs(2), provider.hangups.recv());
        assert_eq!(hangup.await, Ok(Some(())));
    }

    #[test]
    fn invalid_extra_header_fails_without_echoing_its_value() {
        for header in [
            "X-Api-Key sk-secret-1",
            "Bad Name: sk-secret-1",
            "X-Key: sk-\n1",
        ] {
            let config = UpstreamConfig {
                headers: vec![header.to_owned()],
                ..config()
            };
            let message = config_error(config, "http://127.0.0.1:1/v1");
            assert!(message.contains("upstream header #1"), "{message}");
            assert!(!message.contains("sk-"), "{message}");
        }
    }

    #[test]
    fn request_body_forces_streaming_and_usage() {
        let mut request = request();
        request.insert("stream_options".to_owned(), json!("nonsense"));
        let body: Value = serde_json::from_slice(&streaming_body(request).unwrap()).unwrap();
        assert_eq!(body["stream"], json!(true));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(body["model"], json!("m"));
    }

    fn decoded(data: Value) -> ChunkEvents {
        decode_chunk(&data.to_string()).unwrap()
    }

    #[test]
    fn chunks_decode_into_events() {
        let role =
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
        assert!(decoded(role).is_empty());
        let escaped = json!({"choices": [{"index": 0, "delta": {"content": "a\"b\n"}}]});
        assert_eq!(decoded(escaped).token.as_deref(), Some("a\"b\n"));
        let null_content =
            json!({"choices": [{"index": 0, "delta": {"content": null, "refusal": null}}]});
        assert!(decoded(null_content).is_empty());
        let other_choice = json!({"choices": [{"index": 1, "delta": {"content": "x"}}]});
        assert!(decoded(other_choice).is_empty());
        let no_choices = json!({"id": "x", "prompt_filter_results": []});
        assert!(decoded(no_choices).is_empty());
        let null_choices = json!({"choices": null, "usage": {"total_tokens": 3}});
        assert_eq!(
            decoded(null_choices).usage,
            Some(json!({"total_tokens": 3}))
        );
    }

    #[test]
    fn usage_counts_only_on_the_final_chunk() {
        let running = json!({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"total_tokens": 1}});
        assert_eq!(decoded(running).usage, None);
        let last = json!({
            "choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": "length"}],
            "usage": {"total_tokens": 2},
        });
        let mut events = decoded(last);
        assert_eq!(events.pop(), Some(UpstreamEvent::Token("y".to_owned())));
        assert_eq!(
            events.pop(),
            Some(UpstreamEvent::Finish("length".to_owned()))
        );
        assert_eq!(
            events.pop(),
            Some(UpstreamEvent::Usage(json!({"total_tokens": 2})))
        );
        assert_eq!(events.pop(), None);
    }

    #[test]
    fn provider_errors_keep_a_bounded_message() {
        let bare = decode_chunk(r#"{"error":"boom"}"#).err().unwrap();
        assert!(matches!(&bare, UpstreamError::Provider(message) if message == "boom"));
        let long = json!({"error": {"message": "é".repeat(2 * MAX_MESSAGE_CHARS)}});
        let UpstreamError::Provider(message) = decode_chunk(&long.to_string()).err().unwrap()
        else {
            panic!("not a provider error");
        };
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

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
