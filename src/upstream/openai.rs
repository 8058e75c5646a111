//! The OpenAI dialect: the request with streaming and usage forced on, and each
//! `chat.completion.chunk` decoded into [`UpstreamEvent`]s: every kind of delta (text,
//! reasoning, refusal, tool-call fragments), the finish reason and the final usage, each
//! bounded before it is kept.

use std::{borrow::Cow, collections::VecDeque, fmt, marker::PhantomData};

use serde::{
    de::{SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::{value::RawValue, Value};

use bytes::Bytes;
use serde_json::Map;

use crate::{
    hub::{delta::ToolCallDelta, Delta},
    upstream::{
        client::provider_message,
        dialect::{self, Dialect, StreamDecoder},
        reader::protocol,
        UpstreamError, UpstreamEvent, MAX_FINISH_REASON_BYTES, MAX_USAGE_BYTES,
    },
};

/// OpenAI-compatible chat completions.
pub(crate) struct OpenAi;

impl Dialect for OpenAi {
    fn path(&self) -> &'static str {
        "chat/completions"
    }

    fn key_headers(&self, key: &str) -> Vec<(&'static str, String)> {
        vec![("authorization", format!("Bearer {key}"))]
    }

    /// The client's request with streaming and usage reporting forced on; other
    /// `stream_options` fields are kept.
    fn request_body(&self, mut request: Map<String, Value>) -> Result<Bytes, UpstreamError> {
        request.insert("stream".to_owned(), Value::Bool(true));
        let options = request.entry("stream_options").or_insert(Value::Null);
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(options) = options {
            options.insert("include_usage".to_owned(), Value::Bool(true));
        }
        dialect::encode(&request)
    }

    fn decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(OpenAiStream)
    }

    /// Already OpenAI's list.
    fn models(&self, answer: Value) -> Value {
        answer
    }
}

/// An OpenAI stream keeps no state between chunks.
struct OpenAiStream;

impl StreamDecoder for OpenAiStream {
    fn decode(
        &mut self,
        data: &str,
        out: &mut VecDeque<UpstreamEvent>,
    ) -> Result<bool, UpstreamError> {
        if data.trim_ascii() == "[DONE]" {
            return Ok(true);
        }
        decode_chunk(data, out)?;
        Ok(false)
    }
}

/// A `chat.completion.chunk`, borrowing from the event data: parsing a text chunk allocates
/// nothing but the text. `usage` stays raw until its size is checked.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Option<FirstChoice<'a>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<ChoiceDelta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChoiceDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    /// DeepSeek, vLLM, SGLang.
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    /// OpenRouter, Ollama.
    #[serde(borrow, default)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallChunk<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallChunk<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<FunctionChunk<'a>>,
}

#[derive(Deserialize)]
struct FunctionChunk<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
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

/// Decodes one event's data, appending its events to `out` in the order they are to be
/// yielded: reasoning, text, refusal, tool-call fragments, finish reason, usage.
///
/// A chunk with neither a choice, a final usage nor an error is ignored rather than rejected:
/// compatible providers interleave such chunks (Azure's `prompt_filter_results`, heartbeat
/// objects), and a stream that never finishes is still caught at its end.
fn decode_chunk(data: &str, out: &mut VecDeque<UpstreamEvent>) -> Result<(), UpstreamError> {
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|error| protocol(format_args!("invalid JSON in a stream chunk: {error}")))?;
    if let Some(error) = chunk.error {
        return Err(UpstreamError::Provider(provider_message(&error)));
    }
    let choice = chunk.choices.and_then(|choices| choices.0);
    let has_choice = choice.is_some();
    let mut finished = false;
    if let Some(Choice {
        delta,
        finish_reason,
        ..
    }) = choice
    {
        if let Some(delta) = delta {
            push_deltas(delta, out);
        }
        if let Some(reason) = finish_reason.and_then(bounded_finish_reason) {
            out.push_back(UpstreamEvent::Finish(reason));
            finished = true;
        }
    }
    // The final usage rides alone (`choices: []`, OpenAI) or next to the finish_reason (some
    // compatible servers). Usage on every chunk (vLLM's continuous stats) is not the total.
    if let Some(usage) = chunk.usage.filter(|_| !has_choice || finished) {
        if let Some(event) = bounded_usage(usage.get())? {
            out.push_back(event);
        }
    }
    Ok(())
}

fn push_deltas(delta: ChoiceDelta<'_>, out: &mut VecDeque<UpstreamEvent>) {
    let text =
        |text: Option<Cow<'_, str>>| text.filter(|text| !text.is_empty()).map(Cow::into_owned);
    if let Some(reasoning) = text(delta.reasoning_content.or(delta.reasoning)) {
        out.push_back(UpstreamEvent::Delta(Delta::Reasoning(reasoning)));
    }
    if let Some(content) = text(delta.content) {
        out.push_back(UpstreamEvent::Delta(Delta::Text(content)));
    }
    if let Some(refusal) = text(delta.refusal) {
        out.push_back(UpstreamEvent::Delta(Delta::Refusal(refusal)));
    }
    for call in delta.tool_calls.into_iter().flatten() {
        let (name, arguments) = call
            .function
            .map_or((None, None), |function| (function.name, function.arguments));
        let fragment = ToolCallDelta {
            index: call.index,
            id: text(call.id),
            name: text(name),
            arguments: arguments.map(Cow::into_owned).unwrap_or_default(),
        };
        // Some providers repeat an empty fragment (no id, no name, no arguments): nothing to
        // log.
        if fragment.id.is_some() || fragment.name.is_some() || !fragment.arguments.is_empty() {
            out.push_back(UpstreamEvent::Delta(Delta::ToolCall(Box::new(fragment))));
        }
    }
}

/// A finish reason is a short word; a longer one is not kept (it would be held, and sent to
/// every viewer, for the generation's lifetime).
pub(crate) fn bounded_finish_reason(reason: Cow<'_, str>) -> Option<String> {
    if reason.len() > MAX_FINISH_REASON_BYTES {
        tracing::warn!(
            bytes = reason.len(),
            limit = MAX_FINISH_REASON_BYTES,
            "the provider's finish_reason is too long: dropped"
        );
        return None;
    }
    Some(reason.into_owned())
}

/// The usage object if it is one and within [`MAX_USAGE_BYTES`] of JSON; a larger one is
/// dropped with a warning before it is parsed (a 0.9 MB object held ~15 MiB once parsed).
fn bounded_usage(raw: &str) -> Result<Option<UpstreamEvent>, UpstreamError> {
    if raw.len() > MAX_USAGE_BYTES {
        tracing::warn!(
            bytes = raw.len(),
            limit = MAX_USAGE_BYTES,
            "the provider's usage object is too large: dropped"
        );
        return Ok(None);
    }
    let usage: Value = serde_json::from_str(raw).map_err(protocol)?;
    Ok(usage.is_object().then_some(UpstreamEvent::Usage {
        usage,
        bytes: raw.len(),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::upstream::client::MAX_MESSAGE_CHARS;

    fn decoded(data: Value) -> Vec<UpstreamEvent> {
        let mut out = VecDeque::new();
        decode_chunk(&data.to_string(), &mut out).unwrap();
        out.into()
    }

    fn text(text: &str) -> UpstreamEvent {
        UpstreamEvent::Delta(Delta::Text(text.to_owned()))
    }

    fn usage(usage: Value) -> UpstreamEvent {
        let bytes = usage.to_string().len();
        UpstreamEvent::Usage { usage, bytes }
    }

    #[test]
    fn chunks_decode_into_events() {
        let role =
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
        assert_eq!(decoded(role), []);
        let escaped = json!({"choices": [{"index": 0, "delta": {"content": "a\"b\n"}}]});
        assert_eq!(decoded(escaped), [text("a\"b\n")]);
        let null_content =
            json!({"choices": [{"index": 0, "delta": {"content": null, "refusal": null}}]});
        assert_eq!(decoded(null_content), []);
        let other_choice = json!({"choices": [{"index": 1, "delta": {"content": "x"}}]});
        assert_eq!(decoded(other_choice), []);
        let no_choices = json!({"id": "x", "prompt_filter_results": []});
        assert_eq!(decoded(no_choices), []);
        let null_choices = json!({"choices": null, "usage": {"total_tokens": 3}});
        assert_eq!(decoded(null_choices), [usage(json!({"total_tokens": 3}))]);
    }

    #[test]
    fn reasoning_refusal_and_parallel_tool_calls_are_kept_in_order() {
        let chunk = json!({"choices": [{"index": 0, "delta": {
            "reasoning_content": "think",
            "content": "so",
            "refusal": "no",
            "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function",
                 "function": {"name": "f", "arguments": ""}},
                {"index": 1, "function": {"arguments": "{\"x\""}},
                {"index": 2, "function": {}},
            ],
        }}]});
        let tool = |index, id: Option<&str>, name: Option<&str>, arguments: &str| {
            UpstreamEvent::Delta(Delta::ToolCall(Box::new(ToolCallDelta {
                index,
                id: id.map(str::to_owned),
                name: name.map(str::to_owned),
                arguments: arguments.to_owned(),
            })))
        };
        assert_eq!(
            decoded(chunk),
            [
                UpstreamEvent::Delta(Delta::Reasoning("think".into())),
                text("so"),
                UpstreamEvent::Delta(Delta::Refusal("no".into())),
                tool(0, Some("call_a"), Some("f"), ""),
                tool(1, None, None, "{\"x\""),
            ]
        );
        let openrouter = json!({"choices": [{"index": 0, "delta": {"reasoning": "hm"}}]});
        assert_eq!(
            decoded(openrouter),
            [UpstreamEvent::Delta(Delta::Reasoning("hm".into()))]
        );
    }

    #[test]
    fn usage_counts_only_on_the_final_chunk() {
        let running = json!({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"total_tokens": 1}});
        assert_eq!(decoded(running), [text("x")]);
        let last = json!({
            "choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": "length"}],
            "usage": {"total_tokens": 2},
        });
        assert_eq!(
            decoded(last),
            [
                text("y"),
                UpstreamEvent::Finish("length".to_owned()),
                usage(json!({"total_tokens": 2})),
            ]
        );
    }

    #[test]
    fn oversized_usage_and_finish_reason_are_dropped() {
        let huge = json!({"choices": [], "usage": {"pad": "x".repeat(MAX_USAGE_BYTES)}});
        assert_eq!(decoded(huge), []);
        let long_reason = "r".repeat(MAX_FINISH_REASON_BYTES + 1);
        let chunk = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": long_reason}]});
        assert_eq!(decoded(chunk), []);
        let ok_reason = "r".repeat(MAX_FINISH_REASON_BYTES);
        let chunk = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": ok_reason}]});
        assert_eq!(decoded(chunk), [UpstreamEvent::Finish(ok_reason)]);
    }

    #[test]
    fn provider_errors_keep_a_bounded_message() {
        let mut out = VecDeque::new();
        let bare = decode_chunk(r#"{"error":"boom"}"#, &mut out).unwrap_err();
        assert!(matches!(&bare, UpstreamError::Provider(message) if message == "boom"));
        let long = json!({"error": {"message": "é".repeat(2 * MAX_MESSAGE_CHARS)}});
        let UpstreamError::Provider(message) =
            decode_chunk(&long.to_string(), &mut out).unwrap_err()
        else {
            panic!("not a provider error");
        };
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn request_body_forces_streaming_and_usage() {
        let request = json!({"model": "m", "messages": [], "stream": false,
            "stream_options": "nonsense"});
        let request = request.as_object().unwrap().clone();
        let body: Value = serde_json::from_slice(&OpenAi.request_body(request).unwrap()).unwrap();
        assert_eq!(body["stream"], json!(true));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(body["model"], json!("m"));
    }
}
