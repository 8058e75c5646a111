//! One entry of a generation's log: a piece of whatever the provider streams.
//!
//! Text is the common case and stays the cheapest (the provider's `String`, moved in). Reasoning,
//! refusals and tool-call fragments are entries like text, with the same `id` = index rule, so a
//! subscriber resumes across all of them with one `Last-Event-ID`.
//!
//! [`Delta::encode`] / [`Delta::decode`] are a compact binary form for a store that keeps each
//! entry as opaque bytes per index (a shared store for several instances); nothing in memory
//! depends on it.

use std::borrow::Borrow;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;

/// A piece of one generation, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Answer text (`delta.content`).
    Text(String),
    /// Reasoning text (`delta.reasoning_content` / `delta.reasoning`, Anthropic `thinking`).
    Reasoning(String),
    /// Refusal text (`delta.refusal`).
    Refusal(String),
    /// A fragment of one tool call. Boxed: it is the rare, large variant, and a text entry
    /// should not pay for its size in every log slot.
    ToolCall(Box<ToolCallDelta>),
}

/// A fragment of tool call `index`: its first fragment usually carries `id` and `name`, the
/// following ones only pieces of `arguments` (a JSON text, streamed in arbitrary splits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// Why bytes are not an encoded [`Delta`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("an encoded delta is empty")]
    Empty,
    #[error("unknown delta tag {0}")]
    UnknownTag(u8),
    #[error("an encoded delta is truncated")]
    Truncated,
    #[error("an encoded delta holds invalid UTF-8")]
    Utf8,
}

const TAG_TEXT: u8 = 0;
const TAG_REASONING: u8 = 1;
const TAG_REFUSAL: u8 = 2;
const TAG_TOOL_CALL: u8 = 3;
const HAS_ID: u8 = 1;
const HAS_NAME: u8 = 2;

impl Delta {
    /// Bytes of provider content this entry holds, for the log's byte limit and memory count.
    pub fn content_len(&self) -> usize {
        match self {
            Self::Text(text) | Self::Reasoning(text) | Self::Refusal(text) => text.len(),
            Self::ToolCall(call) => {
                call.arguments.len()
                    + call.id.as_ref().map_or(0, String::len)
                    + call.name.as_ref().map_or(0, String::len)
            }
        }
    }

    /// A tag byte, then the text; for a tool call: the index (u32 LE), a flags byte, the id and
    /// name each as a u32 LE length and bytes when present, then the arguments.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(1 + 13 + self.content_len());
        match self {
            Self::Text(text) => put_text(&mut out, TAG_TEXT, text),
            Self::Reasoning(text) => put_text(&mut out, TAG_REASONING, text),
            Self::Refusal(text) => put_text(&mut out, TAG_REFUSAL, text),
            Self::ToolCall(call) => {
                out.put_u8(TAG_TOOL_CALL);
                out.put_u32_le(call.index);
                let flags = if call.id.is_some() { HAS_ID } else { 0 }
                    | if call.name.is_some() { HAS_NAME } else { 0 };
                out.put_u8(flags);
                for field in [&call.id, &call.name].into_iter().flatten() {
                    // A field over 4 GiB cannot come out of a bounded log; saturating keeps
                    // this panic-free, and decoding would then refuse it as truncated.
                    out.put_u32_le(u32::try_from(field.len()).unwrap_or(u32::MAX));
                    out.put_slice(field.as_bytes());
                }
                out.put_slice(call.arguments.as_bytes());
            }
        }
        out.freeze()
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let tag = bytes.get_u8();
        Ok(match tag {
            TAG_TEXT => Self::Text(text(bytes)?),
            TAG_REASONING => Self::Reasoning(text(bytes)?),
            TAG_REFUSAL => Self::Refusal(text(bytes)?),
            TAG_TOOL_CALL => {
                if bytes.len() < 5 {
                    return Err(DecodeError::Truncated);
                }
                let index = bytes.get_u32_le();
                let flags = bytes.get_u8();
                let mut field = |present: bool| -> Result<Option<String>, DecodeError> {
                    if !present {
                        return Ok(None);
                    }
                    if bytes.len() < 4 {
                        return Err(DecodeError::Truncated);
                    }
                    let len = usize::try_from(bytes.get_u32_le()).unwrap_or(usize::MAX);
                    if bytes.len() < len {
                        return Err(DecodeError::Truncated);
                    }
                    let (value, rest) = bytes.split_at(len);
                    bytes = rest;
                    text(value).map(Some)
                };
                let id = field(flags & HAS_ID != 0)?;
                let name = field(flags & HAS_NAME != 0)?;
                Self::ToolCall(Box::new(ToolCallDelta {
                    index,
                    id,
                    name,
                    arguments: text(bytes)?,
                }))
            }
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

fn put_text(out: &mut BytesMut, tag: u8, text: &str) {
    out.put_u8(tag);
    out.put_slice(text.as_bytes());
}

fn text(bytes: &[u8]) -> Result<String, DecodeError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Utf8)
}

/// The parts of a generation that are not answer text, assembled from its log: what the
/// snapshot and a non-streaming completion show.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Assembled {
    pub text: String,
    pub reasoning: Option<String>,
    pub refusal: Option<String>,
    /// In tool-call index order, in OpenAI's message shape.
    pub tool_calls: Vec<ToolCall>,
}

/// One whole tool call, as in an OpenAI assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    /// The provider's tool-call index; not part of OpenAI's message shape.
    #[serde(skip)]
    pub index: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: ToolFunction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolFunction {
    pub name: String,
    pub arguments: String,
}

impl Assembled {
    /// Joins the log's deltas: texts concatenated by kind, tool-call fragments by index (the
    /// first id and name seen win; argument fragments are appended in order).
    pub fn of<D: Borrow<Delta>>(deltas: impl IntoIterator<Item = D>) -> Self {
        let mut assembled = Self::default();
        for delta in deltas {
            assembled.push(delta.borrow());
        }
        assembled
    }

    pub fn push(&mut self, delta: &Delta) {
        match delta {
            Delta::Text(text) => self.text.push_str(text),
            Delta::Reasoning(text) => self.reasoning.get_or_insert_default().push_str(text),
            Delta::Refusal(text) => self.refusal.get_or_insert_default().push_str(text),
            Delta::ToolCall(fragment) => self.add_fragment(fragment),
        }
    }

    fn add_fragment(&mut self, fragment: &ToolCallDelta) {
        let at = match self
            .tool_calls
            .binary_search_by_key(&fragment.index, |call| call.index)
        {
            Ok(at) => at,
            Err(at) => {
                let call = ToolCall {
                    index: fragment.index,
                    id: String::new(),
                    kind: "function",
                    function: ToolFunction {
                        name: String::new(),
                        arguments: String::new(),
                    },
                };
                self.tool_calls.insert(at, call);
                at
            }
        };
        let call = &mut self.tool_calls[at];
        if let (true, Some(id)) = (call.id.is_empty(), &fragment.id) {
            call.id.clone_from(id);
        }
        if let (true, Some(name)) = (call.function.name.is_empty(), &fragment.name) {
            call.function.name.clone_from(name);
        }
        call.function.arguments.push_str(&fragment.arguments);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) -> Delta {
        Delta::ToolCall(Box::new(ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            arguments: arguments.to_owned(),
        }))
    }

    #[test]
    fn every_kind_survives_encode_then_decode() {
        for delta in [
            Delta::Text("Hello, \"world\"\n".into()),
            Delta::Text(String::new()),
            Delta::Reasoning("thinking…".into()),
            Delta::Refusal("I can't help with that.".into()),
            tool(0, Some("call_1"), Some("get_weather"), ""),
            tool(3, None, None, "{\"city\":"),
            tool(u32::MAX, None, Some(""), "é"),
            tool(1, Some(""), None, ""),
        ] {
            assert_eq!(
                Delta::decode(&delta.encode()),
                Ok(delta.clone()),
                "{delta:?}"
            );
        }
    }

    #[test]
    fn plain_text_encodes_as_a_tag_and_its_bytes() {
        assert_eq!(&Delta::Text("hi".into()).encode()[..], b"\0hi");
    }

    #[test]
    fn malformed_bytes_are_refused_not_panicked_on() {
        assert_eq!(Delta::decode(b""), Err(DecodeError::Empty));
        assert_eq!(Delta::decode(b"\x09x"), Err(DecodeError::UnknownTag(9)));
        assert_eq!(Delta::decode(b"\0\xff"), Err(DecodeError::Utf8));
        assert_eq!(Delta::decode(b"\x03\0\0"), Err(DecodeError::Truncated));
        // Claims an id of 255 bytes, has 2.
        assert_eq!(
            Delta::decode(b"\x03\0\0\0\0\x01\xff\0\0\0ab"),
            Err(DecodeError::Truncated)
        );
        let whole = tool(2, Some("call_9"), Some("f"), "{}").encode();
        for cut in 1..12 {
            assert!(Delta::decode(&whole[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn parallel_tool_calls_assemble_by_index_in_order() {
        let log = [
            Delta::Reasoning("Two ".into()),
            Delta::Reasoning("cities.".into()),
            tool(1, Some("call_b"), Some("weather"), ""),
            tool(0, Some("call_a"), Some("weather"), "{\"city\""),
            tool(1, None, None, "{\"city\":\"Oslo\"}"),
            tool(0, None, None, ":\"Paris\"}"),
            Delta::Text("ok".into()),
        ];
        let assembled = Assembled::of(&log);
        assert_eq!(assembled.text, "ok");
        assert_eq!(assembled.reasoning.as_deref(), Some("Two cities."));
        assert_eq!(assembled.refusal, None);
        let calls: Vec<_> = assembled
            .tool_calls
            .iter()
            .map(|call| (call.id.as_str(), call.function.arguments.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                ("call_a", "{\"city\":\"Paris\"}"),
                ("call_b", "{\"city\":\"Oslo\"}")
            ]
        );
        assert_eq!(
            serde_json::to_value(&assembled.tool_calls[0]).unwrap(),
            serde_json::json!({"id": "call_a", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}})
        );
    }
}
