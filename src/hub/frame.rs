//! SSE frames, encoded once and shared.
//!
//! A token's frame is built once, when the token arrives, and the same [`Bytes`] is handed to
//! the log and to every subscriber (a reference-count increment each), so fan-out costs no
//! allocation per subscriber.

use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// A comment line that keeps idle connections (and the proxies on their way) open.
pub const KEEPALIVE: Bytes = Bytes::from_static(b":\n\n");

/// `id: N\nevent: token\ndata: {"index":N,"text":"…"}\n\n`
pub fn token(index: u64, text: &str) -> Bytes {
    #[derive(Serialize)]
    struct Data<'a> {
        index: u64,
        text: &'a str,
    }
    // Sized for the whole frame up front: growing a 64-byte buffer was a realloc per token.
    let capacity = TOKEN_FRAME_OVERHEAD + text.len() + text.len() / 8;
    encode(capacity, Some(index), None, "token", &Data { index, text })
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
    fn reconnect_frame_carries_retry_and_reason() {
        assert_eq!(
            &reconnect(1500, "shutdown")[..],
            b"retry: 1500\nevent: reconnect\ndata: {\"reason\":\"shutdown\"}\n\n"
        );
    }
}
