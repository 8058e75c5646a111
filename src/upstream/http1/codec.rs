//! The HTTP/1.1 wire format of the one exchange tokenfan makes: the request head rendered once,
//! response heads parsed with `httparse` (bounded), and the body's framing (chunked,
//! `content-length`, close-delimited) decoded from a connection's read buffer. No I/O beyond
//! reading a head; connecting is `connect.rs`, keeping connections `pool.rs`.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::AsyncReadExt;

use super::{connect::Io, HttpError};

/// Most bytes of a response head (status line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most headers in a response head.
const MAX_HEADERS: usize = 64;

/// Longest chunk-size or trailer line. A size line is a few hex digits; extensions are ignored.
const MAX_LINE_BYTES: usize = 4096;

/// Free space made in the read buffer before each read.
pub(super) const READ_SIZE: usize = 8 * 1024;

/// `{method} {path} HTTP/1.1`, `host` and `headers`, each line ending in CRLF. Header values
/// were validated as [`HeaderValue`]s, so none holds a line break.
pub(super) fn request_head(method: &str, url: &url::Url, headers: &HeaderMap) -> Box<[u8]> {
    let mut target = url.path().to_owned();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut host = url.host_str().unwrap_or_default().to_owned();
    if let Some(port) = url.port() {
        host.push_str(&format!(":{port}"));
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\nhost: {host}\r\n").into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.into_boxed_slice()
}

/// One connection and the bytes read from it but not yet consumed.
pub(super) struct Conn {
    pub(super) io: Io,
    pub(super) buf: BytesMut,
}

/// What a response head says about the body that follows.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
}

impl Conn {
    pub(super) fn new(io: Io) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Reads until a final (non-1xx) response head is complete and consumes it.
    pub(super) async fn read_head(&mut self) -> Result<Head, HttpError> {
        loop {
            match parse_head(&self.buf)? {
                Some((length, head)) => {
                    self.buf.advance(length);
                    if let Some(head) = head {
                        return Ok(head);
                    }
                    continue; // An informational 1xx head: the real one follows.
                }
                None if self.buf.len() >= MAX_HEAD_BYTES => {
                    return Err(HttpError::Protocol(format!(
                        "the response head is longer than {MAX_HEAD_BYTES} bytes"
                    )));
                }
                None => {}
            }
            self.buf.reserve(READ_SIZE);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    HttpError::Unanswered
                } else {
                    HttpError::Closed("in the middle of the response head")
                });
            }
        }
    }
}

/// The length of the complete response head at the start of `buf`, if there is one: the entry
/// point for fuzzing [`parse_head`].
#[doc(hidden)]
pub fn parse_head_len(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    parse_head(buf).map(|parsed| parsed.map(|(length, _)| length))
}

/// Parses a response head at the start of `buf`: `None` while incomplete; else its length and
/// the head, or `None` for an informational (1xx) head to skip.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Option<Head>)>, HttpError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(HttpError::Protocol(error.to_string())),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| HttpError::Protocol("invalid status code".to_owned()))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(HttpError::Protocol(
                "unexpected 101 Switching Protocols".to_owned(),
            ));
        }
        return Ok(Some((length, None)));
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for header in response.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes());
        let value = HeaderValue::from_bytes(header.value);
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    let framing = framing(status, &headers)?;
    let keep_alive =
        response.version == Some(1) && !has_token(&headers, http::header::CONNECTION, "close");
    Ok(Some((
        length,
        Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }),
    )))
}

/// How the body is delimited (RFC 9112 §6.3): chunked, by length, or by the connection's end.
fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, HttpError> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return if last_token_is(headers, http::header::TRANSFER_ENCODING, "chunked") {
            Ok(Framing::Chunked(Chunked::Size))
        } else {
            Ok(Framing::Close)
        };
    }
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => Ok(Framing::Close),
        (Some(length), None) => length
            .to_str()
            .ok()
            .and_then(|length| length.trim().parse().ok())
            .map(Framing::Length)
            .ok_or_else(|| HttpError::Protocol("invalid content-length".to_owned())),
        (Some(_), Some(_)) => Err(HttpError::Protocol(
            "several content-length headers".to_owned(),
        )),
    }
}

/// Whether any comma-separated value of `name` is `token`, ignoring case.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// Whether the last comma-separated value of `name` is `token`, ignoring case.
fn last_token_is(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .next_back()
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.rsplit(',').next())
        .is_some_and(|item| item.trim().eq_ignore_ascii_case(token))
}

/// The body's framing and how far through it the reader is.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked(Chunked),
    /// Bytes left of a `content-length` body.
    Length(u64),
    /// The body ends when the connection does.
    Close,
    Done,
}

#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left of the current chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
}

/// One step of decoding the buffered body.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

impl Framing {
    /// A chunked body starts here.
    pub const CHUNKED: Self = Self::Chunked(Chunked::Size);

    /// Takes the next piece of body data, or the framing, out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, HttpError> {
        loop {
            match self {
                Self::Done | Self::Length(0) => {
                    *self = Self::Done;
                    return Ok(Decoded::End);
                }
                Self::Length(left) => return Ok(take_data(buf, left)),
                Self::Close if buf.is_empty() => return Ok(Decoded::NeedMore),
                Self::Close => return Ok(Decoded::Data(buf.split().freeze())),
                Self::Chunked(Chunked::Data(left)) => {
                    let data = take_data(buf, left);
                    if *left == 0 {
                        *self = Self::Chunked(Chunked::DataEnd);
                    }
                    return Ok(data);
                }
                Self::Chunked(state) => {
                    let state = *state;
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    *self = match state {
                        Chunked::Size => match chunk_size(&line)? {
                            0 => Self::Chunked(Chunked::Trailer),
                            size => Self::Chunked(Chunked::Data(size)),
                        },
                        Chunked::DataEnd if line.is_empty() => Self::CHUNKED,
                        Chunked::DataEnd => {
                            return Err(HttpError::Protocol(
                                "chunk data longer than its size".to_owned(),
                            ))
                        }
                        Chunked::Trailer if line.is_empty() => Self::Done,
                        // Trailer fields are not used; `Data` was handled above.
                        Chunked::Trailer | Chunked::Data(_) => *self,
                    };
                }
            }
        }
    }

    /// Whether the connection closing now ends the body rather than cutting it.
    pub(super) fn ends_at_close(&self) -> bool {
        matches!(self, Self::Close | Self::Done)
    }
}

/// Up to `left` buffered bytes as data.
fn take_data(buf: &mut BytesMut, left: &mut u64) -> Decoded {
    if buf.is_empty() {
        return Decoded::NeedMore;
    }
    let length = usize::try_from(*left).map_or(buf.len(), |left| left.min(buf.len()));
    *left -= length as u64;
    Decoded::Data(buf.split_to(length).freeze())
}

/// The next line without its LF or CRLF, or `None` until one is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, HttpError> {
    let scan = &buf[..buf.len().min(MAX_LINE_BYTES)];
    let Some(end) = scan.iter().position(|&byte| byte == b'\n') else {
        return if buf.len() >= MAX_LINE_BYTES {
            Err(HttpError::Protocol(format!(
                "a chunk line is longer than {MAX_LINE_BYTES} bytes"
            )))
        } else {
            Ok(None)
        };
    };
    let mut line = buf.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Ok(Some(line))
}

/// The hex size of a chunk-size line; extensions after `;` are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let digits = line.split(|&byte| byte == b';').next().unwrap_or_default();
    let digits = std::str::from_utf8(digits)
        .ok()
        .map(|digits| digits.trim_matches([' ', '\t']))
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_hexdigit()));
    digits
        .and_then(|digits| u64::from_str_radix(digits, 16).ok())
        .ok_or_else(|| HttpError::Protocol("invalid chunk size".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; the data, and whether the body ended.
    fn decode_in_pieces(
        mut framing: Framing,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, bool), HttpError> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match framing.decode(&mut buf)? {
                    Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                    Decoded::NeedMore => break,
                    Decoded::End => return Ok((data, true)),
                }
            }
        }
        Ok((data, false))
    }

    #[test]
    fn chunked_bodies_decode_split_anywhere() {
        let body =
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..body.len() {
            let (data, ended) = decode_in_pieces(Framing::CHUNKED, body, step).unwrap();
            assert_eq!(data, b"hello, world0123456789", "step {step}");
            assert!(ended, "step {step}");
        }
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        let (data, ended) = decode_in_pieces(Framing::CHUNKED, b"2\nhi\n0\n\n", 64).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"hi"[..], true));
    }

    #[test]
    fn broken_chunk_framing_is_an_error() {
        for body in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhello!\r\n",
            b"ffffffffffffffffff\r\n",
            &[b'1'; MAX_LINE_BYTES + 1],
        ] {
            let result = decode_in_pieces(Framing::CHUNKED, body, 64);
            assert!(
                matches!(result, Err(HttpError::Protocol(_))),
                "{body:?}: {result:?}"
            );
        }
    }

    #[test]
    fn length_and_close_framing() {
        let (data, ended) = decode_in_pieces(Framing::Length(3), b"abcdef", 2).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"abc"[..], true));
        let (data, ended) = decode_in_pieces(Framing::Close, b"abcdef", 4).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"abcdef"[..], false));
    }

    fn head(text: &str) -> Head {
        match parse_head(text.as_bytes()) {
            Ok(Some((length, Some(head)))) => {
                assert_eq!(length, text.len());
                head
            }
            _ => panic!("not a final head: {text:?}"),
        }
    }

    #[test]
    fn heads_choose_framing_and_keep_alive() {
        let chunked = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n");
        assert_eq!(
            (chunked.framing, chunked.keep_alive),
            (Framing::CHUNKED, true)
        );
        let sized =
            head("HTTP/1.1 400 Bad\r\ncontent-length: 12\r\nconnection: keep-alive, close\r\n\r\n");
        assert_eq!(
            (sized.framing, sized.keep_alive),
            (Framing::Length(12), false)
        );
        let old = head("HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!((old.framing, old.keep_alive), (Framing::Close, false));
        let empty = head("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(empty.framing, Framing::Length(0));
    }

    #[test]
    fn informational_heads_are_skipped_and_bad_heads_refused() {
        let early = "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n";
        assert!(
            matches!(parse_head(early.as_bytes()), Ok(Some((length, None))) if length == early.len())
        );
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-"),
            Ok(None)
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "SMTP ready\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad.as_bytes()), Err(HttpError::Protocol(_))),
                "{bad:?}"
            );
        }
    }
}
