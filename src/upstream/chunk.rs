//! OpenAI's `chat.completion.chunk` as tokenfan writes it: the embedded mock streams it
//! (`mock/wire.rs`) and the OpenAI-compatible endpoint re-encodes the token log as it
//! (`api/chat.rs`). One definition, so both write the same fields in the same order.
//!
//! Reading a provider's chunks is `openai.rs`'s business: it borrows only the fields it needs.

use bytes::BufMut;
use serde::Serialize;

use crate::hub::{delta::Assembled, Delta as LogDelta};

/// One `chat.completion.chunk`. `U` is the usage object: the mock counts its own, the chat
/// endpoint passes on the provider's as it came.
#[derive(Serialize)]
pub struct Chunk<'a, U> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// `None` leaves the field out; OpenAI sends `"usage": null` on every chunk but the last
    /// when usage was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<U>,
}

impl<'a, U> Chunk<'a, U> {
    /// A chunk of the completion `id`, created at `created` (Unix seconds) by `model`.
    pub fn new(
        id: &'a str,
        created: u64,
        model: &'a str,
        choices: &'a [ChunkChoice<'a>],
        usage: Option<U>,
    ) -> Self {
        Self {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            choices,
            usage,
        }
    }
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    /// `Some(())` writes OpenAI's `"logprobs": null`; `None` leaves the field out (the mock's
    /// chunks never had it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
}

/// A chunk's `delta`: one kind of content at a time, as tokenfan writes them (a provider may
/// combine them; clients accumulate either way).
#[derive(Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    /// The name DeepSeek, vLLM and others stream reasoning under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[ToolCallChunk<'a>; 1]>,
}

/// One fragment of a streamed tool call: `id`, `type` and the function's `name` on its first
/// fragment, then pieces of `arguments`.
#[derive(Serialize)]
pub struct ToolCallChunk<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionChunk<'a>,
}

#[derive(Serialize)]
pub struct FunctionChunk<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub arguments: &'a str,
}

impl<'a> Delta<'a> {
    /// The first chunk's delta: the role, with empty content, as OpenAI sends it.
    pub fn role() -> Self {
        Self {
            role: Some("assistant"),
            content: Some(""),
            ..Self::default()
        }
    }

    /// A piece of the answer.
    pub fn content(text: &'a str) -> Self {
        Self {
            content: Some(text),
            ..Self::default()
        }
    }

    pub fn reasoning(text: &'a str) -> Self {
        Self {
            reasoning_content: Some(text),
            ..Self::default()
        }
    }

    pub fn refusal(text: &'a str) -> Self {
        Self {
            refusal: Some(text),
            ..Self::default()
        }
    }

    /// A fragment of tool call `index`; `type: "function"` goes with the id, as OpenAI sends it.
    pub fn tool_call(
        index: u32,
        id: Option<&'a str>,
        name: Option<&'a str>,
        arguments: &'a str,
    ) -> Self {
        Self {
            tool_calls: Some([ToolCallChunk {
                index,
                id,
                kind: id.map(|_| "function"),
                function: FunctionChunk { name, arguments },
            }]),
            ..Self::default()
        }
    }

    /// A logged delta as a chunk's delta.
    pub fn of(delta: &'a LogDelta) -> Self {
        match delta {
            LogDelta::Text(text) => Self::content(text),
            LogDelta::Reasoning(text) => Self::reasoning(text),
            LogDelta::Refusal(text) => Self::refusal(text),
            LogDelta::ToolCall(call) => Self::tool_call(
                call.index,
                call.id.as_deref(),
                call.name.as_deref(),
                &call.arguments,
            ),
        }
    }
}

/// The assistant message of a whole `chat.completion`, in OpenAI's shape: `content` is null
/// when the answer is only tool calls or a refusal; `refusal` is always there (null when
/// none); `reasoning_content` and `tool_calls` only when there are some.
pub fn message(answer: &Assembled) -> serde_json::Value {
    let has_text =
        !answer.text.is_empty() || (answer.tool_calls.is_empty() && answer.refusal.is_none());
    let mut message = serde_json::json!({
        "role": "assistant",
        "content": has_text.then_some(answer.text.as_str()),
        "refusal": answer.refusal,
    });
    if let Some(reasoning) = &answer.reasoning {
        message["reasoning_content"] = reasoning.as_str().into();
    }
    if !answer.tool_calls.is_empty() {
        message["tool_calls"] = serde_json::json!(answer.tool_calls);
    }
    message
}

/// Appends `data` as one SSE event, `data: <json>` and a blank line.
pub fn write_data(out: &mut impl BufMut, data: &impl Serialize) -> serde_json::Result<()> {
    out.put_slice(b"data: ");
    serde_json::to_writer(out.writer(), data)?;
    out.put_slice(b"\n\n");
    Ok(())
}
