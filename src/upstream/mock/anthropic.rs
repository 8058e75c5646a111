//! The Anthropic Messages wire format of the mock: a played [`Script`] as Anthropic's event
//! stream (`message_start`, `ping`, content blocks for thinking, text and `tool_use`,
//! `message_delta` with the stop reason and usage, `message_stop`), so that tokenfan's
//! Anthropic dialect is exercised without a key. Streaming only: tokenfan always streams.

use bytes::Bytes;
use futures_util::{stream, Stream};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{
    script::{Beat, Script},
    wire::{Abort, INVALID_JSON_FRAME},
};

/// What kind of content block is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    ToolUse,
}

/// The state of one stream between beats.
struct Writer {
    model: String,
    prompt_tokens: u32,
    /// End with `message_stop` (`done` knob).
    done: bool,
    /// The open block and its index; the next block gets `next`.
    open: Option<Block>,
    next: u32,
}

/// Plays `script` as Anthropic's event stream.
pub(super) fn frames(
    script: Script,
    model: String,
    prompt_tokens: u32,
    done: bool,
    stopping: CancellationToken,
) -> impl Stream<Item = Result<Bytes, Abort>> + Send + 'static {
    let writer = Writer {
        model,
        prompt_tokens,
        done,
        open: None,
        next: 0,
    };
    stream::unfold(
        (script, writer, stopping),
        |(mut script, mut writer, stopping)| async move {
            let frame = match script.advance(&stopping).await? {
                Beat::Role => Ok(writer.start()),
                Beat::Reasoning(text) => Ok(writer.delta(
                    Block::Thinking,
                    json!({"type": "thinking_delta", "thinking": text}),
                )),
                Beat::Token(text) => {
                    Ok(writer.delta(Block::Text, json!({"type": "text_delta", "text": text})))
                }
                Beat::ToolCall {
                    id: Some(id), name, ..
                } => Ok(writer.tool_use(id, name.unwrap_or_default())),
                Beat::ToolCall { arguments, .. } => Ok(writer.delta(
                    Block::ToolUse,
                    json!({"type": "input_json_delta", "partial_json": arguments}),
                )),
                Beat::Finish {
                    reason,
                    completion_tokens,
                } => Ok(writer.finish(reason, completion_tokens)),
                Beat::Error => Ok(event(
                    "error",
                    &json!({"type": "error",
                        "error": {"type": "api_error", "message": "mock failure"}}),
                )),
                Beat::Fail => Err(Abort::Injected),
                Beat::Released => Err(Abort::Shutdown),
                Beat::End => return None,
                Beat::InvalidJson => Ok(Bytes::from_static(INVALID_JSON_FRAME)),
                // An event type the client does not know, which it must skip.
                Beat::NoChoices => Ok(event("mock_unknown", &json!({"type": "mock_unknown"}))),
            };
            Some((frame, (script, writer, stopping)))
        },
    )
}

impl Writer {
    fn start(&mut self) -> Bytes {
        let message = json!({"type": "message_start", "message": {
            "id": format!("msg_mock{:016x}", rand::random::<u64>()),
            "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }});
        [
            event("message_start", &message),
            event("ping", &json!({"type": "ping"})),
        ]
        .concat()
        .into()
    }

    /// A delta in a block of `kind`, opening one (and closing the last) when needed.
    fn delta(&mut self, kind: Block, delta: Value) -> Bytes {
        let mut out = Vec::new();
        if self.open != Some(kind) {
            let block = match kind {
                Block::Thinking => json!({"type": "thinking", "thinking": ""}),
                Block::Text => json!({"type": "text", "text": ""}),
                // Arguments never come before their call's opening; a text block is the
                // harmless answer should a script ever do that.
                Block::ToolUse => json!({"type": "text", "text": ""}),
            };
            out.extend_from_slice(&self.open_block(kind, block));
        }
        let index = self.next - 1;
        out.extend_from_slice(&event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
        out.into()
    }

    fn tool_use(&mut self, id: &str, name: &str) -> Bytes {
        let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
        self.open_block(Block::ToolUse, block)
    }

    fn open_block(&mut self, kind: Block, block: Value) -> Bytes {
        let mut out = self.close_block();
        let index = self.next;
        self.next += 1;
        self.open = Some(kind);
        out.extend_from_slice(&event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        out.into()
    }

    fn close_block(&mut self) -> Vec<u8> {
        match self.open.take() {
            Some(_) => event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.next - 1}),
            )
            .to_vec(),
            None => Vec::new(),
        }
    }

    fn finish(&mut self, reason: &str, completion_tokens: u32) -> Bytes {
        let mut out = self.close_block();
        let stop_reason = match reason {
            "length" => "max_tokens",
            "tool_calls" => "tool_use",
            _ => "end_turn",
        };
        out.extend_from_slice(&event(
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": completion_tokens}}),
        ));
        if self.done {
            out.extend_from_slice(&event("message_stop", &json!({"type": "message_stop"})));
        }
        out.into()
    }
}

/// `event: <name>\ndata: <json>\n\n`
fn event(name: &str, data: &Value) -> Bytes {
    format!("event: {name}\ndata: {data}\n\n").into()
}
