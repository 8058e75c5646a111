//! Incremental Server-Sent Events parser (the WHATWG event-stream format), sized for tens of
//! thousands of concurrent streams: it keeps only a partial line and the current event's data,
//! both reused buffers, and knows tokenfan's event names as a small enum instead of strings.

use anyhow::Result;

use super::chunked::ChunkedDecoder;

/// The event names tokenfan sends; anything else is `Other` (and counted, not trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Message,
    Token,
    Done,
    Error,
    Reconnect,
    Other,
}

impl EventKind {
    fn parse(name: &[u8]) -> Self {
        match name {
            b"token" => Self::Token,
            b"done" => Self::Done,
            b"error" => Self::Error,
            b"reconnect" => Self::Reconnect,
            b"message" | b"" => Self::Message,
            _ => Self::Other,
        }
    }
}

/// One dispatched event; `data` borrows the parser's buffer until the callback returns.
#[derive(Debug)]
pub struct SseEvent<'a> {
    /// The `id:` field of this event, if it had one and it was a decimal number.
    pub id: Option<u64>,
    pub kind: EventKind,
    pub data: &'a [u8],
}

/// An SSE response body, chunked or not: what a gateway viewer and a direct stream both read.
#[derive(Debug)]
pub struct SseBody {
    chunked: Option<ChunkedDecoder>,
    pub parser: SseParser,
}

impl SseBody {
    pub fn new(chunked: bool) -> Self {
        Self {
            chunked: chunked.then(ChunkedDecoder::default),
            parser: SseParser::default(),
        }
    }

    /// Feeds received body bytes, calling `on_event` for every complete event; an error is bad
    /// chunked framing.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) -> Result<()> {
        let Self { chunked, parser } = self;
        match chunked {
            Some(decoder) => decoder.feed(bytes, |payload| parser.feed(payload, &mut on_event)),
            None => {
                parser.feed(bytes, on_event);
                Ok(())
            }
        }
    }

    /// Whether the body's last chunk arrived (never for a body that ends with the connection).
    pub fn ended(&self) -> bool {
        self.chunked.as_ref().is_some_and(ChunkedDecoder::is_done)
    }
}

#[derive(Debug, Default)]
pub struct SseParser {
    partial_line: Vec<u8>,
    data: Vec<u8>,
    kind: Option<EventKind>,
    id: Option<u64>,
    retry_ms: Option<u64>,
    comments: u64,
}

impl SseParser {
    /// The last `retry:` value seen: how long the server asks us to wait before reconnecting.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Comment lines seen so far (tokenfan's keep-alives).
    pub fn comments(&self) -> u64 {
        self.comments
    }

    /// Parses `input`, calling `on_event` for every complete event. Lines may end in LF or
    /// CRLF (a lone CR as line end, allowed by the spec, is not produced by hyper).
    pub fn feed(&mut self, input: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let mut rest = input;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(newline);
            if self.partial_line.is_empty() {
                self.line(line, &mut on_event);
            } else {
                let mut joined = std::mem::take(&mut self.partial_line);
                joined.extend_from_slice(line);
                self.line(&joined, &mut on_event);
                joined.clear();
                self.partial_line = joined;
            }
            rest = &after[1..];
        }
        self.partial_line.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.kind.is_none() {
                    self.kind = Some(EventKind::Message);
                }
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            }
            b"event" => self.kind = Some(EventKind::parse(value)),
            b"id" => self.id = parse_decimal(value),
            b"retry" => {
                if let Some(ms) = parse_decimal(value) {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if let Some(kind) = self.kind.take() {
            on_event(SseEvent {
                id: self.id.take(),
                kind,
                data: &self.data,
            });
        }
        self.id = None;
        self.data.clear();
    }
}

/// Parses an ASCII decimal number with nothing around it.
pub fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Owned {
        id: Option<u64>,
        kind: EventKind,
        data: String,
    }

    fn parse_in_pieces(wire: &[u8], piece: usize) -> (Vec<Owned>, SseParser) {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for part in wire.chunks(piece) {
            parser.feed(part, |ev| {
                events.push(Owned {
                    id: ev.id,
                    kind: ev.kind,
                    data: String::from_utf8(ev.data.to_vec()).unwrap(),
                })
            });
        }
        (events, parser)
    }

    const STREAM: &[u8] =
        b": keep-alive\n\nid: 0\nevent: token\ndata: {\"index\":0,\"text\":\"Hi\"}\n\n\
id: 1\r\nevent: token\r\ndata: {\"index\":1,\"text\":\" there\"}\r\n\r\n\
id: 2\nevent: done\ndata: {\"status\":\"completed\",\"token_count\":2}\n\n";

    #[test]
    fn parses_tokenfan_events_split_at_every_boundary() {
        for piece in 1..=STREAM.len() {
            let (events, parser) = parse_in_pieces(STREAM, piece);
            assert_eq!(events.len(), 3, "piece size {piece}");
            assert_eq!(
                events[0],
                Owned {
                    id: Some(0),
                    kind: EventKind::Token,
                    data: r#"{"index":0,"text":"Hi"}"#.into()
                }
            );
            assert_eq!(events[1].id, Some(1));
            assert_eq!(events[1].data, r#"{"index":1,"text":" there"}"#);
            assert_eq!(events[2].kind, EventKind::Done);
            assert_eq!(events[2].id, Some(2));
            assert_eq!(parser.comments(), 1);
        }
    }

    #[test]
    fn reconnect_event_carries_retry() {
        let (events, parser) = parse_in_pieces(
            b"retry: 1234\nevent: reconnect\ndata: {\"reason\":\"slow_consumer\"}\n\n",
            5,
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Reconnect);
        assert_eq!(events[0].id, None);
        assert_eq!(parser.retry_ms(), Some(1234));
    }

    #[test]
    fn multi_line_data_is_joined_and_unknown_fields_ignored() {
        let (events, _) = parse_in_pieces(b"foo: bar\ndata: a\ndata\ndata:b\nevent: odd\n\n", 2);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "a\n\nb");
        assert_eq!(events[0].kind, EventKind::Other);
    }

    #[test]
    fn blank_lines_without_fields_dispatch_nothing_and_ids_do_not_leak() {
        let (events, _) = parse_in_pieces(b"\n\nid: 7\n\ndata: x\n\n", 3);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, None);
        assert_eq!(events[0].kind, EventKind::Message);
    }

    #[test]
    fn parse_decimal_rejects_non_digits_and_overflow() {
        assert_eq!(
            parse_decimal(b"1764172800123456"),
            Some(1_764_172_800_123_456)
        );
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"12a"), None);
        assert_eq!(parse_decimal(b"99999999999999999999"), None);
    }
}
