//! The Anthropic Messages dialect: an OpenAI-style chat request translated into a streaming
//! `POST {url}/messages`, and Anthropic's event stream mapped onto the same
//! [`UpstreamEvent`]s as OpenAI's (text, thinking as reasoning, `tool_use` blocks as tool-call
//! fragments, `stop_reason` as OpenAI's finish reason, usage in OpenAI's field names).
//!
//! Retries need nothing of their own here: 529 `overloaded_error` is a 5xx and 429 a 429, both
//! retried by the client before the first token only.

use std::{borrow::Cow, collections::VecDeque};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    client::provider_message,
    dialect::{self, Dialect, StreamDecoder},
    openai::bounded_finish_reason,
    reader::protocol,
    UpstreamError, UpstreamEvent,
};
use crate::hub::{delta::ToolCallDelta, Delta};

/// The API version tokenfan speaks (the one whose stream this module maps).
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is used when the client gave none.
const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Content blocks one stream may open: far above any real answer, and a bound on the state a
/// hostile stream can make us keep.
const MAX_BLOCKS: usize = 1024;

pub(super) struct Anthropic;

impl Dialect for Anthropic {
    fn path(&self) -> &'static str {
        "messages"
    }

    fn key_headers(&self, key: &str) -> Vec<(&'static str, String)> {
        vec![
            ("x-api-key", key.to_owned()),
            ("anthropic-version", ANTHROPIC_VERSION.to_owned()),
        ]
    }

    fn request_body(&self, request: Map<String, Value>) -> Result<Bytes, UpstreamError> {
        dialect::encode(&translate(request))
    }

    fn decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(AnthropicStream::default())
    }

    /// `{"data":[{"type":"model","id","display_name","created_at"}],…}` as OpenAI's list.
    fn models(&self, answer: Value) -> Value {
        let data: Vec<Value> = answer["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|model| model.get("id"))
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "anthropic"}))
            .collect();
        json!({"object": "list", "data": data})
    }
}

/// An OpenAI chat request as an Anthropic Messages request: `system`/`developer` messages
/// become `system`; assistant `tool_calls` become `tool_use` blocks and `tool` messages
/// `tool_result` blocks of a user turn; `tools`, `tool_choice`, `max_tokens`, `stop`,
/// `temperature`, `top_p` are carried over. Fields without an Anthropic counterpart are left
/// out (Anthropic refuses unknown fields), except the embedded mock's `mock` knobs.
fn translate(request: Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let input = request.get("messages").and_then(Value::as_array);
    for message in input.into_iter().flatten() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        let content = message.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => system.push(plain_text(content)),
            "tool" => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id").cloned().unwrap_or_default(),
                    "content": plain_text(content),
                });
                // Results of parallel calls go back together, in one user turn.
                match messages.last_mut() {
                    Some(last) if is_tool_results(last) => {
                        if let Some(blocks) = last["content"].as_array_mut() {
                            blocks.push(result);
                        }
                    }
                    _ => messages.push(json!({"role": "user", "content": [result]})),
                }
            }
            "assistant" => {
                let mut blocks = text_blocks(content);
                let calls = message.get("tool_calls").and_then(Value::as_array);
                for call in calls.into_iter().flatten() {
                    let function = call.get("function").unwrap_or(&Value::Null);
                    let arguments = function.get("arguments").and_then(Value::as_str);
                    let input = arguments
                        .and_then(|arguments| serde_json::from_str(arguments).ok())
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or_default(),
                        "name": function.get("name").cloned().unwrap_or_default(),
                        "input": input,
                    }));
                }
                messages.push(json!({"role": "assistant", "content": blocks}));
            }
            _ => messages.push(json!({"role": "user", "content": text_blocks(content)})),
        }
    }
    let copy = |out: &mut Map<String, Value>, from: &str, to: &str| {
        if let Some(value) = request.get(from).filter(|value| !value.is_null()) {
            out.insert(to.to_owned(), value.clone());
        }
    };
    copy(&mut out, "model", "model");
    out.insert("messages".to_owned(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".to_owned(), Value::String(system.join("\n\n")));
    }
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|name| request.get(*name)?.as_u64())
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".to_owned(), max_tokens.into());
    out.insert("stream".to_owned(), Value::Bool(true));
    copy(&mut out, "temperature", "temperature");
    copy(&mut out, "top_p", "top_p");
    copy(&mut out, "mock", "mock");
    match request.get("stop") {
        Some(Value::String(stop)) => {
            out.insert("stop_sequences".to_owned(), json!([stop]));
        }
        Some(stops @ Value::Array(_)) => {
            out.insert("stop_sequences".to_owned(), stops.clone());
        }
        _ => {}
    }
    let tools: Vec<Value> = request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| tool.get("function"))
        .map(|function| {
            let mut tool = json!({
                "name": function.get("name").cloned().unwrap_or_default(),
                "input_schema": function.get("parameters").cloned()
                    .unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(description) = function.get("description") {
                tool["description"] = description.clone();
            }
            tool
        })
        .collect();
    if !tools.is_empty() {
        out.insert("tools".to_owned(), Value::Array(tools));
    }
    if let Some(choice) = request.get("tool_choice").and_then(tool_choice) {
        out.insert("tool_choice".to_owned(), choice);
    }
    out
}

fn is_tool_results(message: &Value) -> bool {
    message["role"] == "user"
        && message["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().all(|b| b["type"] == "tool_result"))
}

/// OpenAI's `tool_choice` as Anthropic's.
fn tool_choice(choice: &Value) -> Option<Value> {
    match choice {
        Value::String(mode) => match mode.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => None,
        },
        named => {
            let name = named.get("function")?.get("name")?;
            Some(json!({"type": "tool", "name": name}))
        }
    }
}

/// A message's content as text blocks: a string, or the text parts of an array.
fn text_blocks(content: &Value) -> Vec<Value> {
    let text = plain_text(content);
    if text.is_empty() {
        return Vec::new();
    }
    vec![json!({"type": "text", "text": text})]
}

/// A message's content as one string: a string as is, the text parts of an array joined.
fn plain_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text")?.as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// One event of Anthropic's stream, borrowing its text.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    content_block: Option<Block<'a>>,
    #[serde(borrow, default)]
    delta: Option<EventDelta<'a>>,
    #[serde(default)]
    message: Option<MessageStart>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct EventDelta<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MessageStart {
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Default, Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// What a content block's deltas are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    Thinking,
    /// A `tool_use` block: the tool-call index its fragments carry.
    ToolUse(u32),
    /// Anything else (`redacted_thinking`, server tools): its deltas are skipped.
    Other,
}

/// One call's reading of Anthropic's stream.
#[derive(Default)]
struct AnthropicStream {
    /// Open content blocks by the stream's block index (a few per answer: a linear search).
    blocks: Vec<(u64, BlockKind)>,
    tool_calls: u32,
    /// Prompt tokens from `message_start` (cache reads and writes included, as OpenAI counts).
    prompt_tokens: u64,
}

impl StreamDecoder for AnthropicStream {
    fn decode(
        &mut self,
        data: &str,
        out: &mut VecDeque<UpstreamEvent>,
    ) -> Result<bool, UpstreamError> {
        let event: Event = serde_json::from_str(data)
            .map_err(|error| protocol(format_args!("invalid JSON in a stream event: {error}")))?;
        match event.kind.as_ref() {
            "message_start" => {
                let usage = event.message.and_then(|m| m.usage).unwrap_or_default();
                self.prompt_tokens = [
                    usage.input_tokens,
                    usage.cache_creation_input_tokens,
                    usage.cache_read_input_tokens,
                ]
                .into_iter()
                .flatten()
                .fold(0, u64::saturating_add);
            }
            "content_block_start" => {
                let block = event
                    .content_block
                    .ok_or_else(|| protocol("content_block_start without a content_block"))?;
                self.start_block(event.index, block, out)?;
            }
            "content_block_delta" => {
                if let Some(delta) = event.delta {
                    self.block_delta(event.index, delta, out);
                }
            }
            "content_block_stop" => self.blocks.retain(|(index, _)| *index != event.index),
            "message_delta" => {
                let reason = event.delta.and_then(|delta| delta.stop_reason);
                if let Some(reason) = reason.and_then(|reason| bounded_finish_reason(reason)) {
                    out.push_back(UpstreamEvent::Finish(finish_reason(reason)));
                }
                if let Some(output) = event.usage.and_then(|usage| usage.output_tokens) {
                    let usage = json!({
                        "prompt_tokens": self.prompt_tokens,
                        "completion_tokens": output,
                        "total_tokens": self.prompt_tokens.saturating_add(output),
                    });
                    let bytes = usage.to_string().len();
                    out.push_back(UpstreamEvent::Usage { usage, bytes });
                }
            }
            "message_stop" => return Ok(true),
            "error" => {
                let error = event.error.unwrap_or_default();
                return Err(UpstreamError::Provider(provider_message(&error)));
            }
            // `ping`, and event types added later: Anthropic asks clients to ignore them.
            _ => {}
        }
        Ok(false)
    }
}

impl AnthropicStream {
    fn start_block(
        &mut self,
        index: u64,
        block: Block<'_>,
        out: &mut VecDeque<UpstreamEvent>,
    ) -> Result<(), UpstreamError> {
        if self.blocks.len() >= MAX_BLOCKS {
            return Err(protocol("too many open content blocks"));
        }
        let kind = match block.kind.as_ref() {
            "text" => {
                push_text(out, block.text, Delta::Text);
                BlockKind::Text
            }
            "thinking" => {
                push_text(out, block.thinking, Delta::Reasoning);
                BlockKind::Thinking
            }
            "tool_use" => {
                let tool = self.tool_calls;
                self.tool_calls = self.tool_calls.saturating_add(1);
                out.push_back(UpstreamEvent::Delta(Delta::ToolCall(Box::new(
                    ToolCallDelta {
                        index: tool,
                        id: block.id.map(Cow::into_owned),
                        name: block.name.map(Cow::into_owned),
                        // The block's `input` is `{}` here; the arguments follow as
                        // `input_json_delta`s.
                        arguments: String::new(),
                    },
                ))));
                BlockKind::ToolUse(tool)
            }
            _ => BlockKind::Other,
        };
        self.blocks.retain(|(open, _)| *open != index);
        self.blocks.push((index, kind));
        Ok(())
    }

    fn block_delta(&self, index: u64, delta: EventDelta<'_>, out: &mut VecDeque<UpstreamEvent>) {
        let kind = self
            .blocks
            .iter()
            .find(|(open, _)| *open == index)
            .map_or(BlockKind::Other, |(_, kind)| *kind);
        match kind {
            BlockKind::Text => push_text(out, delta.text, Delta::Text),
            BlockKind::Thinking => push_text(out, delta.thinking, Delta::Reasoning),
            BlockKind::ToolUse(tool) => {
                if let Some(json) = delta.partial_json.filter(|json| !json.is_empty()) {
                    out.push_back(UpstreamEvent::Delta(Delta::ToolCall(Box::new(
                        ToolCallDelta {
                            index: tool,
                            id: None,
                            name: None,
                            arguments: json.into_owned(),
                        },
                    ))));
                }
            }
            // A delta for a block never opened (or of a kind we skip) carries nothing for us.
            BlockKind::Other => {}
        }
    }
}

fn push_text(
    out: &mut VecDeque<UpstreamEvent>,
    text: Option<Cow<'_, str>>,
    kind: fn(String) -> Delta,
) {
    if let Some(text) = text.filter(|text| !text.is_empty()) {
        out.push_back(UpstreamEvent::Delta(kind(text.into_owned())));
    }
}

/// Anthropic's `stop_reason` in OpenAI's `finish_reason` words; unknown ones pass as they are.
fn finish_reason(stop_reason: String) -> String {
    match stop_reason.as_str() {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop".to_owned(),
        "max_tokens" => "length".to_owned(),
        "tool_use" => "tool_calls".to_owned(),
        "refusal" => "content_filter".to_owned(),
        _ => stop_reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a stream of `data:` payloads; the error that stopped it, if any.
    fn decode_all(events: &[Value]) -> (Vec<UpstreamEvent>, bool, Option<UpstreamError>) {
        let mut stream = AnthropicStream::default();
        let mut out = VecDeque::new();
        for event in events {
            match stream.decode(&event.to_string(), &mut out) {
                Ok(true) => return (out.into(), true, None),
                Ok(false) => {}
                Err(error) => return (out.into(), false, Some(error)),
            }
        }
        (out.into(), false, None)
    }

    fn tool(index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) -> UpstreamEvent {
        UpstreamEvent::Delta(Delta::ToolCall(Box::new(ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            arguments: arguments.to_owned(),
        })))
    }

    /// The shape of Anthropic's documented streaming example with extended thinking and a tool.
    #[test]
    fn a_recorded_shape_stream_maps_onto_deltas_finish_and_usage() {
        let stream = [
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 472, "cache_read_input_tokens": 10, "output_tokens": 2}}}),
            json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "thinking", "thinking": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me check."}}),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQB"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "text_delta", "text": "Okay, "}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "text_delta", "text": "checking."}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use",
                "id": "toolu_01", "name": "get_weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": ""}}),
            json!({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": "{\"location\":"}}),
            json!({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": " \"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use",
                "id": "toolu_02", "name": "get_time", "input": {}}}),
            json!({"type": "content_block_delta", "index": 3,
                "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
            json!({"type": "content_block_stop", "index": 3}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use",
                "stop_sequence": null}, "usage": {"output_tokens": 89}}),
            json!({"type": "message_stop"}),
            json!({"type": "content_block_start", "index": 9,
                "content_block": {"type": "text", "text": "never read"}}),
        ];
        let (events, ended, error) = decode_all(&stream);
        assert!(error.is_none() && ended, "{error:?}");
        assert_eq!(
            events,
            [
                UpstreamEvent::Delta(Delta::Reasoning("Let me check.".into())),
                UpstreamEvent::Delta(Delta::Text("Okay, ".into())),
                UpstreamEvent::Delta(Delta::Text("checking.".into())),
                tool(0, Some("toolu_01"), Some("get_weather"), ""),
                tool(0, None, None, "{\"location\":"),
                tool(0, None, None, " \"Paris\"}"),
                tool(1, Some("toolu_02"), Some("get_time"), ""),
                tool(1, None, None, "{}"),
                UpstreamEvent::Finish("tool_calls".into()),
                UpstreamEvent::Usage {
                    usage: json!({"prompt_tokens": 482, "completion_tokens": 89,
                        "total_tokens": 571}),
                    bytes: 63,
                },
            ]
        );
    }

    #[test]
    fn stop_reasons_read_as_openai_finish_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            (
                "model_context_window_exceeded",
                "model_context_window_exceeded",
            ),
        ] {
            let (events, _, _) =
                decode_all(&[json!({"type": "message_delta", "delta": {"stop_reason": stop}})]);
            assert_eq!(events, [UpstreamEvent::Finish(finish.into())]);
        }
    }

    #[test]
    fn hostile_streams_fail_cleanly_or_are_ignored() {
        let (_, _, error) = decode_all(&[json!({"type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"}})]);
        assert!(matches!(error, Some(UpstreamError::Provider(m)) if m == "Overloaded"));

        let mut stream = AnthropicStream::default();
        let mut out = VecDeque::new();
        let invalid = stream.decode("{\"type\": \"content_block_delta\"", &mut out);
        assert!(matches!(invalid, Err(UpstreamError::Protocol(_))));
        let untyped = stream.decode("{\"index\": 0}", &mut out);
        assert!(matches!(untyped, Err(UpstreamError::Protocol(_))));

        let (events, _, error) = decode_all(&[
            // A delta for a block that was never opened, an unknown event, an unknown block.
            json!({"type": "content_block_delta", "index": 7,
                "delta": {"type": "text_delta", "text": "orphan"}}),
            json!({"type": "future_event", "index": 0}),
            json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "redacted_thinking", "data": "xyz"}}),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "hidden"}}),
            // A stop reason too long to keep; a start without its block.
            json!({"type": "message_delta", "delta": {"stop_reason": "x".repeat(1000)}}),
            json!({"type": "content_block_start", "index": 1}),
        ]);
        assert_eq!(events, []);
        assert!(
            matches!(error, Some(UpstreamError::Protocol(_))),
            "{error:?}"
        );

        let endless: Vec<Value> = (0..=MAX_BLOCKS as u64)
            .map(|index| {
                json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}})
            })
            .collect();
        let (_, _, error) = decode_all(&endless);
        assert!(
            matches!(error, Some(UpstreamError::Protocol(_))),
            "{error:?}"
        );
    }

    #[test]
    fn an_openai_request_is_translated_to_messages() {
        let request = json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "weather", "arguments": "not json"}},
                ]},
                {"role": "tool", "tool_call_id": "call_a", "content": "12C"},
                {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "3C"}]},
            ],
            "tools": [{"type": "function", "function": {"name": "weather",
                "description": "Current weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required",
            "stop": "END",
            "temperature": 0.2,
            "stream_options": {"include_usage": true},
            "n": 1,
            "mock": {"tokens": 3},
        });
        let body = Anthropic
            .request_body(request.as_object().unwrap().clone())
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-sonnet-4-5",
                "system": "Be brief.\n\nNo emoji.",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Oslo?"}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "call_b", "name": "weather", "input": {}},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_a", "content": "12C"},
                        {"type": "tool_result", "tool_use_id": "call_b", "content": "3C"},
                    ]},
                ],
                "tools": [{"name": "weather", "description": "Current weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                "tool_choice": {"type": "any"},
                "max_tokens": DEFAULT_MAX_TOKENS,
                "stop_sequences": ["END"],
                "temperature": 0.2,
                "stream": true,
                "mock": {"tokens": 3},
            })
        );
        let named = tool_choice(&json!({"type": "function", "function": {"name": "f"}}));
        assert_eq!(named, Some(json!({"type": "tool", "name": "f"})));
        let capped = translate(
            json!({"model": "m", "messages": [], "max_tokens": 50, "max_completion_tokens": 20})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(capped["max_tokens"], 20);
    }
}
