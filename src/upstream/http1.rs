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

use std::{
    collections::VecDeque,
    io,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_util::either::Either;

/// Most bytes of a response head (status line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most headers in a response head.
const MAX_HEADERS: usize = 64;

/// Longest chunk-size or trailer line. A size line is a few hex digits; extensions are ignored.
const MAX_LINE_BYTES: usize = 4096;

/// Free space made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;

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

/// Where requests go: scheme, host, port and path, fixed for the client's life.
pub struct Client {
    host: String,
    port: u16,
    proxy: Option<Proxy>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Request line and headers up to, not including, `content-length`; rendered once.
    head: Box<[u8]>,
    connect_timeout: Duration,
    tcp_keepalive: Duration,
    pool: Arc<Pool>,
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

impl Client {
    pub fn new(settings: &Settings<'_>) -> Result<Self, String> {
        let url = settings.url;
        let (host, port) = host_and_port(url)?;
        let proxy = settings
            .proxy
            .map(|proxy| Proxy::new(proxy, url))
            .transpose()?;
        let tls = match url.scheme() {
            "http" => None,
            "https" => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|error| format!("invalid TLS server name: {error}"))?;
                Some((tls_connector(settings.ca_file)?, name))
            }
            other => return Err(format!("unsupported scheme {other:?}")),
        };
        Ok(Self {
            host,
            port,
            proxy,
            tls,
            head: request_head(settings.method, url, settings.headers),
            connect_timeout: settings.connect_timeout,
            tcp_keepalive: settings.tcp_keepalive,
            pool: Arc::new(Pool {
                idle: Mutex::new(VecDeque::new()),
                idle_timeout: settings.pool_idle_timeout,
            }),
        })
    }

    /// Sends the request with `body` (empty for a `GET`) on a pooled or new connection and
    /// reads the response head.
    pub async fn send(&self, extra_head: &[u8], body: &[u8]) -> Result<Response, HttpError> {
        let mut request = Vec::with_capacity(self.head.len() + extra_head.len() + 32 + body.len());
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
        let conn = self.connect().await?;
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

    async fn connect(&self) -> Result<Conn, HttpError> {
        let connect = async {
            let (host, port) = match &self.proxy {
                Some(proxy) => (proxy.host.as_str(), proxy.port),
                None => (self.host.as_str(), self.port),
            };
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|error| HttpError::Connect(error.to_string()))?;
            // The request goes out in one write; nodelay keeps a small one from waiting.
            tcp.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(self.tcp_keepalive);
            socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
            let tcp = match &self.proxy {
                Some(proxy) => proxy.tunnel(tcp).await?,
                None => tcp,
            };
            let io = match &self.tls {
                None => Either::Left(tcp),
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|error| HttpError::Connect(format!("TLS: {error}")))?;
                    Either::Right(Box::new(tls))
                }
            };
            Ok(Conn {
                io,
                buf: BytesMut::new(),
            })
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| HttpError::ConnectTimeout)?
    }
}

/// The host (without IPv6 brackets) and port of `url`.
fn host_and_port(url: &url::Url) -> Result<(String, u16), String> {
    let host = match url.host() {
        Some(url::Host::Domain(name)) => name.to_owned(),
        Some(url::Host::Ipv4(address)) => address.to_string(),
        Some(url::Host::Ipv6(address)) => address.to_string(),
        None => return Err("the URL has no host".to_owned()),
    };
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    Ok((host, port))
}

/// An HTTP proxy that tunnels each connection to the upstream with `CONNECT`.
struct Proxy {
    host: String,
    port: u16,
    /// `CONNECT host:port HTTP/1.1` with `host` and `proxy-authorization`, rendered once.
    request: Box<[u8]>,
}

impl Proxy {
    /// Errors never quote the proxy URL: it may hold a password.
    fn new(proxy: &url::Url, upstream: &url::Url) -> Result<Self, String> {
        if proxy.scheme() != "http" {
            return Err("the proxy URL must start with http://".to_owned());
        }
        let (host, port) = host_and_port(proxy)?;
        let (_, upstream_port) = host_and_port(upstream)?;
        let authority = format!(
            "{}:{upstream_port}",
            upstream.host_str().unwrap_or_default()
        );
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n");
        if !proxy.username().is_empty() {
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let credentials = format!(
                "{}:{}",
                decode(proxy.username()),
                decode(proxy.password().unwrap_or_default())
            );
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("proxy-authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        Ok(Self {
            host,
            port,
            request: request.into_bytes().into_boxed_slice(),
        })
    }

    /// Asks the proxy, on `tcp`, for a tunnel to the upstream.
    async fn tunnel(&self, tcp: TcpStream) -> Result<TcpStream, HttpError> {
        let refused = |why: String| HttpError::Connect(format!("proxy: {why}"));
        let mut conn = Conn {
            io: Either::Left(tcp),
            buf: BytesMut::new(),
        };
        conn.io
            .write_all(&self.request)
            .await
            .map_err(|error| refused(error.to_string()))?;
        let head = conn
            .read_head()
            .await
            .map_err(|error| refused(error.to_string()))?;
        if !head.status.is_success() {
            return Err(refused(format!("it answered {} to CONNECT", head.status)));
        }
        match conn {
            // The upstream has said nothing yet, so neither may the tunnel.
            Conn {
                io: Either::Left(tcp),
                buf,
            } if buf.is_empty() => Ok(tcp),
            _ => Err(refused(
                "unexpected bytes after its answer to CONNECT".to_owned(),
            )),
        }
    }
}

/// rustls with the public web PKI roots, plus the certificates of `ca_file`.
fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|error| format!("cannot read the CA file {}: {error}", path.display()))?;
        for certificate in certificates {
            let certificate = certificate
                .map_err(|error| format!("invalid CA file {}: {error}", path.display()))?;
            roots
                .add(certificate)
                .map_err(|error| format!("invalid CA certificate: {error}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS setup: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `{method} {path} HTTP/1.1`, `host` and `headers`, each line ending in CRLF. Header values
/// were validated as [`HeaderValue`]s, so none holds a line break.
fn request_head(method: &str, url: &url::Url, headers: &HeaderMap) -> Box<[u8]> {
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

/// A response whose head has been read; the body streams from the connection.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
}

/// The response body, read on the caller's task. Read to its end on a keep-alive connection,
/// it returns the connection to the pool; dropped before, it closes the connection.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
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

type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// One connection and the bytes read from it but not yet consumed.
struct Conn {
    io: Io,
    buf: BytesMut,
}

/// What a response head says about the body that follows.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

impl Conn {
    /// Reads until a final (non-1xx) response head is complete and consumes it.
    async fn read_head(&mut self) -> Result<Head, HttpError> {
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

    /// The TCP socket under TLS, if any.
    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Either::Left(tcp) => tcp,
            Either::Right(tls) => tls.get_ref().0,
        }
    }

    /// False if the peer closed the idle connection or sent something unasked (a TLS alert,
    /// a stray byte): either way it cannot carry a request.
    fn is_idle_and_open(&self) -> bool {
        let mut probe = [0; 1];
        matches!(self.tcp().try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
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
    fn ends_at_close(&self) -> bool {
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

/// Idle keep-alive connections, newest at the back.
struct Pool {
    idle: Mutex<VecDeque<(Instant, Conn)>>,
    idle_timeout: Duration,
}

impl Pool {
    /// The newest idle connection that is still open.
    fn take(&self) -> Option<Conn> {
        let mut idle = self.lock();
        self.expire(&mut idle);
        while let Some((_, conn)) = idle.pop_back() {
            if conn.is_idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let mut idle = self.lock();
        self.expire(&mut idle);
        idle.push_back((Instant::now(), conn));
    }

    /// Closes connections idle for longer than the timeout (the oldest are at the front).
    fn expire(&self, idle: &mut VecDeque<(Instant, Conn)>) {
        while idle
            .front()
            .is_some_and(|(since, _)| since.elapsed() >= self.idle_timeout)
        {
            idle.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Conn)>> {
        // A panic while holding the lock leaves a valid queue behind.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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

    fn pool(idle_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
        }
    }

    /// A connected loopback pair: the client end as an idle connection, and the server end.
    async fn idle_connection() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let conn = Conn {
            io: Either::Left(client),
            buf: BytesMut::new(),
        };
        (conn, server)
    }

    #[tokio::test]
    async fn the_pool_gives_out_open_connections_only() {
        let pool = pool(Duration::from_secs(60));
        let (conn, server) = idle_connection().await;
        pool.put(conn);
        let open = pool.take().expect("an open idle connection is reused");
        pool.put(open);

        drop(server);

        // The peer's FIN reaches the socket's readiness within moments on loopback.
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(conn) = pool.take() {
            assert!(
                Instant::now() < deadline,
                "a closed connection stayed reusable"
            );
            pool.put(conn);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_pool_closes_connections_idle_past_the_timeout() {
        let pool = pool(Duration::ZERO);
        let (conn, _server) = idle_connection().await;
        pool.put(conn);
        assert!(pool.take().is_none());
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
