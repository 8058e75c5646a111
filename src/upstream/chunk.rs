//! OpenAI's `chat.completion.chunk` as tokenfan writes it: the embedded mock streams it
//! (`mock/wire.rs`) and the OpenAI-compatible endpoint re-encodes the token log as it
//! (`api/chat.rs`). One definition, so both write the same fields in the same order.
//!
//! Reading a provider's chunks is `openai.rs`'s business: it borrows only the fields it needs.

use bytes::BufMut;
use serde::Serialize;

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

#[derive(Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

impl<'a> Delta<'a> {
    /// The first chunk's delta: the role, with empty content, as OpenAI sends it.
    pub fn role() -> Self {
        Self {
            role: Some("assistant"),
            content: Some(""),
        }
    }

    /// A piece of the answer.
    pub fn content(text: &'a str) -> Self {
        Self {
            role: None,
            content: Some(text),
        }
    }
}

/// Appends `data` as one SSE event, `data: <json>` and a blank line.
pub fn write_data(out: &mut impl BufMut, data: &impl Serialize) -> serde_json::Result<()> {
    out.put_slice(b"data: ");
    serde_json::to_writer(out.writer(), data)?;
    out.put_slice(b"\n\n");
    Ok(())
}
