//! Upstream providers: where tokens come from.
//!
//! [`Upstream`] calls the provider with one streaming request per generation — an
//! OpenAI-compatible `POST {url}/chat/completions` or Anthropic's `POST {url}/messages`, each a
//! `dialect` — and turns its SSE stream into [`UpstreamEvent`]s. It owns retries (only before
//! the first token, so a retry can never duplicate one) and every upstream timeout. It knows
//! nothing of subscribers or HTTP handlers: the hub drives it, one task per generation.
//!
//! - `routes`: the configured upstreams ([`Upstreams`], one client each) and the rule that
//!   picks one by the request's model.
//! - `client`: sending, retries, deadlines; `reader`: the stream reader.
//! - `dialect`: the seam to a provider's API; `openai` and `anthropic` implement it.
//! - `redact`: credentials out of provider text, and text made safe for logs.
//! - [`mock`] is the embedded mock LLM (both dialects), the default upstream; [`chunk`] the
//!   `chat.completion.chunk` it writes, which the OpenAI-compatible endpoint writes too.

mod anthropic;
pub mod chunk;
mod client;
mod dialect;
pub mod http1;
pub mod mock;
mod openai;
mod reader;
mod redact;
mod routes;
pub mod sse;
#[cfg(test)]
mod tests;

pub use client::Upstream;
pub use redact::LogSafe;
pub use routes::{InvalidUpstream, Route, UnknownModel, Upstreams};

use crate::hub::Delta;

/// Longest `finish_reason` kept; a longer one is dropped with a warning. Real ones are a word
/// (`stop`, `tool_calls`, `content_filter`).
pub const MAX_FINISH_REASON_BYTES: usize = 64;
/// Largest `usage` object kept, as JSON text; a larger one is dropped with a warning. Real
/// ones, with their token-detail breakdowns, are a few hundred bytes.
pub const MAX_USAGE_BYTES: usize = 4 * 1024;

/// One thing the provider told us, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamEvent {
    /// A piece of the answer: text, reasoning, refusal or a tool-call fragment; never empty.
    Delta(Delta),
    /// `choices[0].finish_reason` (`stop`, `length`, `tool_calls`, …), at most
    /// [`MAX_FINISH_REASON_BYTES`].
    Finish(String),
    /// The usage object of the final chunk, as the provider sent it, and its size as JSON
    /// (at most [`MAX_USAGE_BYTES`]).
    Usage {
        usage: serde_json::Value,
        bytes: usize,
    },
}

/// Why an upstream call failed. Each variant has a stable [`code`](UpstreamError::code) that
/// reaches subscribers in the `error` event.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("upstream timed out: {0}")]
    Timeout(&'static str),
    #[error("upstream answered HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("upstream sent an invalid stream: {0}")]
    Protocol(String),
    #[error("upstream reported an error: {0}")]
    Provider(String),
    #[error("upstream stream ended early: {0}")]
    Interrupted(String),
}

impl UpstreamError {
    /// The same error with the provider's text passed through `redact`: provider messages may
    /// quote the request's credentials.
    fn redacted(self, redact: impl Fn(&str) -> String) -> Self {
        match self {
            Self::Connect(message) => Self::Connect(redact(&message)),
            Self::Http { status, message } => Self::Http {
                status,
                message: redact(&message),
            },
            Self::Protocol(message) => Self::Protocol(redact(&message)),
            Self::Provider(message) => Self::Provider(redact(&message)),
            Self::Interrupted(message) => Self::Interrupted(redact(&message)),
            timeout @ Self::Timeout(_) => timeout,
        }
    }

    /// The stable machine code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Connect(_) => "upstream_connect_error",
            Self::Timeout(_) => "upstream_timeout",
            Self::Http { .. } => "upstream_http_error",
            Self::Protocol(_) => "upstream_protocol_error",
            Self::Provider(_) => "upstream_error",
            Self::Interrupted(_) => "upstream_interrupted",
        }
    }
}
