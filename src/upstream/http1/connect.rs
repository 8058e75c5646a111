//! Opening a connection to the upstream: TCP (nodelay, keep-alive probes), optionally tunnelled
//! through an HTTP proxy with `CONNECT`, then rustls for `https`. What travels over the
//! connection is not its concern.

use std::{
    future::{poll_fn, Future},
    path::Path,
    sync::Arc,
    task::Poll,
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Empty;
use hyper::client::conn::http1::handshake;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_util::either::Either;

use super::{HttpError, Settings};

/// A connected stream to the upstream: plain TCP, or TLS over it.
pub(super) type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Where connections go and how they are opened, fixed for the client's life.
pub(super) struct Connector {
    host: String,
    port: u16,
    proxy: Option<Proxy>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    tcp_keepalive: Duration,
}

impl Connector {
    pub(super) fn new(settings: &Settings<'_>) -> Result<Self, String> {
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
            connect_timeout: settings.connect_timeout,
            tcp_keepalive: settings.tcp_keepalive,
        })
    }

    /// A new connection, ready for the first request, within the connect timeout.
    pub(super) async fn connect(&self) -> Result<Io, HttpError> {
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
            match &self.tls {
                None => Ok(Either::Left(tcp)),
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|error| HttpError::Connect(format!("TLS: {error}")))?;
                    Ok(Either::Right(Box::new(tls)))
                }
            }
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
    /// `host:port` of the upstream.
    authority: Uri,
    /// `Basic` credentials of the proxy URL, if it has any.
    authorization: Option<HeaderValue>,
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
        )
        .parse()
        .map_err(|error| format!("invalid upstream authority: {error}"))?;
        let authorization = if proxy.username().is_empty() {
            None
        } else {
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
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|_| "invalid proxy credentials".to_owned())?;
            value.set_sensitive(true);
            Some(value)
        };
        Ok(Self {
            host,
            port,
            authority,
            authorization,
        })
    }

    /// Asks the proxy, on `tcp`, for a tunnel to the upstream.
    async fn tunnel(&self, tcp: TcpStream) -> Result<TcpStream, HttpError> {
        let refused = |why: String| HttpError::Connect(format!("proxy: {why}"));
        let mut request = Request::new(Empty::<Bytes>::new());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = self.authority.clone();
        let host = HeaderValue::from_str(&self.authority.to_string())
            .map_err(|error| refused(error.to_string()))?;
        request.headers_mut().insert(header::HOST, host);
        if let Some(authorization) = &self.authorization {
            request
                .headers_mut()
                .insert(header::PROXY_AUTHORIZATION, authorization.clone());
        }
        let (mut sender, mut conn) = handshake(TokioIo::new(tcp))
            .await
            .map_err(|error| refused(error.to_string()))?;
        let mut answer = std::pin::pin!(sender.send_request(request));
        // The connection is driven here, beside its one answer; after a 2xx it stops and
        // hands the socket back instead of closing it.
        let mut handed_back = false;
        let response = poll_fn(|cx| {
            if !handed_back {
                if let Poll::Ready(done) = conn.poll_without_shutdown(cx) {
                    done.map_err(|error| refused(error.to_string()))?;
                    handed_back = true;
                }
            }
            match answer.as_mut().poll(cx) {
                Poll::Ready(response) => {
                    Poll::Ready(response.map_err(|error| refused(error.to_string())))
                }
                Poll::Pending if handed_back => Poll::Ready(Err(refused(
                    "it closed the connection without answering CONNECT".to_owned(),
                ))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        if !response.status().is_success() {
            return Err(refused(format!(
                "it answered {} to CONNECT",
                response.status()
            )));
        }
        if !handed_back {
            poll_fn(|cx| conn.poll_without_shutdown(cx))
                .await
                .map_err(|error| refused(error.to_string()))?;
        }
        let parts = conn.into_parts();
        // The upstream has said nothing yet, so neither may the tunnel.
        if !parts.read_buf.is_empty() {
            return Err(refused(
                "unexpected bytes after its answer to CONNECT".to_owned(),
            ));
        }
        Ok(parts.io.into_inner())
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
