//! The OpenAI-compatible endpoint: `POST /v1/chat/completions`, so that tokenfan is a drop-in
//! base URL for existing OpenAI clients.
//!
//! Each request runs as a tokenfan generation (`Hub::create`: an `Idempotency-Key` works, and
//! other viewers attach to `/v1/generations/{id}/events` with the id from the
//! `x-tokenfan-generation-id` header). The answer is re-encoded from the hub's token log, read
//! by index through [`Generation::attach`] (replay, then live) — the same exactly-once path as
//! every SSE subscriber — so a reader that was dropped from fan-out simply re-attaches at its
//! cursor. Errors use OpenAI's shape, `{"error":{"message","type","param","code"}}`.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Extension, Json,
};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{auth, error::ApiError, generations::start, App};
use crate::{
    access::KeyId,
    hub::{frame, Delivery, Generation, HubError, Snapshot, Status, Subscription},
    upstream::chunk::{self, Chunk, ChunkChoice, Delta},
};

/// The response header naming the generation behind a completion.
pub const GENERATION_ID_HEADER: &str = "x-tokenfan-generation-id";
/// The response header with a token that lets a viewer without an API key subscribe to it.
pub const SUBSCRIBE_TOKEN_HEADER: &str = "x-tokenfan-subscribe-token";

/// The backend API's key check, answered in OpenAI's error shape.
pub async fn require_api_key(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, OpenAiError> {
    Ok(auth::require_api_key(State(app), request, next).await?)
}

/// `POST /v1/chat/completions`: streams `chat.completion.chunk`s with `"stream": true`, else
/// waits for the generation and answers one `chat.completion`.
pub async fn completions(
    State(app): State<Arc<App>>,
    key: Option<Extension<KeyId>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let (created, options) = start(&app, key, &headers, body, Options::of).await?;
    let generation = created.generation;
    let meta = Meta {
        id: format!("chatcmpl-{}", generation.id()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
        model: options.model,
        include_usage: options.include_usage,
    };
    let mut response = if options.stream {
        // A viewer like any other, within the same per-generation limit (repeated requests
        // with one Idempotency-Key each stream the same generation), and counted as a
        // subscriber, so that a drain waits for it.
        let subscription = Subscription::open(
            app.hub.clone(),
            generation.clone(),
            0,
            app.max_subscribers_per_generation,
        )
        .ok_or(ApiError::TooManySubscribers)?;
        stream_response(subscription, meta)
    } else {
        completion_response(&generation, &meta).await
    };
    name_generation(response.headers_mut(), &app, &generation, created.is_new);
    Ok(response)
}

/// `GET /v1/models`: the configured upstreams' models, as OpenAI lists them (an Anthropic
/// upstream's list is translated), so that SDKs' `models.list()` works against the gateway.
pub async fn models(State(app): State<Arc<App>>) -> Result<Json<Value>, OpenAiError> {
    Ok(Json(
        app.hub.upstreams().models().await.map_err(ApiError::from)?,
    ))
}

/// The headers that let other viewers find the generation behind a completion.
fn name_generation(headers: &mut HeaderMap, app: &App, generation: &Generation, is_new: bool) {
    if let Ok(id) = HeaderValue::from_str(generation.id()) {
        headers.insert(GENERATION_ID_HEADER, id);
    }
    if let Ok(token) = HeaderValue::from_str(&app.access.subscribe_token(generation.id())) {
        headers.insert(SUBSCRIBE_TOKEN_HEADER, token);
    }
    if !is_new {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
}

/// What tokenfan itself reads from an (already validated) chat request.
struct Options {
    stream: bool,
    include_usage: bool,
    model: String,
}

impl Options {
    fn of(request: &Map<String, Value>) -> Result<Self, ApiError> {
        let flag = |value: Option<&Value>, name: &str| match value {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(flag)) => Ok(*flag),
            Some(_) => Err(ApiError::InvalidRequest(format!(
                "`{name}` must be a boolean"
            ))),
        };
        let stream_options = request.get("stream_options");
        Ok(Self {
            stream: flag(request.get("stream"), "stream")?,
            include_usage: flag(
                stream_options.and_then(|o| o.get("include_usage")),
                "stream_options.include_usage",
            )?,
            model: request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// The fields every chunk of one completion repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Meta {
    /// Appends one `data: <chunk>` event with a single choice.
    fn write_choice(&self, out: &mut BytesMut, delta: Delta<'_>, finish_reason: Option<&str>) {
        let choice = ChunkChoice {
            index: 0,
            delta,
            logprobs: Some(()),
            finish_reason,
        };
        let usage = self.include_usage.then_some(&Value::Null);
        self.write_chunk(out, std::slice::from_ref(&choice), usage);
    }

    fn write_chunk(&self, out: &mut BytesMut, choices: &[ChunkChoice<'_>], usage: Option<&Value>) {
        let chunk = Chunk::new(&self.id, self.created, &self.model, choices, usage);
        write_data(out, &chunk);
    }

    /// The end of a stream: finish reason, usage if asked for, `[DONE]`; or OpenAI's in-stream
    /// error object when the generation did not complete.
    fn ending(&self, snapshot: &Snapshot) -> Bytes {
        let mut out = BytesMut::new();
        match Failure::of(snapshot) {
            None => {
                let reason = snapshot.finish_reason.as_deref().unwrap_or("stop");
                self.write_choice(&mut out, Delta::default(), Some(reason));
                if let (true, Some(usage)) = (self.include_usage, &snapshot.usage) {
                    self.write_chunk(&mut out, &[], Some(usage));
                }
                out.put_slice(b"data: [DONE]\n\n");
            }
            Some(failure) => write_data(&mut out, &failure.body()),
        }
        out.freeze()
    }
}

fn write_data(out: &mut BytesMut, data: &impl Serialize) {
    // Serializing these plain structs into memory cannot fail; ignoring the result keeps this
    // path panic-free.
    let _ = chunk::write_data(out, data);
}

/// Why an ended generation did not complete, as an OpenAI client is told.
struct Failure<'a> {
    status: StatusCode,
    kind: &'static str,
    code: &'a str,
    message: &'a str,
}

impl<'a> Failure<'a> {
    fn of(snapshot: &'a Snapshot) -> Option<Self> {
        let (status, kind) = match snapshot.status {
            Status::Completed => return None,
            Status::Failed | Status::Running => (StatusCode::BAD_GATEWAY, "server_error"),
            Status::Cancelled => (StatusCode::CONFLICT, "invalid_request_error"),
            Status::Interrupted => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        };
        let (code, message) = snapshot.error.as_ref().map_or(
            ("generation_failed", "the generation did not complete"),
            |error| (error.code, error.message.as_str()),
        );
        Some(Self {
            status,
            kind,
            code,
            message,
        })
    }

    fn body(&self) -> Value {
        openai_error(self.message, self.kind, self.code)
    }
}

fn openai_error(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// Waits for the generation to end and answers the whole `chat.completion`.
async fn completion_response(generation: &Generation, meta: &Meta) -> Response {
    generation.ended().await;
    let snapshot = generation.snapshot();
    if let Some(failure) = Failure::of(&snapshot) {
        return (failure.status, Json(failure.body())).into_response();
    }
    Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": chunk::message(&snapshot.content),
            "logprobs": null,
            "finish_reason": snapshot.finish_reason.as_deref().unwrap_or("stop"),
        }],
        "usage": snapshot.usage,
    }))
    .into_response()
}

fn stream_response(subscription: Subscription, meta: Meta) -> Response {
    let stream = CompletionStream {
        subscription,
        meta,
        phase: Phase::Start,
    };
    super::events::event_stream(Body::from_stream(stream))
}

/// The body of one streaming completion: a subscription to the generation that re-encodes
/// each token as a chunk.
struct CompletionStream {
    subscription: Subscription,
    meta: Meta,
    phase: Phase,
}

enum Phase {
    /// The role chunk is due.
    Start,
    Streaming,
    Finished,
}

impl CompletionStream {
    fn tokens(&self, from: u64, to: u64) -> Bytes {
        let mut out = BytesMut::new();
        for delta in self.subscription.generation().deltas(from, to) {
            self.meta.write_choice(&mut out, Delta::of(&delta), None);
        }
        out.freeze()
    }

    fn role(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.meta.write_choice(&mut out, Delta::role(), None);
        out.freeze()
    }
}

impl Stream for CompletionStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let bytes = match this.phase {
                Phase::Start => {
                    this.phase = Phase::Streaming;
                    this.role()
                }
                Phase::Streaming => match ready!(this.subscription.poll_delivery(cx)) {
                    Some(Delivery::Replayed { from, to, .. }) => this.tokens(from, to),
                    Some(Delivery::Token { index, .. }) => this.tokens(index, index + 1),
                    Some(Delivery::KeepAlive) => frame::KEEPALIVE,
                    Some(Delivery::Ended(_)) | None => {
                        this.phase = Phase::Finished;
                        this.meta.ending(&this.subscription.generation().snapshot())
                    }
                    // Dropped from fan-out (too slow, or a drain deadline): an OpenAI client
                    // cannot resume, so catch up from the log; nothing is lost or repeated.
                    Some(Delivery::Dropped) => {
                        this.subscription.resume();
                        continue;
                    }
                },
                Phase::Finished => return Poll::Ready(None),
            };
            return Poll::Ready(Some(Ok(bytes)));
        }
    }
}

/// An [`ApiError`] with the same status and headers, in OpenAI's error body.
#[derive(Debug)]
pub struct OpenAiError(ApiError);

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl From<HubError> for OpenAiError {
    fn from(error: HubError) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let kind = match status {
            StatusCode::NOT_FOUND => "not_found_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = openai_error(&self.0.to_string(), kind, self.0.code());
        let (parts, _) = self.0.into_response().into_parts();
        Response::from_parts(parts, Body::from(body.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::delta::Assembled;

    fn options(request: Value) -> Result<Options, ApiError> {
        Options::of(request.as_object().unwrap())
    }

    #[test]
    fn stream_flags_must_be_booleans() {
        let both = options(json!({"model": "m", "stream": true,
            "stream_options": {"include_usage": true}}))
        .unwrap();
        assert!(both.stream && both.include_usage);
        let neither = options(json!({"model": "m", "stream": null})).unwrap();
        assert!(!neither.stream && !neither.include_usage);
        assert!(options(json!({"model": "m", "stream": "yes"})).is_err());
        assert!(options(json!({"stream": true, "stream_options": {"include_usage": 1}})).is_err());
    }

    /// A completion whose client asked for usage.
    fn usage_meta() -> Meta {
        Meta {
            id: "chatcmpl-x".into(),
            created: 7,
            model: "m".into(),
            include_usage: true,
        }
    }

    #[test]
    fn chunks_look_like_openai_chunks() {
        let meta = usage_meta();
        let mut out = BytesMut::new();
        meta.write_choice(&mut out, Delta::content("Hi \"you\""), None);
        assert_eq!(
            &out[..],
            br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"Hi \"you\""},"logprobs":null,"finish_reason":null}],"usage":null}

"#
        );
    }

    #[test]
    fn ending_has_the_finish_chunk_usage_and_done() {
        let meta = usage_meta();
        let snapshot = Snapshot {
            id: "gen_x".into(),
            status: Status::Completed,
            content: Assembled {
                text: "Hi".into(),
                ..Assembled::default()
            },
            token_count: 1,
            finish_reason: Some("length".into()),
            usage: Some(json!({"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10})),
            error: None,
        };
        assert_eq!(
            &meta.ending(&snapshot)[..],
            concat!(
                r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],"usage":null}"#,
                "\n\n",
                r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"m","choices":[],"usage":{"completion_tokens":1,"prompt_tokens":9,"total_tokens":10}}"#,
                "\n\n",
                "data: [DONE]\n\n",
            )
            .as_bytes()
        );
    }
}
