//! Reads the two numbers the load test needs out of tokenfan's event JSON without building a
//! JSON tree per token: the emit stamp the mock puts at the start of each token's text, and
//! `token_count` of the terminal event.

use super::sse::parse_decimal;

/// The mock's `stamp` knob: a token's text starts with its emit time in Unix microseconds and a
/// space, e.g. `{"index":3,"text":"1764172800123456 word"}`.
pub fn emit_stamp_us(data: &[u8]) -> Option<u64> {
    stamp_after(data, b"\"text\":\"")
}

/// The same stamp in the mock's own `chat.completion.chunk`, at the start of
/// `choices[0].delta.content` (the role chunk's empty content has none).
pub fn content_stamp_us(data: &[u8]) -> Option<u64> {
    stamp_after(data, b"\"content\":\"")
}

fn stamp_after(data: &[u8], pattern: &[u8]) -> Option<u64> {
    let text = after(data, pattern)?;
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if text.get(digits) != Some(&b' ') {
        return None;
    }
    parse_decimal(&text[..digits])
}

/// An unsigned integer member of a flat JSON object, e.g. `token_count` of a `done` event.
pub fn u64_member(data: &[u8], key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let value = after(data, pattern.as_bytes())?;
    let value = &value[value.iter().take_while(|b| **b == b' ').count()..];
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    parse_decimal(&value[..digits])
}

/// Whether a JSON payload mentions `needle` (used for the reconnect event's `reason`).
pub fn contains(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

fn after<'a>(haystack: &'a [u8], pattern: &[u8]) -> Option<&'a [u8]> {
    let at = haystack.windows(pattern.len()).position(|w| w == pattern)?;
    Some(&haystack[at + pattern.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_emit_stamp_at_the_start_of_the_text() {
        let data = br#"{"index":3,"text":"1764172800123456 hello"}"#;
        assert_eq!(emit_stamp_us(data), Some(1_764_172_800_123_456));
    }

    #[test]
    fn reads_the_emit_stamp_of_a_mock_chunk() {
        let data = br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"1764172800123456 hello"},"finish_reason":null}]}"#;
        assert_eq!(content_stamp_us(data), Some(1_764_172_800_123_456));
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(content_stamp_us(role), None);
    }

    #[test]
    fn unstamped_text_has_no_stamp() {
        assert_eq!(emit_stamp_us(br#"{"index":3,"text":"hello"}"#), None);
        assert_eq!(emit_stamp_us(br#"{"index":3,"text":"123hello"}"#), None);
        assert_eq!(emit_stamp_us(br#"{"index":3}"#), None);
    }

    #[test]
    fn reads_token_count_of_a_done_event() {
        let data = br#"{"status":"completed","finish_reason":"stop","token_count": 42,"usage":{}}"#;
        assert_eq!(u64_member(data, "token_count"), Some(42));
        assert_eq!(u64_member(data, "missing"), None);
        assert!(contains(br#"{"reason":"slow_consumer"}"#, b"slow_consumer"));
    }
}
