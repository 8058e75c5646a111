//! Incremental decoder for HTTP/1.1 `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! hyper streams an SSE body as chunks. A full HTTP client per subscriber would cost tens of
//! kilobytes; this state machine costs 16 bytes and hands out borrowed slices of the read buffer,
//! so tens of thousands of subscribers fit in one process. Chunk extensions and trailers are
//! skipped: nothing in tokenfan's contract uses them.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` guards against an empty size line.
    Size {
        value: u64,
        digits: u8,
    },
    /// Skipping a chunk extension up to the end of the size line.
    Extension {
        value: u64,
    },
    /// Saw `\r` after the size line; expecting `\n`.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty line.
    Trailer {
        at_line_start: bool,
    },
    Done,
}

#[derive(Debug, Clone, Copy)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: State::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl ChunkedDecoder {
    /// True once the terminating zero-size chunk and its trailer were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, handing each run of payload bytes to `out` as a slice of `input`.
    pub fn feed<'a>(&mut self, input: &'a [u8], mut out: impl FnMut(&'a [u8])) -> Result<()> {
        let mut pos = 0;
        while pos < input.len() {
            if let State::Data { remaining } = self.state {
                let take = remaining.min((input.len() - pos) as u64) as usize;
                out(&input[pos..pos + take]);
                pos += take;
                let left = remaining - take as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { remaining: left }
                };
                continue;
            }
            self.state = self.step(input[pos])?;
            pos += 1;
        }
        Ok(())
    }

    fn step(&self, byte: u8) -> Result<State> {
        Ok(match self.state {
            State::Size { value, digits } => match byte {
                b'\r' if digits > 0 => State::SizeLf { value },
                b'\n' if digits > 0 => end_of_size_line(value),
                b';' | b' ' | b'\t' if digits > 0 => State::Extension { value },
                _ => {
                    let Some(digit) = (byte as char).to_digit(16) else {
                        bail!("invalid byte {byte:#04x} in chunk size");
                    };
                    let Some(value) = value.checked_mul(16).map(|v| v + u64::from(digit)) else {
                        bail!("chunk size overflows u64");
                    };
                    State::Size {
                        value,
                        digits: digits.saturating_add(1),
                    }
                }
            },
            State::Extension { value } => match byte {
                b'\r' => State::SizeLf { value },
                b'\n' => end_of_size_line(value),
                _ => State::Extension { value },
            },
            State::SizeLf { value } => match byte {
                b'\n' => end_of_size_line(value),
                _ => bail!("expected LF after chunk size"),
            },
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                _ => bail!("expected CRLF after chunk data"),
            },
            State::DataLf => match byte {
                b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                _ => bail!("expected LF after chunk data"),
            },
            State::Trailer { at_line_start } => match byte {
                b'\r' => State::Trailer { at_line_start },
                b'\n' if at_line_start => State::Done,
                b'\n' => State::Trailer {
                    at_line_start: true,
                },
                _ => State::Trailer {
                    at_line_start: false,
                },
            },
            State::Done => State::Done,
            State::Data { .. } => unreachable!("data bytes are consumed in bulk by feed"),
        })
    }
}

fn end_of_size_line(value: u64) -> State {
    if value == 0 {
        State::Trailer {
            at_line_start: true,
        }
    } else {
        State::Data { remaining: value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(wire: &[u8], piece: usize) -> (Vec<u8>, bool) {
        let mut decoder = ChunkedDecoder::default();
        let mut body = Vec::new();
        for part in wire.chunks(piece) {
            decoder
                .feed(part, |bytes| body.extend_from_slice(bytes))
                .unwrap();
        }
        (body, decoder.is_done())
    }

    #[test]
    fn decodes_chunks_split_at_every_byte_boundary() {
        let wire = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        for piece in 1..wire.len() {
            let (body, done) = decode_in_pieces(wire, piece);
            assert_eq!(
                body, b"helloabcdefghijklmnopqrstuvwxyz",
                "piece size {piece}"
            );
            assert!(done);
        }
    }

    #[test]
    fn skips_trailers_and_accepts_bare_lf() {
        let (body, done) = decode_in_pieces(b"3\nabc\n0\r\nX-Trailer: 1\r\n\r\n", 4);
        assert_eq!(body, b"abc");
        assert!(done);
    }

    #[test]
    fn an_unfinished_stream_is_not_done() {
        let (body, done) = decode_in_pieces(b"A\r\n0123456789\r\n4\r\nab", 3);
        assert_eq!(body, b"0123456789ab");
        assert!(!done);
    }

    #[test]
    fn rejects_garbage_sizes_and_missing_crlf() {
        let mut decoder = ChunkedDecoder::default();
        assert!(decoder.feed(b"zz\r\n", |_| {}).is_err());
        let mut decoder = ChunkedDecoder::default();
        assert!(decoder.feed(b"\r\n", |_| {}).is_err());
        let mut decoder = ChunkedDecoder::default();
        assert!(decoder.feed(b"2\r\nabX", |_| {}).is_err());
        let mut decoder = ChunkedDecoder::default();
        assert!(decoder.feed(b"fffffffffffffffff\r\n", |_| {}).is_err());
    }
}
