//! Reading a chat-completions request: the OpenAI fields the mock honours and its `"mock"` knobs.
//!
//! Other OpenAI fields are accepted and ignored, as a provider would; the knobs are strict
//! (unknown names and wrong types are a 400) so that a typo in a test or load profile fails loudly
//! instead of silently running with defaults.

use std::time::Duration;

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    script::{Fault, Fnv1a, Script, Spec},
    wire::{self, SseOptions},
    Interval, MockConfig,
};

/// Padding beyond this is a mistake, not a load profile, and would exhaust memory.
const MAX_TOKEN_BYTES: u32 = 1 << 20;
/// Longest `key`, in bytes: a name, not a payload (the mock remembers keys).
const MAX_KEY_BYTES: usize = 256;
/// Longest delay a knob may ask for (one hour), so timing arithmetic never overflows.
const MAX_DELAY_MS: u64 = 3_600_000;

/// A parsed, validated chat-completions request.
#[derive(Debug)]
pub(super) struct MockRequest {
    /// The request's `model`, echoed in the response like a provider does.
    pub model: Option<String>,
    /// Answer with an SSE stream: the request asked for one and `body` did not refuse it.
    pub stream: bool,
    pub sse: SseOptions,
    /// `headers_ms`: how long the response headers are held back.
    pub headers_delay: Duration,
    /// An estimate: one token per four bytes of the serialized `messages`.
    pub prompt_tokens: u32,
    pub key: Option<String>,
    pub injected: Option<InjectedStatus>,
    pub script: Script,
}

/// The `status` knob: answer an error instead of completing.
#[derive(Debug, Clone, Copy)]
pub(super) struct InjectedStatus {
    pub status: StatusCode,
    /// Only the first `times` requests with the same `key` fail; `None`: every one does.
    pub times: Option<u64>,
    pub retry_after: Option<u64>,
}

impl InjectedStatus {
    /// Whether it fails this request, the `nth` to carry its key (`None`: no key).
    pub(super) fn strikes(&self, nth: Option<u64>) -> bool {
        self.times
            .is_none_or(|times| nth.is_some_and(|nth| nth <= times))
    }
}

/// Why a request was refused with 400. Each variant has a stable `code`.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("the request body is not valid JSON: {0}")]
    Syntax(serde_json::Error),
    #[error("invalid request: {0}")]
    Invalid(serde_json::Error),
    #[error("'messages' must contain at least one message")]
    NoMessages,
    #[error("invalid mock knobs: {0}")]
    Knob(#[from] KnobError),
}

impl RequestError {
    fn code(&self) -> &'static str {
        match self {
            Self::Syntax(_) => "invalid_json",
            Self::Invalid(_) | Self::NoMessages => "invalid_request",
            Self::Knob(_) => "invalid_mock_knob",
        }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        wire::error_response(
            StatusCode::BAD_REQUEST,
            &self.to_string(),
            "invalid_request_error",
            self.code(),
        )
    }
}

/// A `"mock"` object that parses but makes no sense.
#[derive(Debug, thiserror::Error)]
pub(super) enum KnobError {
    #[error("{0}")]
    Parse(serde_json::Error),
    #[error("interval_ms [{0}, {1}]: the minimum is above the maximum")]
    IntervalOrder(u64, u64),
    #[error("{knob} {value} is above the limit of {limit}")]
    TooLarge {
        knob: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("use at most one of {}", FAULT_KNOBS.join(", "))]
    ManyFaults,
    #[error("status {0} is not an HTTP error status (400-599)")]
    NotAnErrorStatus(u16),
    #[error("{knob} needs {needs}")]
    Needs {
        knob: &'static str,
        needs: &'static str,
    },
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Map<String, Value>>,
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    tools: Vec<Tool>,
    tool_choice: Option<Value>,
    mock: Option<Value>,
}

/// An OpenAI tool (`{"type":"function","function":{"name"}}`) or an Anthropic one
/// (`{"name"}`).
#[derive(Debug, Deserialize)]
struct Tool {
    function: Option<ToolFunction>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ToolFunction {
    name: String,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The `"mock"` object, as sent. The mock's table in README.md documents each knob.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object of mock knobs")]
struct Knobs {
    tokens: Option<u32>,
    interval_ms: Option<IntervalMs>,
    first_token_ms: Option<u64>,
    seed: Option<u64>,
    #[serde(default)]
    stamp: bool,
    token_bytes: Option<u32>,
    fail_after: Option<u32>,
    error_after: Option<u32>,
    hang_after: Option<u32>,
    end_after: Option<u32>,
    invalid_json_after: Option<u32>,
    no_choices_after: Option<u32>,
    status: Option<u16>,
    status_times: Option<u64>,
    key: Option<String>,
    retry_after: Option<u64>,
    body: Option<BodyKind>,
    done: Option<bool>,
    headers_ms: Option<u64>,
    trickle_ms: Option<u64>,
    reasoning: Option<u32>,
    tool_calls: Option<u32>,
}

/// More parallel tool calls than this is a mistake in a test, not a load profile.
const MAX_TOOL_CALLS: u32 = 64;

/// The knobs of [`Knobs::fault`], of which a request may set one.
const FAULT_KNOBS: [&str; 6] = [
    "fail_after",
    "error_after",
    "hang_after",
    "end_after",
    "invalid_json_after",
    "no_choices_after",
];

/// The `body` knob: what a streaming request is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BodyKind {
    /// The SSE stream asked for.
    Sse,
    /// One `application/json` completion, as a provider that ignores `stream: true` sends.
    Json,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged, expecting = "a number of milliseconds or a [min, max] pair")]
enum IntervalMs {
    Fixed(u64),
    Range([u64; 2]),
}

/// Parses and validates a request body against the server defaults.
pub(super) fn parse(body: &[u8], defaults: &MockConfig) -> Result<MockRequest, RequestError> {
    let mut request: ChatRequest = serde_json::from_slice(body).map_err(|error| {
        if error.is_syntax() || error.is_eof() {
            RequestError::Syntax(error)
        } else {
            RequestError::Invalid(error)
        }
    })?;
    if request.messages.is_empty() {
        return Err(RequestError::NoMessages);
    }
    let knobs = match request.mock.take() {
        Some(value) => Knobs::deserialize(value).map_err(KnobError::Parse)?,
        None => Knobs::default(),
    };
    let mut prompt = Fnv1a::default();
    serde_json::to_writer(&mut prompt, &request.messages).map_err(RequestError::Invalid)?;

    // OpenAI: `max_completion_tokens` supersedes the deprecated `max_tokens`.
    let cap = request.max_completion_tokens.or(request.max_tokens);
    let wanted = knobs.tokens.unwrap_or(defaults.tokens);
    let tool_calls = tool_calls(&request, knobs.tool_calls)?;
    let (tokens, finish_reason) = match cap {
        _ if !tool_calls.is_empty() => (0, "tool_calls"),
        Some(cap) if cap < wanted => (cap, "length"),
        _ => (wanted, "stop"),
    };
    let spec = Spec {
        seed: knobs.seed.unwrap_or(prompt.hash()),
        tokens,
        finish_reason,
        interval: knobs.interval(defaults.interval)?,
        first_token: match knobs.first_token_ms {
            Some(ms) => Duration::from_millis(at_most("first_token_ms", ms, MAX_DELAY_MS)?),
            None => defaults.first_token,
        },
        stamp: knobs.stamp,
        token_bytes: knobs.token_bytes()?,
        fault: knobs.fault()?,
        reasoning: at_most("reasoning", knobs.reasoning.unwrap_or(0).into(), 1 << 20)?
            .try_into()
            .unwrap_or(u32::MAX),
        tool_calls,
    };
    let prompt_tokens = u32::try_from(prompt.bytes().div_ceil(4)).unwrap_or(u32::MAX);
    let include_usage = request
        .stream_options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    let stream = request.stream.unwrap_or(false) && knobs.body != Some(BodyKind::Json);
    Ok(MockRequest {
        model: request.model,
        stream,
        sse: SseOptions {
            usage_prompt_tokens: include_usage.then_some(prompt_tokens),
            done: knobs.done.unwrap_or(true),
            trickle: knobs.trickle(stream)?,
        },
        headers_delay: Duration::from_millis(at_most(
            "headers_ms",
            knobs.headers_ms.unwrap_or(0),
            MAX_DELAY_MS,
        )?),
        prompt_tokens,
        injected: knobs.injected_status()?,
        key: knobs.key()?,
        script: Script::new(spec),
    })
}

/// The functions the mock calls: none when the last message is a tool result (the follow-up
/// turn is answered in text) or `tool_choice` is `"none"`; else `tool_calls` of them (the knob),
/// or one when `tool_choice` is `"required"` or names a function. A named function is the one
/// called; otherwise the request's tools take turns. Both OpenAI's and Anthropic's shapes of
/// tools, tool choices and tool results are understood.
fn tool_calls(request: &ChatRequest, knob: Option<u32>) -> Result<Vec<String>, KnobError> {
    let names: Vec<&str> = request
        .tools
        .iter()
        .filter_map(|tool| {
            tool.function
                .as_ref()
                .map(|f| &f.name)
                .or(tool.name.as_ref())
        })
        .map(String::as_str)
        .collect();
    let answered = request.messages.last().is_some_and(|message| {
        let tool_result = |content: &Value| {
            content
                .as_array()
                .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result"))
        };
        message.get("role").is_some_and(|role| role == "tool")
            || message.get("content").is_some_and(tool_result)
    });
    let choice = request.tool_choice.as_ref().unwrap_or(&Value::Null);
    let named = choice["function"]["name"].as_str().or_else(|| {
        (choice["type"] == "tool")
            .then(|| choice["name"].as_str())
            .flatten()
    });
    let required = named.is_some() || choice == "required" || choice["type"] == "any";
    let declined = choice == "none" || choice["type"] == "none";
    let count = match knob {
        Some(count) => at_most("tool_calls", count.into(), MAX_TOOL_CALLS.into())?,
        None => u64::from(required),
    };
    if count > 0 && names.is_empty() && named.is_none() {
        return Err(needs("tool_calls", "`tools` in the request"));
    }
    if answered || declined {
        return Ok(Vec::new());
    }
    Ok((0..count)
        .map(|n| match named {
            Some(name) => name.to_owned(),
            None => names[usize::try_from(n).unwrap_or(0) % names.len()].to_owned(),
        })
        .collect())
}

fn at_most(knob: &'static str, value: u64, limit: u64) -> Result<u64, KnobError> {
    if value > limit {
        return Err(KnobError::TooLarge { knob, value, limit });
    }
    Ok(value)
}

impl Knobs {
    fn interval(&self, default: Interval) -> Result<Interval, KnobError> {
        let (min, max) = match self.interval_ms {
            None => return Ok(default),
            Some(IntervalMs::Fixed(ms)) => (ms, ms),
            Some(IntervalMs::Range([min, max])) if min > max => {
                return Err(KnobError::IntervalOrder(min, max))
            }
            Some(IntervalMs::Range([min, max])) => (min, max),
        };
        Ok(Interval {
            min: Duration::from_millis(min),
            max: Duration::from_millis(at_most("interval_ms", max, MAX_DELAY_MS)?),
        })
    }

    fn key(self) -> Result<Option<String>, KnobError> {
        let Some(key) = self.key else {
            return Ok(None);
        };
        at_most("key length", key.len() as u64, MAX_KEY_BYTES as u64)?;
        Ok(Some(key))
    }

    fn token_bytes(&self) -> Result<usize, KnobError> {
        let bytes = self.token_bytes.unwrap_or(0);
        let bytes = at_most("token_bytes", bytes.into(), MAX_TOKEN_BYTES.into())?;
        Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
    }

    fn trickle(&self, stream: bool) -> Result<Option<Duration>, KnobError> {
        let Some(ms) = self.trickle_ms else {
            return Ok(None);
        };
        if !stream {
            return Err(needs("trickle_ms", "a streaming request with an SSE body"));
        }
        Ok(Some(Duration::from_millis(at_most(
            "trickle_ms",
            ms,
            MAX_DELAY_MS,
        )?)))
    }

    fn fault(&self) -> Result<Option<(Fault, u32)>, KnobError> {
        // In the order of FAULT_KNOBS.
        let faults = [
            (Fault::Fail, self.fail_after),
            (Fault::Error, self.error_after),
            (Fault::Hang, self.hang_after),
            (Fault::End, self.end_after),
            (Fault::InvalidJson, self.invalid_json_after),
            (Fault::NoChoices, self.no_choices_after),
        ];
        let mut set = faults
            .into_iter()
            .filter_map(|(fault, after)| after.map(|after| (fault, after)));
        let fault = set.next();
        if set.next().is_some() {
            return Err(KnobError::ManyFaults);
        }
        Ok(fault)
    }

    fn injected_status(&self) -> Result<Option<InjectedStatus>, KnobError> {
        let Some(code) = self.status else {
            if self.status_times.is_some() {
                return Err(needs("status_times", "status"));
            }
            if self.retry_after.is_some() {
                return Err(needs("retry_after", "status"));
            }
            return Ok(None);
        };
        if self.status_times.is_some() && self.key.is_none() {
            return Err(needs("status_times", "key"));
        }
        let status = StatusCode::from_u16(code)
            .ok()
            .filter(|status| status.is_client_error() || status.is_server_error())
            .ok_or(KnobError::NotAnErrorStatus(code))?;
        Ok(Some(InjectedStatus {
            status,
            times: self.status_times,
            retry_after: self.retry_after,
        }))
    }
}

fn needs(knob: &'static str, needs: &'static str) -> KnobError {
    KnobError::Needs { knob, needs }
}
