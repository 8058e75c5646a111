//! The seam between the upstream client (sending, retries, deadlines, reading the body: the
//! same for every provider) and a provider's API dialect: where a request goes, how it is
//! authenticated and encoded, and how the events of its stream become [`UpstreamEvent`]s.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{anthropic::Anthropic, openai::OpenAi, UpstreamError, UpstreamEvent};
use crate::config::UpstreamKind;

/// One provider API dialect. Shared by every call; per-call state lives in its
/// [`StreamDecoder`].
pub(super) trait Dialect: Send + Sync + 'static {
    /// The endpoint under the base URL (`chat/completions`, `messages`).
    fn path(&self) -> &'static str;

    /// The headers that carry the provider key (and any the dialect requires).
    fn key_headers(&self, key: &str) -> Vec<(&'static str, String)>;

    /// The provider's streaming request for the client's OpenAI-style chat request.
    fn request_body(&self, request: Map<String, Value>) -> Result<Bytes, UpstreamError>;

    /// A decoder for one call's stream.
    fn decoder(&self) -> Box<dyn StreamDecoder>;

    /// The provider's answer to `GET {url}/models` as OpenAI's model list.
    fn models(&self, answer: Value) -> Value;
}

/// Reads one call's SSE `data:` payloads, in order.
pub(super) trait StreamDecoder: Send {
    /// Appends what `data` carries to `out`; returns whether the stream said it is complete
    /// (OpenAI's `[DONE]`, Anthropic's `message_stop`).
    fn decode(
        &mut self,
        data: &str,
        out: &mut VecDeque<UpstreamEvent>,
    ) -> Result<bool, UpstreamError>;
}

pub(super) fn of_kind(kind: UpstreamKind) -> Box<dyn Dialect> {
    match kind {
        UpstreamKind::Openai => Box::new(OpenAi),
        UpstreamKind::Anthropic => Box::new(Anthropic),
    }
}

/// The request as JSON bytes; a map of JSON values always serializes.
pub(super) fn encode(request: &Map<String, Value>) -> Result<Bytes, UpstreamError> {
    serde_json::to_vec(request)
        .map(Bytes::from)
        .map_err(|error| UpstreamError::Protocol(format!("cannot encode the request: {error}")))
}
