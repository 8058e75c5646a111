//! The embedded mock LLM: an OpenAI-compatible chat-completions server.
//!
//! It is what `tokenfan serve` streams from when no `--upstream-url` is given, what
//! `tokenfan mock-upstream` runs alone, and the token source of the load test. Its text is
//! deterministic for a seed and its behaviour is steered per request by a `"mock"` object in the
//! body (token count, pacing, latency stamps, injected failures; see CONTRACT.md).
//!
//! This file holds the HTTP side (routes, request counters, injected statuses). `knobs` reads a
//! request, `script` decides what is said and when, `wire` encodes it as OpenAI JSON and SSE,
//! `anthropic` as Anthropic's Messages event stream (`POST /v1/messages`).

mod anthropic;
mod knobs;
mod script;
#[cfg(test)]
mod tests;
mod wire;

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    future::Future,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
    Json, Router,
};
use clap::Args;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::parse_duration;
use knobs::InjectedStatus;
use wire::Meta;

/// The one model the mock serves; a request's own `model` is echoed back instead when given.
const MODEL: &str = "tokenfan-mock";

const DEFAULT_TOKENS: u32 = 60;
const DEFAULT_INTERVAL: Interval = Interval {
    min: Duration::from_millis(20),
    max: Duration::from_millis(80),
};

/// Server-wide defaults of the mock; each request may override them with its `"mock"` knobs.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct MockConfig {
    /// Content tokens per completion.
    #[arg(long = "mock-tokens", env = "TOKENFAN_MOCK_TOKENS", default_value_t = DEFAULT_TOKENS)]
    pub tokens: u32,

    /// Delay before each token after the first: `MIN..MAX` drawn uniformly (from the request's
    /// seed, so timing is reproducible too), or one fixed duration.
    #[arg(long = "mock-interval", env = "TOKENFAN_MOCK_INTERVAL", default_value_t = DEFAULT_INTERVAL)]
    pub interval: Interval,

    /// Delay between the response headers and the first token.
    #[arg(long = "mock-first-token", env = "TOKENFAN_MOCK_FIRST_TOKEN", default_value = "0ms", value_parser = parse_duration)]
    pub first_token: Duration,
}

impl Default for MockConfig {
    /// The flag defaults (a test checks that the two agree).
    fn default() -> Self {
        Self {
            tokens: DEFAULT_TOKENS,
            interval: DEFAULT_INTERVAL,
            first_token: Duration::ZERO,
        }
    }
}

/// A range of delays, written `20ms..80ms`, or `50ms` for a fixed delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub min: Duration,
    pub max: Duration,
}

/// Why an `--mock-interval` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum IntervalError {
    #[error(transparent)]
    Duration(#[from] humantime::DurationError),
    #[error("the minimum is above the maximum")]
    Order,
}

impl FromStr for Interval {
    type Err = IntervalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = s.split_once("..").unwrap_or((s, s));
        let (min, max) = (parse_duration(min.trim())?, parse_duration(max.trim())?);
        if min > max {
            return Err(IntervalError::Order);
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let min = humantime::format_duration(self.min);
        if self.min == self.max {
            return write!(f, "{min}");
        }
        write!(f, "{min}..{}", humantime::format_duration(self.max))
    }
}

/// Serves the mock on `listener` until `shutdown` completes, then lets the running streams end.
/// Streams held open by `hang_after` are cut at shutdown, so this returns promptly.
pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = CancellationToken::new();
    let app = app(config, stopping.clone());
    // Tokens are small writes: without TCP_NODELAY, Nagle would delay them and skew latency.
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "mock: could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.cancel();
        })
        .await
}

/// The mock's routes, to mount in another server. Streams held open by `hang_after` end only
/// when their client leaves; [`serve`] also ends them at shutdown.
pub fn router(config: MockConfig) -> Router {
    app(config, CancellationToken::new())
}

fn app(config: MockConfig, stopping: CancellationToken) -> Router {
    let state = Arc::new(Mock {
        config,
        stopping,
        stats: Stats::default(),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(stats))
        .with_state(state)
}

#[derive(Debug)]
struct Mock {
    config: MockConfig,
    /// Cancelled when [`serve`] shuts down: releases `hang_after` streams.
    stopping: CancellationToken,
    stats: Stats,
}

/// Most `key`s the mock remembers. Keys are chosen by clients, so the table must not grow
/// without bound (40 requests with megabyte keys once held 57.6 MB): beyond this many, the key
/// seen first is forgotten (its `status_times` count starts again), and `knobs` bounds a key's
/// length.
const MAX_KEYS: usize = 1024;

/// What `GET /mock/stats` reports, and what `status_times` counts against. `requests` counts
/// every chat request, refused ones included (a client's retries show up there); `keys` counts the
/// valid requests carrying each of the last [`MAX_KEYS`] keys.
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    keys: Mutex<Keys>,
}

/// Requests per key, and the order keys were first seen in (to forget the oldest).
#[derive(Debug, Default)]
struct Keys {
    counts: BTreeMap<String, u64>,
    first_seen: VecDeque<String>,
}

impl Stats {
    /// Counts one request with `key` and returns how many have carried it so far.
    fn count_key(&self, key: &str) -> u64 {
        // A poisoned counter map is still a valid map.
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = keys.counts.get_mut(key) {
            *count += 1;
            return *count;
        }
        if keys.first_seen.len() >= MAX_KEYS {
            if let Some(oldest) = keys.first_seen.pop_front() {
                keys.counts.remove(&oldest);
            }
        }
        keys.counts.insert(key.to_owned(), 1);
        keys.first_seen.push_back(key.to_owned());
        1
    }
}

async fn chat_completions(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    let request = match accept(&mock, &body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let stopping = mock.stopping.clone();
    let meta = Meta::new(request.model.unwrap_or_else(|| MODEL.to_owned()));
    if request.stream {
        wire::streaming_response(request.script, meta, request.sse, stopping)
    } else {
        wire::complete(request.script, meta, request.prompt_tokens, stopping).await
    }
}

/// `POST /v1/messages`: the same script in Anthropic's dialect (streaming only, as tokenfan
/// calls it); usage is always sent, as Anthropic does.
async fn messages(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    let request = match accept(&mock, &body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    if !request.stream {
        return wire::error_response(
            StatusCode::BAD_REQUEST,
            "the mock's Messages endpoint only streams",
            "invalid_request_error",
            "invalid_request",
        );
    }
    let frames = anthropic::frames(
        request.script,
        request.model.unwrap_or_else(|| MODEL.to_owned()),
        request.prompt_tokens,
        request.sse.done,
        mock.stopping.clone(),
    );
    wire::event_stream(frames, request.sse.trickle)
}

/// What both dialects do before answering: count the request, read its knobs, hold the
/// headers back (`headers_ms`) and answer an injected status. `Err` is the answer instead.
async fn accept(mock: &Mock, body: &[u8]) -> Result<knobs::MockRequest, Response> {
    mock.stats.requests.fetch_add(1, Ordering::Relaxed);
    let request = knobs::parse(body, &mock.config).map_err(IntoResponse::into_response)?;
    let nth = request.key.as_deref().map(|key| mock.stats.count_key(key));
    // `headers_ms`: a provider that accepted the request and does not answer yet.
    if !request.headers_delay.is_zero()
        && tokio::time::timeout(request.headers_delay, mock.stopping.cancelled())
            .await
            .is_ok()
    {
        return Err(shutting_down());
    }
    if let Some(injected) = request.injected.filter(|injected| injected.strikes(nth)) {
        return Err(injected_error(injected));
    }
    Ok(request)
}

fn shutting_down() -> Response {
    wire::error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "the mock is shutting down",
        "server_error",
        "mock_shutdown",
    )
}

fn injected_error(injected: InjectedStatus) -> Response {
    let status = injected.status;
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let message = format!("mock status {}", status.as_u16());
    let mut response = wire::error_response(status, &message, kind, "mock_status");
    if let Some(seconds) = injected.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

async fn models() -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "tokenfan"}],
    }))
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<serde_json::Value> {
    let keys = mock
        .stats
        .keys
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .counts
        .clone();
    Json(json!({
        "requests": mock.stats.requests.load(Ordering::Relaxed),
        "keys": keys,
    }))
}
