//! Subscriber connections, served without hyper.
//!
//! A fresh connection whose first request is `GET /v1/generations/{id}/events` is answered here:
//! the head is parsed with `httparse`, the request goes through the same router as every other
//! (auth, limits, drain), and the response is written straight to the socket, its body
//! delimited by the connection's close. What this saves is hyper's connection state, above all
//! the 8 KiB read buffer it keeps for the whole life of a streaming response: an idle
//! subscriber costs ≈1.2 KB instead of ≈10.5 KB (`loadtest/RESULTS.md`, "Memory"). A subscriber connection
//! answers one request and then closes, which an SSE stream does anyway; every other request,
//! and a subscription on a connection that already served something, goes to hyper.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::{Duration, SystemTime},
};

use axum::{
    body::{Body, HttpBody as _},
    http::{header, Request, StatusCode, Version},
    response::IntoResponse,
    Router,
};
use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tower::ServiceExt;

use super::write_timeout::WriteTimeout;
use crate::api::error::ApiError;

/// The start of every request line this module serves.
const SUBSCRIPTION_PREFIX: &[u8] = b"GET /v1/generations/";
const SUBSCRIPTION_SUFFIX: &[u8] = b"/events";
/// How much of a new connection's first bytes is looked at to choose its server; a request
/// line whose path is longer is left to hyper.
const PEEK_BYTES: usize = 128;
/// Looks at a request line that arrived in pieces (rare: every client writes it at once), and
/// the wait between them. Then hyper takes the connection, reading as bytes come: a client
/// that trickles its request line cannot make us poll its socket.
const PEEK_ATTEMPTS: usize = 2;
const PEEK_RETRY: Duration = Duration::from_millis(5);
/// Most headers a subscription request may carry (hyper's default is 100 too).
const MAX_HEADERS: usize = 100;
/// Most bytes of ready frames gathered into one write.
const MAX_BATCH_BYTES: usize = 16 * 1024;
/// A subscriber never sends after its request; bytes past this are a misbehaving peer.
const MAX_STRAY_BYTES: usize = 4096;

/// Whether the connection's first request is a subscription. Looks at the request line
/// without consuming it, so that a connection handed to hyper loses nothing.
pub async fn first_request_is_subscription(stream: &TcpStream) -> io::Result<bool> {
    let mut line = [0; PEEK_BYTES];
    for _ in 0..PEEK_ATTEMPTS {
        let read = stream.peek(&mut line).await?;
        if read == 0 {
            return Ok(false);
        }
        match is_subscription_line(&line[..read], read == PEEK_BYTES) {
            Some(answer) => return Ok(answer),
            // `peek` would return the same bytes at once; give the rest a moment to arrive.
            None => tokio::time::sleep(PEEK_RETRY).await,
        }
    }
    Ok(false)
}

/// `Some(true)` for a subscription's request line, `Some(false)` for anything else, `None`
/// while the bytes seen so far do not tell.
pub fn is_subscription_line(start: &[u8], no_more: bool) -> Option<bool> {
    if start.len() < SUBSCRIPTION_PREFIX.len() {
        return (!SUBSCRIPTION_PREFIX.starts_with(start)).then_some(false);
    }
    let Some(path) = start.strip_prefix(SUBSCRIPTION_PREFIX) else {
        return Some(false);
    };
    match path.iter().position(|&b| b == b' ' || b == b'?') {
        Some(end) => Some(path[..end].ends_with(SUBSCRIPTION_SUFFIX)),
        None if no_more => Some(false),
        None => None,
    }
}

/// What reading and answering a subscription needs to know.
pub struct Limits {
    /// When the whole head must have arrived: the header timeout counts from the accept, as
    /// hyper's does, not from the end of the look at the request line.
    pub head_deadline: Instant,
    pub max_head_bytes: usize,
}

/// Serves one subscription request on `io`, then closes it.
pub async fn serve(mut io: WriteTimeout, router: Router, limits: Limits) -> io::Result<()> {
    // Boxed, so that what reading and routing need (the request, the router's future, the
    // response head) is freed before the stream starts, instead of sizing this task's future
    // for the whole life of the connection: ~1.2 KB per idle subscriber less (`size_of_val`
    // of the future, debug build).
    let Some(body) = Box::pin(respond(&mut io, router, limits)).await? else {
        return Ok(());
    };
    BodyWriter::new(&mut io, body).await?;
    io.shutdown().await
}

/// Reads the request, routes it and writes the response head. Returns the body left to send;
/// `None` when the client took too long to send its head (closed without a word, as hyper does).
async fn respond(
    io: &mut WriteTimeout,
    router: Router,
    limits: Limits,
) -> io::Result<Option<Body>> {
    let head = tokio::time::timeout_at(
        limits.head_deadline,
        read_request(io, limits.max_head_bytes),
    )
    .await;
    let response = match head {
        Err(_elapsed) => return Ok(None),
        Ok(Err(RequestError::Io(error))) => return Err(error),
        Ok(Err(RequestError::Api(error))) => error.into_response(),
        Ok(Ok(request)) => match router.oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        },
    };
    let (parts, body) = response.into_parts();
    let length = body_length(parts.status, &body);
    io.write_all(&encode_head(parts.status, &parts.headers, length))
        .await?;
    Ok(Some(body))
}

enum RequestError {
    Io(io::Error),
    Api(ApiError),
}

/// Reads until the head is complete. The buffer is dropped before the response streams.
async fn read_request(io: &mut WriteTimeout, max: usize) -> Result<Request<Body>, RequestError> {
    let mut head = Vec::with_capacity(PEEK_BYTES * 2);
    loop {
        if head.len() >= max {
            return Err(RequestError::Api(ApiError::HeadTooLarge(max)));
        }
        head.reserve((max - head.len()).min(head.capacity()));
        let read = io.read_buf(&mut head).await.map_err(RequestError::Io)?;
        if read == 0 {
            let closed = io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed mid-request");
            return Err(RequestError::Io(closed));
        }
        // A read may take more than `max` (the buffer grows in steps): only a head complete
        // within the first `max` bytes is one.
        let within = &head[..head.len().min(max)];
        if let Some(request) = parse_request(within, max).map_err(RequestError::Api)? {
            return Ok(request);
        }
    }
}

/// The request in `head`, `None` while incomplete.
pub fn parse_request(head: &[u8], max: usize) -> Result<Option<Request<Body>>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(ApiError::HeadTooLarge(max)),
        Err(_) => return Err(ApiError::MalformedRequest("unparsable request head")),
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut request = Request::builder()
        .method(parsed.method.unwrap_or_default())
        .uri(parsed.path.unwrap_or_default())
        .version(version);
    for field in parsed.headers.iter() {
        if announces_body(field) {
            // Nothing will read it, and a body here is how requests are smuggled.
            return Err(ApiError::MalformedRequest("a subscription has no body"));
        }
        request = request.header(field.name, field.value);
    }
    request
        .body(Body::empty())
        .map(Some)
        .map_err(|_| ApiError::MalformedRequest("invalid method, target or header"))
}

fn announces_body(field: &httparse::Header<'_>) -> bool {
    field.name.eq_ignore_ascii_case("transfer-encoding")
        || (field.name.eq_ignore_ascii_case("content-length") && field.value.trim_ascii() != b"0")
}

/// The `Content-Length` to announce: known for error answers, absent for a stream (whose end
/// is the connection's close) and for statuses that have no body.
fn body_length(status: StatusCode, body: &Body) -> Option<u64> {
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    (!bodiless).then(|| body.size_hint().exact()).flatten()
}

fn encode_head(status: StatusCode, headers: &header::HeaderMap, length: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let reason = status.canonical_reason().unwrap_or("");
    head.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", status.as_u16()).as_bytes());
    for (name, value) in headers {
        if name == header::CONNECTION || name == header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(length) = length {
        head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    let date = httpdate::fmt_http_date(SystemTime::now());
    head.extend_from_slice(format!("date: {date}\r\nconnection: close\r\n\r\n").as_bytes());
    head
}

/// Writes the body's frames as they come, and notices a peer that hangs up while there is
/// nothing to write — otherwise a silent generation would keep a departed subscriber until the
/// next keep-alive. Frames that are ready together (a lagging reader's backlog, a replay step
/// and the first live token) go out in one `send`; a reader that keeps up gets one per event,
/// without a copy.
struct BodyWriter<'a> {
    io: &'a mut WriteTimeout,
    body: Body,
    /// What is left to write of the frames taken from the body.
    pending: Bytes,
    /// The body has no more frames.
    body_done: bool,
    /// Bytes the peer sent after its request.
    stray: usize,
}

impl BodyWriter<'_> {
    fn new(io: &mut WriteTimeout, body: Body) -> BodyWriter<'_> {
        BodyWriter {
            io,
            body,
            pending: Bytes::new(),
            body_done: false,
            stray: 0,
        }
    }

    /// Ready when the peer has closed its side (or sent far more than a subscriber ever would).
    fn poll_peer_gone(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let stream = self.io.stream();
        let mut sink = [0; 64];
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_read(&mut sink) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(read) => {
                    self.stray += read;
                    if self.stray > MAX_STRAY_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }

    /// The body's next data, `None` at its end. Our bodies carry no trailers.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if self.body_done {
            return Poll::Ready(Ok(None));
        }
        let data = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            None => {
                self.body_done = true;
                None
            }
            Some(frame) => Some(
                frame
                    .map_err(io::Error::other)?
                    .into_data()
                    .unwrap_or_default(),
            ),
        };
        Poll::Ready(Ok(data))
    }

    /// Takes the frames that are ready now, up to `MAX_BATCH_BYTES`, into `pending`. `Ready`
    /// with `false` when the body has ended and nothing is left to write.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(first) = ready!(self.poll_data(cx))? else {
            return Poll::Ready(Ok(false));
        };
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.len(), BytesMut::len) < MAX_BATCH_BYTES {
            let Poll::Ready(Some(next)) = self.poll_data(cx)? else {
                break;
            };
            batch
                .get_or_insert_with(|| BytesMut::from(&first[..]))
                .extend_from_slice(&next);
        }
        self.pending = batch.map_or(first, BytesMut::freeze);
        Poll::Ready(Ok(true))
    }
}

impl Future for BodyWriter<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            if this.pending.is_empty() {
                if let Poll::Ready(gone) = this.poll_peer_gone(cx) {
                    return Poll::Ready(gone);
                }
                if !ready!(this.poll_fill(cx))? {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let written = ready!(Pin::new(&mut *this.io).poll_write(cx, &this.pending))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.pending.advance(written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_told_apart_from_their_first_bytes() {
        let cases: &[(&[u8], bool, Option<bool>)] = &[
            (
                b"GET /v1/generations/gen_1/events HTTP/1.1\r\n",
                false,
                Some(true),
            ),
            (
                b"GET /v1/generations/gen_1/events?token=x HTTP/1.1",
                false,
                Some(true),
            ),
            (
                b"GET /v1/generations/gen_1 HTTP/1.1\r\n",
                false,
                Some(false),
            ),
            (
                b"GET /v1/generations/gen_1/eventsx HTTP/1.1",
                false,
                Some(false),
            ),
            (b"POST /v1/generations HTTP/1.1\r\n", false, Some(false)),
            (b"GET /livez HTTP/1.1\r\n", false, Some(false)),
            (b"GE", false, None),
            (b"GET /v1/gen", false, None),
            (b"GET /v1/generations/gen_1/ev", false, None),
            (b"GET /v1/generations/gen_1/ev", true, Some(false)),
            (b"G\x00", false, Some(false)),
        ];
        for (start, no_more, expected) in cases {
            assert_eq!(
                is_subscription_line(start, *no_more),
                *expected,
                "{}",
                String::from_utf8_lossy(start)
            );
        }
    }

    #[test]
    fn heads_are_parsed_or_refused_with_the_right_error() {
        let max = 8192;
        let complete =
            b"GET /v1/generations/g/events?x=1 HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 4\r\n\r\n";
        let request = parse_request(complete, max).unwrap().unwrap();
        assert_eq!(request.uri(), "/v1/generations/g/events?x=1");
        assert_eq!(request.headers()["last-event-id"], "4");
        assert!(parse_request(&complete[..30], max).unwrap().is_none());

        let refused: &[(&[u8], &str)] = &[
            (
                b"GET /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                "malformed_request",
            ),
            (
                b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "malformed_request",
            ),
            (
                b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
                "malformed_request",
            ),
            (b"GET /x\x01 HTTP/1.1\r\n\r\n", "malformed_request"),
        ];
        for (head, code) in refused {
            let error = parse_request(head, max).unwrap_err();
            assert_eq!(error.code(), *code, "{}", String::from_utf8_lossy(head));
        }
        let many = format!(
            "GET /x HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        let error = parse_request(many.as_bytes(), max).unwrap_err();
        assert_eq!(error.code(), "head_too_large");
        assert!(parse_request(b"GET /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", max).is_ok());
    }

    #[test]
    fn heads_announce_a_length_only_for_bodies_of_known_size() {
        let stream = Body::from_stream(futures_util::stream::empty::<Result<Bytes, io::Error>>());
        assert_eq!(body_length(StatusCode::OK, &stream), None);
        assert_eq!(body_length(StatusCode::OK, &Body::from("abc")), Some(3));
        assert_eq!(body_length(StatusCode::NO_CONTENT, &Body::empty()), None);
        let mut headers = header::HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
        headers.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        let head = String::from_utf8(encode_head(StatusCode::OK, &headers, None)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"));
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        assert!(!head.contains("keep-alive") && !head.contains("content-length"));
    }
}
