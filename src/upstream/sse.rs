//! Incremental decoding of the provider's `text/event-stream` body.
//!
//! [`SseDecoder`] takes the body in chunks of any size, split anywhere (inside a CRLF pair, inside
//! a multi-byte character), and lends out the `data` of each complete event, following the WHATWG
//! rules: one leading BOM ignored; CRLF, LF and lone CR all end a line; `:` lines are comments; a
//! field's value loses one leading space; `data` lines are joined with LF; a blank line dispatches.
//! OpenAI-compatible chat streams carry everything in `data`, so `event`, `id` and `retry` are
//! parsed as fields and dropped. An event left unfinished at EOF is discarded, as the spec says.
//!
//! Why not the `sse-stream` crate: it is correct on every framing case tested below, but it
//! buffers a line or an event of any length (an 8 MiB line without an end was held in memory
//! without complaint) and allocates two buffers per event. Here memory is bounded by
//! [`MAX_EVENT_BYTES`] and, after warm-up, an event costs no allocation at all.

use std::ops::Range;

/// Longest line, and most event data, accepted from the provider. A chat chunk is a few hundred
/// bytes; anything near this is a broken or hostile upstream, not a token.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Buffer capacity kept once a large chunk has been consumed, so that one burst does not pin
/// memory for the rest of a long generation.
const RETAINED_CAPACITY: usize = 64 * 1024;

const BOM: &[u8] = "\u{feff}".as_bytes();

/// Why the body is not an event stream we accept.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE line is longer than {MAX_EVENT_BYTES} bytes")]
    LineTooLong,
    #[error("an SSE event carries more than {MAX_EVENT_BYTES} bytes of data")]
    EventTooLarge,
}

/// Turns body chunks into event data; see the module doc. Call [`push`](Self::push) with each
/// chunk, then [`next_data`](Self::next_data) until it returns `None`.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Received bytes; `buf[pos..]` is not parsed yet.
    buf: Vec<u8>,
    pos: usize,
    /// `buf[pos..pos + scanned]` holds no line ending: a long line arriving in small chunks is
    /// scanned once, not once per chunk.
    scanned: usize,
    /// The data buffer of the event being built: each data line followed by LF.
    data: String,
    /// `data` was lent out as an event and is cleared before the next one is built.
    dispatched: bool,
    /// The last line ended with a CR at the end of the input; an LF arriving next completes
    /// that CRLF rather than ending an empty line.
    skip_lf: bool,
    /// The leading BOM check is done.
    started: bool,
}

impl SseDecoder {
    /// Appends a body chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        if self.buf.is_empty() && self.buf.capacity() > RETAINED_CAPACITY {
            self.buf.shrink_to(RETAINED_CAPACITY);
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The data of the next complete event, or `None` until more input is pushed.
    pub fn next_data(&mut self) -> Result<Option<&str>, SseError> {
        if self.dispatched {
            self.data.clear();
            self.dispatched = false;
        }
        if !self.started && !self.skip_bom() {
            return Ok(None);
        }
        while let Some(line) = self.next_line()? {
            if apply_line(&self.buf[line], &mut self.data)? {
                self.dispatched = true;
                // The data buffer ends with the LF of its last line, which the spec removes.
                return Ok(Some(self.data.strip_suffix('\n').unwrap_or(&self.data)));
            }
        }
        Ok(None)
    }

    /// Drops one leading BOM. False while too few bytes have arrived to tell.
    fn skip_bom(&mut self) -> bool {
        let rest = &self.buf[self.pos..];
        if rest.len() < BOM.len() && BOM.starts_with(rest) {
            return false;
        }
        if rest.starts_with(BOM) {
            self.pos += BOM.len();
        }
        self.started = true;
        true
    }

    /// The next complete line (without its ending), consumed from the buffer.
    fn next_line(&mut self) -> Result<Option<Range<usize>>, SseError> {
        if self.skip_lf {
            match self.buf.get(self.pos) {
                None => return Ok(None),
                Some(byte) => {
                    self.skip_lf = false;
                    if *byte == b'\n' {
                        self.pos += 1;
                    }
                }
            }
        }
        let start = self.pos;
        let unscanned = &self.buf[start + self.scanned..];
        let Some(offset) = memchr::memchr2(b'\n', b'\r', unscanned) else {
            self.scanned = self.buf.len() - start;
            if self.scanned > MAX_EVENT_BYTES {
                return Err(SseError::LineTooLong);
            }
            return Ok(None);
        };
        let end = start + self.scanned + offset;
        self.scanned = 0;
        if end - start > MAX_EVENT_BYTES {
            return Err(SseError::LineTooLong);
        }
        self.pos = end + 1;
        if self.buf[end] == b'\r' {
            match self.buf.get(self.pos) {
                Some(b'\n') => self.pos += 1,
                Some(_) => {}
                None => self.skip_lf = true,
            }
        }
        Ok(Some(start..end))
    }
}

/// Applies one line to the event being built. True when it dispatches an event.
fn apply_line(line: &[u8], data: &mut String) -> Result<bool, SseError> {
    if line.is_empty() {
        return Ok(!data.is_empty());
    }
    let (field, value) = match memchr::memchr(b':', line) {
        Some(0) => return Ok(false),
        Some(colon) => (&line[..colon], &line[colon + 1..]),
        None => (line, &[][..]),
    };
    if field == b"data" {
        push_data_line(data, value.strip_prefix(b" ").unwrap_or(value))?;
    }
    Ok(false)
}

/// Appends a data line's value and its LF, decoded as the spec says (a replacement character
/// for each invalid sequence; valid UTF-8 is copied as is), keeping the data buffer within
/// [`MAX_EVENT_BYTES`]. The limit counts decoded bytes: counting the raw value would let invalid
/// input triple the data held, since one invalid byte decodes to three.
fn push_data_line(data: &mut String, value: &[u8]) -> Result<(), SseError> {
    // Checked before each append, so the buffer never outgrows the limit; `+ 1` is the LF.
    let fits = |data: &String, more: usize| data.len() + more <= MAX_EVENT_BYTES;
    // Valid text, the usual case, is checked in one pass (`utf8_chunks` goes byte by byte:
    // 6 % of the gateway's user-space instructions per token, callgrind).
    if let Ok(valid) = std::str::from_utf8(value) {
        if !fits(data, valid.len() + 1) {
            return Err(SseError::EventTooLarge);
        }
        data.push_str(valid);
        data.push('\n');
        return Ok(());
    }
    for chunk in value.utf8_chunks() {
        let replacement = if chunk.invalid().is_empty() {
            ""
        } else {
            "\u{FFFD}"
        };
        if !fits(data, chunk.valid().len() + replacement.len() + 1) {
            return Err(SseError::EventTooLarge);
        }
        data.push_str(chunk.valid());
        data.push_str(replacement);
    }
    if !fits(data, 1) {
        return Err(SseError::EventTooLarge);
    }
    data.push('\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Result<Vec<String>, SseError> {
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        for chunk in chunks {
            decoder.push(chunk);
            while let Some(data) = decoder.next_data()? {
                events.push(data.to_owned());
            }
        }
        Ok(events)
    }

    /// Decodes `input` whole, split in two at every position, and one byte at a time.
    fn assert_every_split(input: &[u8], expected: &[&str]) {
        assert_eq!(decode(&[input]).unwrap(), expected, "whole");
        for at in 0..=input.len() {
            let (head, tail) = input.split_at(at);
            assert_eq!(decode(&[head, tail]).unwrap(), expected, "split at {at}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode(&bytes).unwrap(), expected, "byte by byte");
    }

    /// The shape of a real `gpt-4o-mini` stream with `include_usage`, as captured.
    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1732600000,",
        "\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":",
        "[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},",
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1732600000,",
        "\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":",
        "[{\"index\":0,\"delta\":{\"content\":\"Héllo 😀\"},\"logprobs\":null,\"finish_reason\":null}],",
        "\"usage\":null}\n\n",
        ": OPENROUTER PROCESSING\n\n",
        "data: {\"id\":\"chatcmpl-AbC\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,",
        "\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-AbC\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,",
        "\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn captured_openai_stream_decodes_at_every_split() {
        let events = decode(&[OPENAI_STREAM.as_bytes()]).unwrap();
        assert_eq!(events.len(), 5);
        assert!(events[1].contains("\"content\":\"Héllo 😀\""));
        assert!(events[3].starts_with("{\"id\":\"chatcmpl-AbC\",\"choices\":[],\"usage\""));
        assert_eq!(events[4], "[DONE]");
        let expected: Vec<&str> = events.iter().map(String::as_str).collect();
        assert_every_split(OPENAI_STREAM.as_bytes(), &expected);
    }

    #[test]
    fn crlf_lf_and_lone_cr_all_end_lines() {
        assert_every_split(b"data: a\r\n\r\ndata: b\r\n\r\n", &["a", "b"]);
        assert_every_split(b"data: a\r\rdata: b\n\ndata: c\r\n\n", &["a", "b", "c"]);
    }

    #[test]
    fn event_ended_by_lone_cr_at_eof_is_dispatched() {
        assert_every_split(b"data: last\r\r", &["last"]);
    }

    #[test]
    fn multi_byte_characters_survive_any_split() {
        assert_every_split(
            "data: {\"c\":\"日本語 🚀\"}\r\n\r\n".as_bytes(),
            &["{\"c\":\"日本語 🚀\"}"],
        );
    }

    #[test]
    fn one_leading_bom_is_ignored() {
        assert_every_split("\u{feff}data: a\n\n".as_bytes(), &["a"]);
        assert_every_split("\u{feff}: hi\ndata: a\n\n".as_bytes(), &["a"]);
        // Only at the very start: a second BOM makes an unknown field name.
        assert_every_split("\u{feff}\u{feff}data: a\n\ndata: b\n\n".as_bytes(), &["b"]);
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        assert_every_split(
            b": keep-alive\n\nevent: message\nid: 7\nretry: 10\nfoo: bar\ndata: x\n\n",
            &["x"],
        );
    }

    #[test]
    fn data_lines_follow_the_field_rules() {
        // Several lines join with LF; only one leading space goes; a bare `data` is empty.
        assert_every_split(b"data: a\ndata:b\ndata:  c\ndata\n\n", &["a\nb\n c\n"]);
        assert_every_split(b"data:\n\n", &[""]);
        // A blank line without data dispatches nothing.
        assert_every_split(b"\n\nid: 1\n\ndata: a\n\n", &["a"]);
    }

    #[test]
    fn unfinished_event_at_eof_is_discarded() {
        assert_eq!(decode(&[b"data: a\n\ndata: b\n"]).unwrap(), ["a"]);
    }

    #[test]
    fn large_chunk_with_many_events_decodes_in_linear_time() {
        let count = 100_000;
        let body: String = (0..count)
            .map(|i| format!("data: {{\"i\":{i}}}\r\n\r\n"))
            .collect();
        let started = std::time::Instant::now();
        let events = decode(&[body.as_bytes()]).unwrap();
        assert_eq!(events.len(), count);
        assert_eq!(events[count - 1], format!("{{\"i\":{}}}", count - 1));
        // Quadratic work on 2.4 MB would take minutes; linear takes milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn endless_line_is_rejected_with_bounded_memory() {
        let mut decoder = SseDecoder::default();
        decoder.push(b"data: ");
        let chunk = [b'x'; 4096];
        let result = loop {
            decoder.push(&chunk);
            assert!(decoder.buf.len() <= MAX_EVENT_BYTES + chunk.len() + 6);
            match decoder.next_data() {
                Ok(None) => continue,
                other => break other.map(|data| data.map(str::to_owned)),
            }
        };
        assert_eq!(result, Err(SseError::LineTooLong));
    }

    /// Found by the `sse_decoder` fuzz target: the limit counted raw bytes while the data held
    /// their decoding, three times larger for invalid UTF-8.
    #[test]
    fn event_limit_counts_decoded_bytes() {
        let mut line = b"data: ".to_vec();
        line.extend(std::iter::repeat_n(0xFF, MAX_EVENT_BYTES / 2));
        line.extend_from_slice(b"\n\n");
        assert_eq!(decode(&[&line]), Err(SseError::EventTooLarge));

        let decoded_just_under = "\u{FFFD}".repeat((MAX_EVENT_BYTES - 1) / 3);
        let mut line = b"data: ".to_vec();
        line.extend(std::iter::repeat_n(0xFF, (MAX_EVENT_BYTES - 1) / 3));
        line.extend_from_slice(b"\n\n");
        assert_eq!(decode(&[&line]), Ok(vec![decoded_just_under]));
    }

    #[test]
    fn endless_event_is_rejected() {
        let line = format!("data: {}\n", "y".repeat(1000));
        let mut decoder = SseDecoder::default();
        let result = loop {
            decoder.push(line.as_bytes());
            match decoder.next_data() {
                Ok(None) => continue,
                other => break other.map(|data| data.map(str::to_owned)),
            }
        };
        assert_eq!(result, Err(SseError::EventTooLarge));
    }
}
