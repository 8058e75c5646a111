//! The HTTP/1.1 client for the one call tokenfan makes upstream: POST a JSON body, then read
//! a long streaming response **on the caller's task**.
//!
//! Why not reqwest: its pooled client (hyper's) drives every connection in a task of its own and
//! hands the body to the caller over a channel, so each token woke two tasks and crossed seven
//! layers of body adapters before the hub saw it. Reading the socket in the generation's own task
//! cut the gateway's CPU per token in `chat-5k` from 17.1 to 13.5 µs, and its p99 latency from
//! 11.6 s to 0.3 s (`loadtest/RESULTS.md`, "The upstream read path").
//!
//! Why hyper's low-level connection (`hyper::client::conn::http1`) and not a codec of our own:
//! polled on the generation's task, beside the response it answers, it costs within 1 µs per
//! token of the hand-written codec it replaced (+10 % instructions, and ~15 KB more per open
//! connection for its buffers: "The HTTP client on hyper (A/B)"), and its HTTP/1.1 parsing
//! (heads, chunked bodies) is hyper's, not ours to maintain and fuzz.
//!
//! What it does: `http` and `https` (rustls, the public web PKI roots plus an optional CA file;
//! ALPN `http/1.1`), an optional HTTP proxy (`CONNECT` tunnels), a pool of idle keep-alive
//! connections, heads bounded at [`MAX_HEAD_BYTES`]. What it does not do, on purpose: HTTP/2, the
//! proxy environment variables, redirects, compression (the request offers none),
//! `Expect: 100-continue`.
//!
//! `connect.rs` opens connections (TCP, the proxy tunnel, TLS), `pool.rs` keeps idle ones.

mod connect;
mod own_wakes;
mod pool;

use std::{
    future::{poll_fn, Future},
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper::{
    body::{Body as _, Incoming},
    client::conn::http1::{Builder, Connection, SendRequest},
};
use hyper_util::rt::TokioIo;

use connect::{Connector, Io};
use own_wakes::OwnWakes;
use pool::Pool;

/// Most bytes of a response head: hyper's read buffer never grows past this, so a longer head
/// is refused rather than buffered.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most per-call header lines a request takes besides the fixed ones.
const MAX_EXTRA_HEADERS: usize = 8;

/// Why a request or its body failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// DNS, TCP or TLS failed: no byte of the request was sent.
    #[error("{0}")]
    Connect(String),
    #[error("connecting took longer than the connect timeout")]
    ConnectTimeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The connection ended before the first byte of a response.
    #[error("the connection closed before a response")]
    Unanswered,
    #[error("the connection closed {0}")]
    Closed(&'static str),
    #[error("invalid HTTP response: {0}")]
    Protocol(String),
}

impl HttpError {
    /// Whether the peer went away before answering: closed, reset, or a broken pipe on write.
    fn is_unanswered(&self) -> bool {
        match self {
            Self::Unanswered => true,
            Self::Io(error) => matches!(
                error.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// Everything [`Client::new`] needs.
pub struct Settings<'a> {
    /// `POST` for completions, `GET` for the model list.
    pub method: &'static str,
    pub url: &'a url::Url,
    /// Sent with every request, after `host` and before `content-length`.
    pub headers: &'a HeaderMap,
    /// An `http://` proxy that every connection is tunnelled through with `CONNECT`.
    pub proxy: Option<&'a url::Url>,
    /// PEM file of CA certificates trusted besides the public roots.
    pub ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// Idle connections older than this are closed instead of reused.
    pub pool_idle_timeout: Duration,
}

/// A response whose head has been read; the body streams from the connection.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
}

type Sender = SendRequest<Full<Bytes>>;
type Driver = Connection<TokioIo<Io>, Full<Bytes>>;

/// One connection: the handle requests are sent through, and the future that does its I/O,
/// which whoever holds the connection polls.
struct Conn {
    sender: Sender,
    driver: Driver,
    /// Set once the driver has completed: it must not be polled again.
    closed: bool,
}

impl Conn {
    /// Polls the connection's I/O; its outcome once it is over (closed, or failed), and `None`
    /// while it runs or after it ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> Option<Result<(), hyper::Error>> {
        if self.closed {
            return None;
        }
        match Pin::new(&mut self.driver).poll(cx) {
            Poll::Ready(result) => {
                self.closed = true;
                Some(result)
            }
            Poll::Pending => None,
        }
    }

    /// False if the peer closed the idle connection or sent something unasked (a TLS alert,
    /// a stray byte): either way it cannot carry a request. Polling the idle connection once
    /// reads whatever the peer did meanwhile.
    fn is_idle_and_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx);
        !self.closed && self.sender.is_ready()
    }
}

/// Where requests go: method, URL and headers, fixed for the client's life.
pub struct Client {
    connector: Connector,
    method: Method,
    /// Path and query.
    target: Uri,
    /// `host` and the configured headers.
    headers: HeaderMap,
    pool: Arc<Pool>,
}

impl Client {
    pub fn new(settings: &Settings<'_>) -> Result<Self, String> {
        let url = settings.url;
        let mut target = url.path().to_owned();
        if let Some(query) = url.query() {
            target.push('?');
            target.push_str(query);
        }
        let target = target
            .parse()
            .map_err(|error| format!("invalid URL path: {error}"))?;
        let mut host = url.host_str().unwrap_or_default().to_owned();
        if let Some(port) = url.port() {
            host.push_str(&format!(":{port}"));
        }
        let mut headers = HeaderMap::with_capacity(settings.headers.len() + 1);
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&host).map_err(|error| format!("invalid host: {error}"))?,
        );
        headers.extend(settings.headers.clone());
        Ok(Self {
            connector: Connector::new(settings)?,
            method: Method::from_bytes(settings.method.as_bytes())
                .map_err(|error| format!("invalid method: {error}"))?,
            target,
            headers,
            pool: Arc::new(Pool::new(settings.pool_idle_timeout)),
        })
    }

    /// Sends the request with `body` (empty for a `GET`) on a pooled or new connection and
    /// reads the response head. `extra_head` is header lines, each ending in CRLF.
    pub async fn send(&self, extra_head: &[u8], body: &[u8]) -> Result<Response, HttpError> {
        let body = Bytes::copy_from_slice(body);
        if let Some(conn) = self.pool.take() {
            match self
                .exchange(conn, self.request(extra_head, body.clone())?)
                .await
            {
                // The provider closed the idle connection as we reused it, so it never
                // answered: a new connection carries the request, without costing a retry.
                Err(error) if error.is_unanswered() => {}
                answered => return answered,
            }
        }
        let io = self.connector.connect().await?;
        let (sender, driver) = Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| HttpError::Connect(error.to_string()))?;
        let conn = Conn {
            sender,
            driver,
            closed: false,
        };
        self.exchange(conn, self.request(extra_head, body)?).await
    }

    /// The request: the fixed method, target and headers, the per-call `extra_head` lines (the
    /// trace context today) and `body`.
    fn request(&self, extra_head: &[u8], body: Bytes) -> Result<Request<Full<Bytes>>, HttpError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.target.clone();
        let headers = request.headers_mut();
        headers.clone_from(&self.headers);
        let mut slots = [httparse::EMPTY_HEADER; MAX_EXTRA_HEADERS];
        // The extra lines end with CRLF; the empty line makes them a complete header block.
        let block = [extra_head, b"\r\n"].concat();
        let parsed = httparse::parse_headers(&block, &mut slots)
            .map_err(|error| HttpError::Protocol(format!("extra request headers: {error}")))?;
        if let httparse::Status::Complete((_, lines)) = parsed {
            for line in lines {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(line.name.as_bytes()),
                    HeaderValue::from_bytes(line.value),
                ) {
                    headers.append(name, value);
                }
            }
        }
        Ok(request)
    }

    /// Sends `request` on `conn` and drives the connection until the response head is read.
    async fn exchange(
        &self,
        mut conn: Conn,
        request: Request<Full<Bytes>>,
    ) -> Result<Response, HttpError> {
        let mut answer = std::pin::pin!(conn.sender.send_request(request));
        let response = poll_fn(|cx| {
            let over = conn.drive(cx);
            if let Poll::Ready(response) = answer.as_mut().poll(cx) {
                return Poll::Ready(response.map_err(|error| from_hyper(error, false)));
            }
            match over {
                // The connection ended and dropped the request without a word.
                Some(Ok(())) => Poll::Ready(Err(HttpError::Unanswered)),
                Some(Err(error)) => Poll::Ready(Err(from_hyper(error, false))),
                None => Poll::Pending,
            }
        })
        .await?;
        let (parts, body) = response.into_parts();
        let (wakes, waker) = OwnWakes::new();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body: Body {
                live: Some((conn, body)),
                pool: self.pool.clone(),
                wakes,
                waker,
            },
        })
    }
}

/// The response body, read on the caller's task by polling the connection and then hyper's
/// body. Read to its end on a keep-alive connection, it returns the connection to the pool;
/// dropped before, it closes the connection.
pub struct Body {
    live: Option<(Conn, Incoming)>,
    pool: Arc<Pool>,
    /// The connection and the body are polled with `waker`, so that the wake hyper sends
    /// when a chunk is taken does not poll the whole task again (`own_wakes.rs`).
    wakes: Arc<OwnWakes>,
    waker: Waker,
}

impl Body {
    /// The next piece of the body, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, HttpError>> {
        let Some((conn, body)) = self.live.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        self.wakes.start(cx.waker());
        let own = &mut Context::from_waker(&self.waker);
        let polled = loop {
            // The connection reads the socket and hands what it decoded to the body.
            let over = conn.drive(own);
            match Pin::new(&mut *body).poll_frame(own) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => break Ok(Some(data)),
                    // Empty data and trailers carry nothing for us.
                    _ => continue,
                },
                Poll::Ready(Some(Err(error))) => break Err(error),
                Poll::Ready(None) => break Ok(None),
                Poll::Pending => {
                    if let Some(Err(error)) = over {
                        break Err(error);
                    }
                    if self.wakes.stop() {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            }
        };
        // A wake noted while ending with a chunk or the end is owed to no one: the next read
        // polls the connection and the body first.
        self.wakes.stop();
        match polled {
            Ok(Some(data)) => Poll::Ready(Ok(Some(data))),
            Ok(None) => {
                self.release();
                Poll::Ready(Ok(None))
            }
            Err(error) => {
                self.live = None;
                Poll::Ready(Err(from_hyper(error, true)))
            }
        }
    }

    /// Gives a fully read connection back to the pool if hyper will keep it alive.
    fn release(&mut self) {
        if let Some((mut conn, _)) = self.live.take() {
            if conn.is_idle_and_open() {
                self.pool.put(conn);
            }
        }
    }
}

/// hyper's error as ours: parse errors are protocol errors; a connection closed before a
/// response (`answered` false) is [`HttpError::Unanswered`].
fn from_hyper(error: hyper::Error, answered: bool) -> HttpError {
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        return HttpError::Protocol(error.to_string());
    }
    if !answered && (error.is_incomplete_message() || error.is_canceled()) {
        return HttpError::Unanswered;
    }
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::InvalidData => HttpError::Protocol(io.to_string()),
                kind => HttpError::Io(io::Error::new(kind, io.to_string())),
            };
        }
        source = cause.source();
    }
    if error.is_incomplete_message() {
        return HttpError::Closed("in the middle of the body");
    }
    HttpError::Protocol(error.to_string())
}
