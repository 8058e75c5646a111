//! The OpenAI-compatible chat-completions client (stub: to be written).

use futures_util::Stream;

use super::{UpstreamError, UpstreamEvent};
use crate::config::UpstreamConfig;

/// A client for one OpenAI-compatible provider; cheap to clone, shared by all generations.
#[derive(Clone)]
pub struct Upstream {}

impl Upstream {
    /// `base_url` ends in `/v1`; requests go to `{base_url}/chat/completions`.
    pub fn new(_config: &UpstreamConfig, _base_url: &str) -> Result<Self, UpstreamError> {
        Ok(Self {})
    }

    /// Starts one streaming chat completion. `request` is the client's body; `stream: true` and
    /// `stream_options.include_usage: true` are forced. Dropping the stream cancels the call.
    pub fn stream(
        &self,
        _request: serde_json::Map<String, serde_json::Value>,
    ) -> impl Stream<Item = Result<UpstreamEvent, UpstreamError>> + Send + 'static {
        futures_util::stream::empty()
    }
}
