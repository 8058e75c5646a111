//! A small HTTP/1.1 client for the one call tokenfan makes upstream: POST a JSON body, then read
//! a long streaming response **on the caller's task**.
//!
//! Why not reqwest: its pooled client (hyper's) drives every connection in a task of its own and
//! hands the body to the caller over a channel, so each token woke two tasks and crossed seven
//! layers of body adapters before the hub saw it. Reading the socket in the generation's own task
//! cut the gateway's CPU per token in `chat-5k` from 17.1 to 13.5 µs, and its p99 latency from
//! 11.6 s to 0.3 s (`loadtest/RESULTS.md`, "The upstream read path").
//!
//! What it does: `http` and `https` (rustls, the public web PKI roots plus an optional CA file;
//! ALPN `http/1.1`), an optional HTTP proxy (`CONNECT` tunnels), a pool of idle keep-alive
//! connections, `chunked`, `content-length` and close-delimited bodies, bounded heads and chunk
//! lines. What it does not do, on purpose: HTTP/2, the proxy environment variables, redirects,
//! compression (the request offers none), `Expect: 100-continue`.
//!
//! `connect.rs` opens connections (TCP, the proxy tunnel, TLS), `codec.rs` is the wire format
//! (request head, response heads, body framing), `pool.rs` keeps idle connections.

mod codec;
mod connect;
mod pool;
#[cfg(feature = "hyper-client")]
mod via_hyper;

use std::{io, path::Path, time::Duration};

use http::{HeaderMap, StatusCode};

#[doc(hidden)]
pub use codec::{parse_head_len, Chunked, Decoded, Framing};
#[cfg(not(feature = "hyper-client"))]
pub use own::{Body, Client};
#[cfg(feature = "hyper-client")]
pub use via_hyper::{Body, Client};

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

/// The hand-written client, for the A/B against [`via_hyper`].
#[cfg(not(feature = "hyper-client"))]
mod own {
    use std::sync::Arc;

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{
        codec::{request_head, Conn, READ_SIZE},
        connect::Connector,
        pool::Pool,
        Decoded, Framing, HttpError, Response, Settings,
    };

    /// Where requests go: scheme, host, port and path, fixed for the client's life.
    pub struct Client {
        connector: Connector,
        /// Request line and headers up to, not including, `content-length`; rendered once.
        head: Box<[u8]>,
        pool: Arc<Pool<Conn>>,
    }

    impl Client {
        pub fn new(settings: &Settings<'_>) -> Result<Self, String> {
            Ok(Self {
                connector: Connector::new(settings)?,
                head: request_head(settings.method, settings.url, settings.headers),
                pool: Arc::new(Pool::new(settings.pool_idle_timeout)),
            })
        }

        /// Sends the request with `body` (empty for a `GET`) on a pooled or new connection and
        /// reads the response head.
        pub async fn send(&self, extra_head: &[u8], body: &[u8]) -> Result<Response, HttpError> {
            let mut request =
                Vec::with_capacity(self.head.len() + extra_head.len() + 32 + body.len());
            request.extend_from_slice(&self.head);
            request.extend_from_slice(extra_head);
            request.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            request.extend_from_slice(body);
            if let Some(conn) = self.pool.take() {
                match self.exchange(conn, &request).await {
                    // The provider closed the idle connection as we reused it, so it never read
                    // the request: a new connection carries it, without costing a retry (hyper's
                    // pool does the same).
                    Err(error) if error.is_unanswered() => {}
                    answered => return answered,
                }
            }
            let conn = Conn::new(self.connector.connect().await?);
            self.exchange(conn, &request).await
        }

        /// Sends `request` on `conn` and reads the response head.
        async fn exchange(&self, mut conn: Conn, request: &[u8]) -> Result<Response, HttpError> {
            conn.io.write_all(request).await?;
            conn.io.flush().await?;
            let head = conn.read_head().await?;
            Ok(Response {
                status: head.status,
                headers: head.headers,
                body: Body {
                    conn: Some(conn),
                    framing: head.framing,
                    keep_alive: head.keep_alive,
                    pool: self.pool.clone(),
                },
            })
        }
    }

    /// The response body, read on the caller's task. Read to its end on a keep-alive connection,
    /// it returns the connection to the pool; dropped before, it closes the connection.
    pub struct Body {
        conn: Option<Conn>,
        framing: Framing,
        keep_alive: bool,
        pool: Arc<Pool<Conn>>,
    }

    impl Body {
        /// The next piece of the body, `None` at its end.
        pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(None);
            };
            loop {
                match self.framing.decode(&mut conn.buf)? {
                    Decoded::Data(data) => return Ok(Some(data)),
                    Decoded::End => {
                        self.release();
                        return Ok(None);
                    }
                    Decoded::NeedMore => {}
                }
                conn.buf.reserve(READ_SIZE);
                if conn.io.read_buf(&mut conn.buf).await? == 0 {
                    if self.framing.ends_at_close() {
                        self.conn = None;
                        return Ok(None);
                    }
                    return Err(HttpError::Closed("in the middle of the body"));
                }
            }
        }

        /// Gives a fully read keep-alive connection back to the pool.
        fn release(&mut self) {
            if let Some(conn) = self.conn.take() {
                if self.keep_alive && conn.buf.is_empty() {
                    self.pool.put(conn);
                }
            }
        }
    }
}
