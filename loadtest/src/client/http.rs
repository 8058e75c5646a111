//! The few bytes of HTTP/1.1 the load test needs: a response head parser, the subscriber's GET,
//! and a one-shot control request (`POST /v1/generations`, `GET /livez`) over `Connection: close`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::ChunkedDecoder;
use super::sse::parse_decimal;

/// Bigger heads than this are not tokenfan's and would only waste memory.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub chunked: bool,
    pub content_length: Option<u64>,
    /// Bytes of `buf` taken by the status line and headers, including the blank line.
    pub len: usize,
}

/// Parses a response head at the start of `buf`; `Ok(None)` means "read more".
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD_BYTES {
            bail!("response head longer than {MAX_HEAD_BYTES} bytes");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("malformed status line {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("unexpected protocol in status line {status_line:?}");
    }
    let status = code
        .parse()
        .with_context(|| format!("bad status code in {status_line:?}"))?;
    let mut head = ResponseHead {
        status,
        chunked: false,
        content_length: None,
        len: end + 4,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("malformed header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            head.content_length = parse_decimal(value.as_bytes());
        }
    }
    Ok(Some(head))
}

/// The subscriber's request. `last_event_id` resumes after that id, as a browser's EventSource
/// does after a reconnect.
pub fn events_request(host: SocketAddr, generation: &str, last_event_id: Option<u64>) -> Vec<u8> {
    let mut req = format!(
        "GET /v1/generations/{generation}/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
    );
    if let Some(id) = last_event_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// A request with an optional JSON body over `Connection: close`: the server ends the response
/// by closing.
pub fn one_shot_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    let mut wire = req.into_bytes();
    wire.extend_from_slice(body.unwrap_or_default());
    wire
}

/// A complete response to a control request.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request over a fresh connection and reads the whole response (control plane only:
/// creating generations, health checks; never on the per-token path).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response> {
    tokio::time::timeout(timeout, request_inner(addr, method, path, body))
        .await
        .with_context(|| format!("{method} {path}: no answer within {timeout:?}"))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let wire = one_shot_request(addr, method, path, body);
    stream.write_all(&wire).await.context("send request")?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .context("read response")?;
    let head = parse_head(&raw)?.context("connection closed before the response head")?;
    let rest = &raw[head.len..];
    let body = if head.chunked {
        let mut decoder = ChunkedDecoder::default();
        let mut body = Vec::new();
        decoder.feed(rest, |bytes| body.extend_from_slice(bytes))?;
        body
    } else {
        let len = head.content_length.map_or(rest.len(), |n| n as usize);
        rest[..len.min(rest.len())].to_vec()
    };
    Ok(Response {
        status: head.status,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_chunked_sse_head() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n";
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert!(head.chunked);
        assert_eq!(head.content_length, None);
        assert_eq!(&raw[head.len..], b"5\r\n");
    }

    #[test]
    fn partial_heads_ask_for_more_and_oversized_ones_fail() {
        assert_eq!(parse_head(b"HTTP/1.1 204 No Content\r\n").unwrap(), None);
        assert!(parse_head(&vec![b'a'; MAX_HEAD_BYTES + 1]).is_err());
        let head = parse_head(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((head.status, head.content_length), (204, Some(0)));
    }

    #[test]
    fn rejects_non_http_status_lines() {
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
    }

    #[test]
    fn resume_request_carries_last_event_id() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let req = String::from_utf8(events_request(addr, "gen_1", Some(41))).unwrap();
        assert!(req.starts_with("GET /v1/generations/gen_1/events HTTP/1.1\r\n"));
        assert!(req.contains("\r\nLast-Event-ID: 41\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
