//! SSE frames, encoded once and shared.
//!
//! A log entry's frame is built once, when it arrives, and the same [`Bytes`] is handed to
//! the log and to every subscriber (a reference-count increment each), so fan-out costs no
//! allocation per subscriber. The log keeps entries as their frames only; [`decode`] reads an
//! entry back from its frame for the few readers that want the entry itself.

use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::delta::{Delta, ToolCallDelta};

/// A comment line that keeps idle connections (and the proxies on their way) open.
pub const KEEPALIVE: Bytes = Bytes::from_static(b":\n\n");

/// `id: N\nevent: token\ndata: {"index":N,"text":"…"}\n\n`
fn token(index: u64, text: &str) -> Bytes {
    text_event(index, "token", text)
}

/// `id: N\nevent: <name>\ndata: {"index":N,"text":"…"}\n\n`
fn text_event(index: u64, name: &str, text: &str) -> Bytes {
    // Sized for the whole frame up front: growing a 64-byte buffer was a realloc per token.
    let capacity = TOKEN_FRAME_OVERHEAD + text.len() + text.len() / 8;
    encode(capacity, Some(index), None, name, &TextData { index, text })
}

/// The frame of log entry `index`: `token` for text (byte-identical to [`token`]), `reasoning`
/// and `refusal` with the same `{"index","text"}` data, `tool_call` with the fragment's fields
/// (`id` and `name` only when the fragment carries them).
pub fn delta(index: u64, delta: &Delta) -> Bytes {
    #[derive(Serialize)]
    struct ToolCallData<'a> {
        index: u64,
        tool_call_index: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        arguments: &'a str,
    }
    match delta {
        Delta::Text(text) => token(index, text),
        Delta::Reasoning(text) => text_event(index, "reasoning", text),
        Delta::Refusal(text) => text_event(index, "refusal", text),
        Delta::ToolCall(call) => {
            let data = ToolCallData {
                index,
                tool_call_index: call.index,
                id: call.id.as_deref(),
                name: call.name.as_deref(),
                arguments: &call.arguments,
            };
            let capacity = TOKEN_FRAME_OVERHEAD + 64 + delta.content_len() * 9 / 8;
            encode(capacity, Some(index), None, "tool_call", &data)
        }
    }
}

/// Why bytes are not the frame of a log entry.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not the frame of a log entry")]
    Shape,
    #[error("a log entry's frame holds unexpected data: {0}")]
    Json(#[from] serde_json::Error),
}

/// The entry that [`delta`] encoded into `frame` (whatever its index). The JSON of the `data`
/// line is read back with serde_json, which restores exactly the string it escaped; a text
/// that needed no escaping (most tokens) is taken as it stands, without it.
pub fn decode(frame: &[u8]) -> Result<Delta, DecodeError> {
    #[derive(Deserialize)]
    struct Text {
        text: String,
    }
    #[derive(Deserialize)]
    struct ToolCall {
        tool_call_index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    }
    let (name, data) = event_and_data(frame).ok_or(DecodeError::Shape)?;
    let text = || match unescaped_text(data) {
        Some(text) => Ok(text.to_owned()),
        None => serde_json::from_slice::<Text>(data).map(|data| data.text),
    };
    Ok(match name {
        b"token" => Delta::Text(text()?),
        b"reasoning" => Delta::Reasoning(text()?),
        b"refusal" => Delta::Refusal(text()?),
        b"tool_call" => {
            let call: ToolCall = serde_json::from_slice(data)?;
            Delta::ToolCall(Box::new(ToolCallDelta {
                index: call.tool_call_index,
                id: call.id,
                name: call.name,
                arguments: call.arguments,
            }))
        }
        _ => return Err(DecodeError::Shape),
    })
}

/// The text of `{"index":N,"text":"…"}` when it holds no escape: then it is the text itself
/// (serde_json escapes every quote, backslash and control character). A parser costs ~10×
/// more, and the snapshot and the store writer read every entry.
fn unescaped_text(data: &[u8]) -> Option<&str> {
    let rest = data.strip_prefix(b"{\"index\":")?;
    let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
    let text = rest[digits..]
        .strip_prefix(b",\"text\":\"")?
        .strip_suffix(b"\"}")?;
    if text.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(text).ok()
}

/// The event name and the `data` of `id: N\nevent: <name>\ndata: <data>\n\n`.
fn event_and_data(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let line_end = |bytes: &[u8]| bytes.iter().position(|&byte| byte == b'\n');
    let rest = frame.strip_prefix(b"id: ")?;
    let rest = rest.get(line_end(rest)? + 1..)?.strip_prefix(b"event: ")?;
    let (name, rest) = rest.split_at(line_end(rest)?);
    let data = rest.strip_prefix(b"\ndata: ")?.strip_suffix(b"\n\n")?;
    Some((name, data))
}

#[derive(Serialize)]
struct TextData<'a> {
    index: u64,
    text: &'a str,
}

/// `id:`, `event: token`, `data:` and the JSON around the text, with room for long indexes.
const TOKEN_FRAME_OVERHEAD: usize = 80;

/// A complete event with an optional `id`, a name and a JSON `data` line.
///
/// JSON never contains a raw newline, so a single `data:` line is always a faithful encoding.
pub fn event(id: Option<u64>, name: &str, data: &impl Serialize) -> Bytes {
    encode(128, id, None, name, data)
}

/// `retry: <ms>\nevent: reconnect\ndata: {"reason":"…"}\n\n`: asks an `EventSource` to come back
/// (with `Last-Event-ID`) after `retry_ms`, ideally to a healthy instance.
pub fn reconnect(retry_ms: u64, reason: &str) -> Bytes {
    #[derive(Serialize)]
    struct Data<'a> {
        reason: &'a str,
    }
    encode(64, None, Some(retry_ms), "reconnect", &Data { reason })
}

fn encode(
    capacity: usize,
    id: Option<u64>,
    retry_ms: Option<u64>,
    name: &str,
    data: &impl Serialize,
) -> Bytes {
    let mut out = BytesMut::with_capacity(capacity).writer();
    // Writing into memory cannot fail, and serializing these plain structs cannot either; the
    // results are ignored rather than unwrapped to keep this path panic-free.
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    if let Some(ms) = retry_ms {
        let _ = writeln!(out, "retry: {ms}");
    }
    let _ = write!(out, "event: {name}\ndata: ");
    let _ = serde_json::to_writer(&mut out, data);
    let _ = out.write_all(b"\n\n");
    out.into_inner().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_frame_is_one_event_with_escaped_text() {
        let frame = token(7, "a \"quoted\"\nline");
        assert_eq!(
            &frame[..],
            b"id: 7\nevent: token\ndata: {\"index\":7,\"text\":\"a \\\"quoted\\\"\\nline\"}\n\n"
        );
    }

    #[test]
    fn each_kind_of_delta_has_its_event() {
        let text = delta(0, &Delta::Text("hi".into()));
        assert_eq!(text, token(0, "hi"));
        assert_eq!(
            &delta(1, &Delta::Reasoning("hm".into()))[..],
            b"id: 1\nevent: reasoning\ndata: {\"index\":1,\"text\":\"hm\"}\n\n"
        );
        assert_eq!(
            &delta(2, &Delta::Refusal("no".into()))[..],
            b"id: 2\nevent: refusal\ndata: {\"index\":2,\"text\":\"no\"}\n\n"
        );
        let first = Delta::ToolCall(Box::new(super::super::delta::ToolCallDelta {
            index: 1,
            id: Some("call_1".into()),
            name: Some("f".into()),
            arguments: String::new(),
        }));
        assert_eq!(
            &delta(3, &first)[..],
            &b"id: 3\nevent: tool_call\ndata: {\"index\":3,\"tool_call_index\":1,\"id\":\"call_1\",\"name\":\"f\",\"arguments\":\"\"}\n\n"[..]
        );
        let next = Delta::ToolCall(Box::new(super::super::delta::ToolCallDelta {
            index: 1,
            id: None,
            name: None,
            arguments: "{\"a\"".into(),
        }));
        assert_eq!(
            &delta(4, &next)[..],
            &b"id: 4\nevent: tool_call\ndata: {\"index\":4,\"tool_call_index\":1,\"arguments\":\"{\\\"a\\\"\"}\n\n"[..]
        );
    }

    #[test]
    fn every_entry_decodes_back_from_its_frame() {
        let tool = |index, id: Option<&str>, name: Option<&str>, arguments: &str| {
            Delta::ToolCall(Box::new(ToolCallDelta {
                index,
                id: id.map(str::to_owned),
                name: name.map(str::to_owned),
                arguments: arguments.to_owned(),
            }))
        };
        let awkward = "a \"quoted\"\nline\t\\ \u{0}\u{1f} é 🦀 \u{2028}</script>";
        for (index, entry) in [
            Delta::Text("hi".into()),
            Delta::Text(String::new()),
            Delta::Text(awkward.into()),
            Delta::Reasoning(awkward.into()),
            Delta::Refusal("no".into()),
            tool(1, Some("call_1"), Some("f"), ""),
            tool(u32::MAX, None, None, "{\"a\": \"\\n\"}"),
            tool(0, Some(""), None, awkward),
        ]
        .into_iter()
        .enumerate()
        {
            let index = index as u64 * 1_000_003;
            assert_eq!(decode(&delta(index, &entry)).unwrap(), entry);
        }
    }

    #[test]
    fn other_frames_do_not_decode_as_entries() {
        for frame in [
            KEEPALIVE,
            reconnect(10, "shutdown"),
            event(Some(3), "done", &serde_json::json!({"status": "completed"})),
            Bytes::from_static(b""),
            Bytes::from_static(b"id: 1\nevent: token\ndata: {\"index\":1}\n\n"),
            Bytes::from_static(b"id: 1\nevent: token\ndata: {\"text\":\"a\"}\n"),
        ] {
            assert!(decode(&frame).is_err(), "{frame:?}");
        }
    }

    #[test]
    fn reconnect_frame_carries_retry_and_reason() {
        assert_eq!(
            &reconnect(1500, "shutdown")[..],
            b"retry: 1500\nevent: reconnect\ndata: {\"reason\":\"shutdown\"}\n\n"
        );
    }
}
