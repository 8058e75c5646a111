//! The OpenAI wire format: a played [`Script`] as an SSE stream of `chat.completion.chunk`s, or
//! as one `chat.completion` object; and the OpenAI error body.
//!
//! Streaming is the hot path of the load test (thousands of streams at 20 tokens/s each): one
//! timer and one `Vec` → `Bytes` per token, nothing else.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::{
    body::Body,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use bytes::Bytes;
use futures_util::{stream, Stream, StreamExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::script::{Beat, Script};
use crate::{
    hub::{
        delta::{Assembled, ToolCallDelta},
        Delta as LogDelta,
    },
    upstream::chunk::{self, Chunk, ChunkChoice, Delta},
};

/// Who a completion is: the fields every chunk repeats.
#[derive(Debug)]
pub(super) struct Meta {
    id: String,
    created: u64,
    model: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl Usage {
    pub(super) fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice {
    index: u32,
    message: serde_json::Value,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
}

/// What `error_after` sends, streaming or not.
const MOCK_FAILURE: ErrorBody<'static> = ErrorBody {
    error: ErrorDetail {
        message: "mock failure",
        kind: "server_error",
        code: "mock_error",
    },
};

/// What `invalid_json_after` injects: a chunk cut short, as a broken proxy would pass it on.
pub(super) const INVALID_JSON_FRAME: &[u8] =
    b"data: {\"id\":\"chatcmpl-mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"cut\n\n";

/// How a stream is written, beyond its script.
#[derive(Debug, Clone, Copy)]
pub(super) struct SseOptions {
    /// Set when the client asked for the usage chunk: the prompt's token count.
    pub usage_prompt_tokens: Option<u32>,
    /// End with `data: [DONE]` (`done` knob).
    pub done: bool,
    /// Write the stream one byte at a time, waiting this long before each (`trickle_ms`).
    pub trickle: Option<Duration>,
}

/// Why a response body is cut off; hyper then aborts the connection without a last chunk.
#[derive(Debug, thiserror::Error)]
pub(super) enum Abort {
    #[error("fail_after: the mock drops the connection")]
    Injected,
    #[error("the mock is shutting down")]
    Shutdown,
    #[error("could not encode a chunk: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An OpenAI-shaped error response.
pub(super) fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            code,
        },
    };
    (status, Json(body)).into_response()
}

/// Plays `script` as a `text/event-stream` response.
pub(super) fn streaming_response(
    script: Script,
    meta: Meta,
    options: SseOptions,
    stopping: CancellationToken,
) -> Response {
    let frames = sse_frames(script, meta, options, stopping);
    event_stream(frames, options.trickle)
}

/// A `text/event-stream` response of `frames`, trickled when asked.
pub(super) fn event_stream(
    frames: impl Stream<Item = Result<Bytes, Abort>> + Send + 'static,
    trickled: Option<Duration>,
) -> Response {
    let body = match trickled {
        Some(every) => Body::from_stream(trickle(frames, every)),
        None => Body::from_stream(frames),
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body).into_response()
}

/// One SSE frame per beat.
fn sse_frames(
    script: Script,
    meta: Meta,
    options: SseOptions,
    stopping: CancellationToken,
) -> impl Stream<Item = Result<Bytes, Abort>> + Send + 'static {
    let state = (script, meta, stopping);
    stream::unfold(state, move |(mut script, meta, stopping)| async move {
        let frame = match script.advance(&stopping).await? {
            Beat::Role => meta.frame(Delta::role()),
            Beat::Token(text) => meta.frame(Delta::content(text)),
            Beat::Reasoning(text) => meta.frame(Delta::reasoning(text)),
            Beat::ToolCall {
                index,
                id,
                name,
                arguments,
            } => meta.frame(Delta::tool_call(index, id, name, arguments)),
            Beat::Finish {
                reason,
                completion_tokens,
            } => meta.end_frame(
                reason,
                options
                    .usage_prompt_tokens
                    .map(|prompt| Usage::new(prompt, completion_tokens)),
                options.done,
            ),
            Beat::Error => data_frame(&MOCK_FAILURE),
            Beat::Fail => Err(Abort::Injected),
            Beat::Released => Err(Abort::Shutdown),
            Beat::End => return None,
            Beat::InvalidJson => Ok(Bytes::from_static(INVALID_JSON_FRAME)),
            Beat::NoChoices => meta.no_choices_frame(),
        };
        Some((frame, (script, meta, stopping)))
    })
}

/// Splits `frames` into one-byte frames, each sent after `every` (a yield when zero), so that
/// each byte is its own write on the socket: a provider that trickles.
fn trickle(
    frames: impl Stream<Item = Result<Bytes, Abort>> + Send + 'static,
    every: Duration,
) -> impl Stream<Item = Result<Bytes, Abort>> + Send + 'static {
    let state = (Box::pin(frames), Bytes::new());
    stream::unfold(state, move |(mut frames, mut pending)| async move {
        while pending.is_empty() {
            match frames.next().await? {
                Ok(frame) => pending = frame,
                Err(abort) => return Some((Err(abort), (frames, pending))),
            }
        }
        if every.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(every).await;
        }
        let byte = pending.split_to(1);
        Some((Ok(byte), (frames, pending)))
    })
}

/// Plays `script` to its end and answers the whole text as one `chat.completion`.
pub(super) async fn complete(
    mut script: Script,
    meta: Meta,
    prompt_tokens: u32,
    stopping: CancellationToken,
) -> Response {
    let mut answer = Assembled::default();
    let abort = loop {
        match script.advance(&stopping).await {
            // Injected chunks exist only on the wire of a stream.
            Some(Beat::Role | Beat::InvalidJson | Beat::NoChoices) => {}
            Some(Beat::Token(token)) => answer.text.push_str(token),
            Some(Beat::Reasoning(text)) => answer.push(&LogDelta::Reasoning(text.to_owned())),
            Some(Beat::ToolCall {
                index,
                id,
                name,
                arguments,
            }) => answer.push(&LogDelta::ToolCall(Box::new(ToolCallDelta {
                index,
                id: id.map(str::to_owned),
                name: name.map(str::to_owned),
                arguments: arguments.to_owned(),
            }))),
            Some(Beat::Finish {
                reason,
                completion_tokens,
            }) => {
                return meta.completion(
                    &answer,
                    reason,
                    Usage::new(prompt_tokens, completion_tokens),
                )
            }
            // Every script ends with a finish or a fault, so `None` is never seen here.
            Some(Beat::Error) | None => {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(MOCK_FAILURE)).into_response()
            }
            Some(Beat::Fail | Beat::End) => break Abort::Injected,
            Some(Beat::Released) => break Abort::Shutdown,
        }
    };
    // Headers go out, then the connection drops: the client sees a truncated response.
    Body::from_stream(stream::once(async move { Err::<Bytes, _>(abort) })).into_response()
}

impl Meta {
    /// A fresh completion id and creation time.
    pub(super) fn new(model: String) -> Self {
        Self {
            id: format!("chatcmpl-mock{:016x}", rand::random::<u64>()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            model,
        }
    }

    fn chunk<'a>(
        &'a self,
        choices: &'a [ChunkChoice<'a>],
        usage: Option<Usage>,
    ) -> Chunk<'a, Usage> {
        Chunk::new(&self.id, self.created, &self.model, choices, usage)
    }

    fn frame(&self, delta: Delta<'_>) -> Result<Bytes, Abort> {
        let content = delta.content.map_or(0, str::len);
        let mut buf = Vec::with_capacity(self.id.len() + self.model.len() + content + 160);
        self.write_choice(&mut buf, delta, None)?;
        Ok(buf.into())
    }

    /// The finish chunk, the usage chunk if asked for, and `[DONE]` unless `done` is off, in
    /// one write.
    fn end_frame(
        &self,
        reason: &'static str,
        usage: Option<Usage>,
        done: bool,
    ) -> Result<Bytes, Abort> {
        let mut buf = Vec::with_capacity(512);
        self.write_choice(&mut buf, Delta::default(), Some(reason))?;
        if let Some(usage) = usage {
            chunk::write_data(&mut buf, &self.chunk(&[], Some(usage)))?;
        }
        if done {
            buf.extend_from_slice(b"data: [DONE]\n\n");
        }
        Ok(buf.into())
    }

    /// A chunk with the completion's identity and nothing else, like Azure's content-filter
    /// chunks.
    fn no_choices_frame(&self) -> Result<Bytes, Abort> {
        data_frame(&serde_json::json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }))
    }

    fn write_choice(
        &self,
        buf: &mut Vec<u8>,
        delta: Delta<'_>,
        finish_reason: Option<&'static str>,
    ) -> Result<(), Abort> {
        let choices = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        Ok(chunk::write_data(buf, &self.chunk(&choices, None))?)
    }

    fn completion(
        &self,
        answer: &Assembled,
        finish_reason: &'static str,
        usage: Usage,
    ) -> Response {
        Json(Completion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: [CompletionChoice {
                index: 0,
                message: chunk::message(answer),
                finish_reason,
            }],
            usage,
        })
        .into_response()
    }
}

fn data_frame(value: &impl Serialize) -> Result<Bytes, Abort> {
    let mut buf = Vec::with_capacity(128);
    chunk::write_data(&mut buf, value)?;
    Ok(buf.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_their_exact_bytes() {
        let meta = Meta {
            id: "chatcmpl-mock1".into(),
            created: 7,
            model: "m".into(),
        };
        let frames = [
            meta.frame(Delta::role()).unwrap(),
            meta.frame(Delta::content("Hi \"you\"")).unwrap(),
            meta.end_frame("stop", Some(Usage::new(9, 2)), true)
                .unwrap(),
        ]
        .concat();
        assert_eq!(
            String::from_utf8(frames).unwrap(),
            concat!(
                r#"data: {"id":"chatcmpl-mock1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
                "\n\n",
                r#"data: {"id":"chatcmpl-mock1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"Hi \"you\""},"finish_reason":null}]}"#,
                "\n\n",
                r#"data: {"id":"chatcmpl-mock1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
                "\n\n",
                r#"data: {"id":"chatcmpl-mock1","object":"chat.completion.chunk","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#,
                "\n\n",
                "data: [DONE]\n\n",
            )
        );
    }
}
