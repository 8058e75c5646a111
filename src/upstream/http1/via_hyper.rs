//! The same client on hyper's low-level HTTP/1.1 connection (`hyper::client::conn::http1`)
//! instead of the hand-written codec: connecting (TCP, proxy, TLS) and the pool are shared,
//! and hyper's connection future is polled **on the caller's task**, beside the response it
//! answers, so no task of its own is spawned per connection.

use std::{
    future::{poll_fn, Future},
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper::{
    body::{Body as _, Incoming},
    client::conn::http1::{Builder, Connection, SendRequest},
};
use hyper_util::rt::TokioIo;

use super::{
    connect::{Connector, Io},
    pool::{Pool, Reusable},
    HttpError, Response, Settings,
};

type Sender = SendRequest<Full<Bytes>>;
type Driver = Connection<TokioIo<Io>, Full<Bytes>>;

/// One connection: the handle requests are sent through, and the future that does its I/O,
/// which whoever holds the connection polls.
struct HyperConn {
    sender: Sender,
    driver: Driver,
    /// Set once the driver has completed: it must not be polled again.
    closed: bool,
}

impl HyperConn {
    /// Polls the connection's I/O; true once it is over (closed, or failed).
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
}

impl Reusable for HyperConn {
    /// Polling the idle connection once reads whatever the peer did meanwhile: a close or a
    /// stray byte ends it.
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
    pool: Arc<Pool<HyperConn>>,
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
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| HttpError::Connect(error.to_string()))?;
        let conn = HyperConn {
            sender,
            driver,
            closed: false,
        };
        self.exchange(conn, self.request(extra_head, body)?).await
    }

    fn request(&self, extra_head: &[u8], body: Bytes) -> Result<Request<Full<Bytes>>, HttpError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.target.clone();
        let headers = request.headers_mut();
        headers.clone_from(&self.headers);
        let mut slots = [httparse::EMPTY_HEADER; 4];
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
        mut conn: HyperConn,
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
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body: Body {
                live: Some((conn, body)),
                pool: self.pool.clone(),
            },
        })
    }
}

/// The response body, read on the caller's task by polling the connection and then hyper's
/// body. Read to its end on a keep-alive connection, it returns the connection to the pool;
/// dropped before, it closes the connection.
pub struct Body {
    live: Option<(HyperConn, Incoming)>,
    pool: Arc<Pool<HyperConn>>,
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
        loop {
            // The connection reads the socket and hands what it decoded to the body.
            let over = conn.drive(cx);
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Poll::Ready(Ok(Some(data))),
                    // Empty data and trailers carry nothing for us.
                    _ => continue,
                },
                Poll::Ready(Some(Err(error))) => {
                    self.live = None;
                    return Poll::Ready(Err(from_hyper(error, true)));
                }
                Poll::Ready(None) => {
                    self.release();
                    return Poll::Ready(Ok(None));
                }
                Poll::Pending => {
                    if let Some(Err(error)) = over {
                        self.live = None;
                        return Poll::Ready(Err(from_hyper(error, true)));
                    }
                    return Poll::Pending;
                }
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
