//! The upstream client against scripted providers on real sockets (plain, TLS, behind a
//! proxy): sending and retries, reading and deadlines, for both dialects.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::config::{Secret, UpstreamConfig, UpstreamKind};

/// What the scripted provider does on one connection after reading the request. The
/// connection closes after the last step.
enum Step {
    Write(String),
    /// Reads the next request on the same (kept-alive) connection.
    Request,
    /// Writes this every interval until the client goes away.
    Repeat(String, Duration),
    /// Keeps the connection open until the client closes it, then reports a hang-up.
    Hang,
}

struct Provider {
    base_url: String,
    /// Each request as received, head and body.
    requests: mpsc::UnboundedReceiver<String>,
    hangups: mpsc::UnboundedReceiver<()>,
}

/// A provider on 127.0.0.1:0 that plays the n-th script to the n-th connection, then stops
/// listening (so an unexpected retry fails to connect).
async fn provider(scripts: Vec<Vec<Step>>) -> Provider {
    serve(scripts, None).await
}

/// The same over TLS, with a certificate for 127.0.0.1 signed by `testdata/ca.pem`.
async fn tls_provider(scripts: Vec<Vec<Step>>) -> Provider {
    let dir = std::path::Path::new(TESTDATA);
    let certificates = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .unwrap();
    serve(scripts, Some(TlsAcceptor::from(Arc::new(config)))).await
}

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/upstream/testdata");

async fn serve(scripts: Vec<Vec<Step>>, tls: Option<TlsAcceptor>) -> Provider {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // A trailing slash, as users write it.
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = format!("{scheme}://{}/v1/", listener.local_addr().unwrap());
    let (request_tx, requests) = mpsc::unbounded_channel();
    let (hangup_tx, hangups) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for script in scripts {
            let (socket, _) = listener.accept().await.unwrap();
            let (requests, hangups) = (request_tx.clone(), hangup_tx.clone());
            match tls.clone() {
                None => tokio::spawn(play(socket, script, requests, hangups)),
                Some(acceptor) => tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake.
                    if let Ok(socket) = acceptor.accept(socket).await {
                        play(socket, script, requests, hangups).await;
                    }
                }),
            };
        }
    });
    Provider {
        base_url,
        requests,
        hangups,
    }
}

async fn play(
    mut socket: impl AsyncRead + AsyncWrite + Unpin,
    script: Vec<Step>,
    requests: mpsc::UnboundedSender<String>,
    hangups: mpsc::UnboundedSender<()>,
) {
    let _ = requests.send(read_request(&mut socket).await);
    for step in script {
        match step {
            Step::Write(bytes) => {
                if write(&mut socket, &bytes).await.is_err() {
                    return;
                }
            }
            Step::Request => {
                let _ = requests.send(read_request(&mut socket).await);
            }
            Step::Repeat(bytes, interval) => {
                while write(&mut socket, &bytes).await.is_ok() {
                    tokio::time::sleep(interval).await;
                }
                return;
            }
            Step::Hang => {
                let mut buf = [0; 1024];
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                let _ = hangups.send(());
                return;
            }
        }
    }
}

async fn write(socket: &mut (impl AsyncWrite + Unpin), text: &str) -> std::io::Result<()> {
    socket.write_all(text.as_bytes()).await?;
    socket.flush().await
}

async fn read_request(socket: &mut (impl AsyncRead + Unpin)) -> String {
    let mut request = Vec::new();
    let mut buf = [0; 4096];
    loop {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "client closed before sending its request");
        request.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&request).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if body.len() >= length {
                return text;
            }
        }
    }
}

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                        transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
/// The head of a response after which the connection may carry another request.
const SSE_HEAD_KEEP_ALIVE: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                   transfer-encoding: chunked\r\n\r\n";
const LAST_CHUNK: &str = "0\r\n\r\n";

/// One HTTP chunk holding these SSE bytes.
fn chunk(sse: &str) -> String {
    format!("{:x}\r\n{sse}\r\n", sse.len())
}

fn event(data: &str) -> String {
    chunk(&format!("data: {data}\n\n"))
}

fn token(text: &str) -> String {
    event(&completion_chunk(json!({"content": text}), Value::Null))
}

fn finish(reason: &str) -> String {
    event(&completion_chunk(json!({}), json!(reason)))
}

fn completion_chunk(delta: Value, finish_reason: Value) -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        "usage": null,
    })
    .to_string()
}

fn usage_event() -> String {
    event(
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#,
    )
}

fn http_error(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

fn ok_stream() -> Vec<Step> {
    let body = [
        SSE_HEAD,
        &token("Hi"),
        &finish("stop"),
        &event("[DONE]"),
        LAST_CHUNK,
    ];
    vec![Step::Write(body.concat())]
}

fn config() -> UpstreamConfig {
    UpstreamConfig {
        url: None,
        kind: UpstreamKind::Openai,
        api_key: Some(Secret::new("sk-test-key")),
        headers: vec!["X-Org: acme".to_owned(), String::new()],
        proxy: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(1),
        first_token_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(5),
        max_retries: 2,
        retry_backoff: Duration::from_millis(10),
    }
}

fn request() -> Map<String, Value> {
    let request = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": false,
        "stream_options": {"continuous_usage_stats": false},
    });
    request.as_object().unwrap().clone()
}

/// The events of a stream, and the error that ended it, if any.
async fn run(
    config: UpstreamConfig,
    base_url: &str,
) -> (Vec<UpstreamEvent>, Option<UpstreamError>) {
    let upstream = Upstream::new(&config, base_url).unwrap();
    let mut stream = std::pin::pin!(upstream.stream(request(), "m".into()));
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(error) => {
                assert!(
                    stream.next().await.is_none(),
                    "the stream ends after an error"
                );
                return (events, Some(error));
            }
        }
    }
    (events, None)
}

/// Plays one response to the first connection (a retry fails to connect) and runs a
/// stream against it.
async fn run_response(response: &[&str]) -> (Vec<UpstreamEvent>, Option<UpstreamError>) {
    let provider = provider(vec![vec![Step::Write(response.concat())]]).await;
    run(config(), &provider.base_url).await
}

/// Checks that a call whose first connection gets `first` is retried, once, and streams
/// the second connection's answer.
async fn retried_then_streams(first: Vec<Step>) {
    let mut provider = provider(vec![first, ok_stream()]).await;

    let (events, error) = run(config(), &provider.base_url).await;

    assert!(error.is_none(), "{error:?}");
    assert_eq!(events, hi_stop());
    provider.requests.recv().await.unwrap();
    provider.requests.recv().await.unwrap();
}

fn text(text: &str) -> UpstreamEvent {
    UpstreamEvent::Delta(crate::hub::Delta::Text(text.to_owned()))
}

fn hi() -> UpstreamEvent {
    text("Hi")
}

fn hi_stop() -> Vec<UpstreamEvent> {
    vec![hi(), UpstreamEvent::Finish("stop".to_owned())]
}

#[tokio::test]
async fn streams_tokens_finish_and_usage_until_done() {
    let body = [
        SSE_HEAD,
        &event(&completion_chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )),
        &chunk(": OPENROUTER PROCESSING\n\n"),
        &token("Hel"),
        &token("lo"),
        &finish("stop"),
        &usage_event(),
        &event("[DONE]"),
        &token("never read"),
        LAST_CHUNK,
    ];
    let mut provider = provider(vec![vec![Step::Write(body.concat())]]).await;

    let (events, error) = run(config(), &provider.base_url).await;

    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        events,
        [
            text("Hel"),
            text("lo"),
            UpstreamEvent::Finish("stop".to_owned()),
            UpstreamEvent::Usage {
                usage: json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
                bytes: 59,
            },
        ]
    );
    let received = provider.requests.recv().await.unwrap();
    let (head, body) = received.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(
        head.starts_with("post /v1/chat/completions http/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nauthorization: bearer sk-test-key\r\n"));
    assert!(head.contains("\r\nx-org: acme\r\n"));
    assert!(head.contains("\r\naccept: text/event-stream\r\n"));
    assert!(head.contains("\r\ncontent-type: application/json\r\n"));
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["stream"], json!(true));
    assert_eq!(
        body["stream_options"],
        json!({"continuous_usage_stats": false, "include_usage": true})
    );
    assert_eq!(body["messages"], request()["messages"]);
}

/// A provider that sends megabytes at once: the reader goes through many socket reads and
/// chunks per poll of its task, with hyper's wakes kept from the task (`http1/own_wakes.rs`),
/// and still gets every token.
#[tokio::test]
async fn a_burst_of_megabytes_is_read_whole_across_the_runtimes_budget() {
    const TOKENS: usize = 20_000;
    let tokens: String = (0..TOKENS).map(|i| token(&format!("t{i} "))).collect();
    let body = [
        SSE_HEAD,
        &tokens,
        &finish("stop"),
        &event("[DONE]"),
        LAST_CHUNK,
    ];
    let provider = provider(vec![vec![Step::Write(body.concat())]]).await;

    let read = run(config(), &provider.base_url);
    let (events, error) = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the reader stopped making progress");

    assert!(error.is_none(), "{error:?}");
    assert_eq!(events.len(), TOKENS + 1);
    assert_eq!(events[TOKENS - 1], text(&format!("t{} ", TOKENS - 1)));
}

fn keep_alive_stream() -> String {
    [
        SSE_HEAD_KEEP_ALIVE,
        &token("Hi"),
        &finish("stop"),
        &event("[DONE]"),
        LAST_CHUNK,
    ]
    .concat()
}

/// Streams one call on `upstream` to its end.
async fn call(upstream: &Upstream) -> Vec<UpstreamEvent> {
    let stream = upstream.stream(request(), "m".into());
    stream.map(Result::unwrap).collect().await
}

#[tokio::test]
async fn a_finished_stream_leaves_its_connection_for_the_next_call() {
    // One connection only: a second connection would be refused.
    let script = vec![
        Step::Write(keep_alive_stream()),
        Step::Request,
        Step::Write(keep_alive_stream()),
    ];
    let mut provider = provider(vec![script]).await;
    let upstream = Upstream::new(&config(), &provider.base_url).unwrap();

    assert_eq!(call(&upstream).await, hi_stop());
    assert_eq!(call(&upstream).await, hi_stop());

    provider.requests.recv().await.unwrap();
    let second = provider.requests.recv().await.unwrap();
    assert!(
        second.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{second}"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_provider_closed_does_not_fail_the_next_call() {
    // The provider closes the first connection after its response.
    let mut provider = provider(vec![vec![Step::Write(keep_alive_stream())], ok_stream()]).await;
    let no_retries = UpstreamConfig {
        max_retries: 0,
        ..config()
    };
    let upstream = Upstream::new(&no_retries, &provider.base_url).unwrap();
    assert_eq!(call(&upstream).await, hi_stop());
    provider.requests.recv().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // The FIN arrives.

    assert_eq!(call(&upstream).await, hi_stop());
    provider.requests.recv().await.unwrap();
}

#[tokio::test]
async fn a_pooled_connection_closed_as_it_is_reused_costs_no_retry() {
    // The provider reads the second request on the kept-alive connection, then closes it
    // without answering, as one does when its idle timeout races our request.
    let first = vec![Step::Write(keep_alive_stream()), Step::Request];
    let mut provider = provider(vec![first, ok_stream()]).await;
    let no_retries = UpstreamConfig {
        max_retries: 0,
        ..config()
    };
    let upstream = Upstream::new(&no_retries, &provider.base_url).unwrap();
    assert_eq!(call(&upstream).await, hi_stop());

    assert_eq!(call(&upstream).await, hi_stop());

    for _ in 0..3 {
        provider.requests.recv().await.unwrap();
    }
}

/// A `CONNECT` proxy on 127.0.0.1:0 that tunnels each connection where it is asked to and
/// reports each `CONNECT` head it got.
async fn connect_proxy() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (heads_tx, heads) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let heads = heads_tx.clone();
            tokio::spawn(async move {
                let head = read_request(&mut client).await;
                let target = head.split(' ').nth(1).unwrap().to_owned();
                let _ = heads.send(head);
                let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                write(&mut client, "HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (address, heads)
}

#[tokio::test]
async fn streams_through_an_http_proxy_over_plain_http_and_tls() {
    for tls in [false, true] {
        let provider = if tls {
            tls_provider(vec![ok_stream()]).await
        } else {
            provider(vec![ok_stream()]).await
        };
        let (proxy, mut heads) = connect_proxy().await;
        let config = UpstreamConfig {
            proxy: Some(Secret::new(format!("http://user:p%40ss@{proxy}"))),
            ca_file: Some(format!("{TESTDATA}/ca.pem").into()),
            ..config()
        };

        let (events, error) = run(config, &provider.base_url).await;

        assert!(error.is_none(), "tls {tls}: {error:?}");
        assert_eq!(events, hi_stop());
        let head = heads.recv().await.unwrap();
        let authority = provider.base_url.split('/').nth(2).unwrap();
        assert!(
            head.starts_with(&format!("CONNECT {authority} HTTP/1.1\r\n")),
            "{head}"
        );
        // base64("user:p@ss"): the password is percent-decoded first.
        assert!(
            head.contains("\r\nproxy-authorization: Basic dXNlcjpwQHNz\r\n"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn a_proxy_refusing_the_tunnel_is_a_connect_error_that_hides_its_credentials() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        read_request(&mut client).await;
        let refusal = "HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n";
        write(&mut client, refusal).await.unwrap();
    });
    let config = UpstreamConfig {
        proxy: Some(Secret::new(format!("http://user:sk-secret@{proxy}"))),
        max_retries: 0,
        ..config()
    };

    let (_, error) = run(config, "http://127.0.0.1:1/v1").await;

    let Some(UpstreamError::Connect(message)) = error else {
        panic!("not a connect error: {error:?}");
    };
    assert!(message.contains("407"), "{message}");
    assert!(!message.contains("sk-secret"), "{message}");
}

#[tokio::test]
async fn streams_over_tls_from_a_provider_behind_a_private_ca() {
    let provider = tls_provider(vec![ok_stream()]).await;
    let config = UpstreamConfig {
        ca_file: Some(format!("{TESTDATA}/ca.pem").into()),
        ..config()
    };

    let (events, error) = run(config, &provider.base_url).await;

    assert!(error.is_none(), "{error:?}");
    assert_eq!(events, hi_stop());
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_connect_error() {
    let provider = tls_provider(vec![ok_stream()]).await;
    let config = UpstreamConfig {
        max_retries: 0,
        ..config()
    };

    let (events, error) = run(config, &provider.base_url).await;

    assert!(events.is_empty());
    assert!(
        matches!(&error, Some(UpstreamError::Connect(message)) if message.contains("TLS")),
        "{error:?}"
    );
}

/// The message of the error `Upstream::new` refuses `config` with.
fn config_error(config: UpstreamConfig, base_url: &str) -> String {
    Upstream::new(&config, base_url).err().unwrap().to_string()
}

#[test]
fn a_proxy_that_is_not_an_http_url_is_a_configuration_error_without_its_value() {
    for proxy in ["socks5://user:sk-secret@127.0.0.1:1080", "sk-secret"] {
        let config = UpstreamConfig {
            proxy: Some(Secret::new(proxy)),
            ..config()
        };
        let message = config_error(config, "http://127.0.0.1:1/v1");
        assert!(message.contains("proxy"), "{message}");
        assert!(!message.contains("sk-secret"), "{message}");
    }
}

#[test]
fn an_unreadable_ca_file_is_a_configuration_error() {
    let config = UpstreamConfig {
        ca_file: Some(format!("{TESTDATA}/missing.pem").into()),
        ..config()
    };
    let message = config_error(config, "https://127.0.0.1:1/v1");
    assert!(message.contains("missing.pem"), "{message}");
}

#[tokio::test]
async fn server_error_is_retried_then_streams() {
    let overloaded = http_error(
        "500 Internal Server Error",
        "",
        r#"{"error":{"message":"overloaded"}}"#,
    );

    retried_then_streams(vec![Step::Write(overloaded)]).await;
}

#[tokio::test]
async fn anthropic_is_called_at_messages_with_its_headers_and_529_is_retried() {
    let overloaded = http_error(
        "529 Overloaded",
        "",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    let stream = [
        SSE_HEAD,
        &chunk(concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1}}}"#,
            "\n\nevent: content_block_start\n",
            r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            "\n\nevent: content_block_delta\n",
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}"#,
            "\n\nevent: message_stop\n",
            r#"data: {"type":"message_stop"}"#,
            "\n\n",
        )),
        LAST_CHUNK,
    ];
    let mut provider = provider(vec![
        vec![Step::Write(overloaded)],
        vec![Step::Write(stream.concat())],
    ])
    .await;
    let config = UpstreamConfig {
        kind: UpstreamKind::Anthropic,
        ..config()
    };

    let (events, error) = run(config, &provider.base_url).await;

    assert!(error.is_none(), "{error:?}");
    assert_eq!(events[..2], hi_stop());
    assert!(matches!(&events[2], UpstreamEvent::Usage { usage, .. }
        if usage == &json!({"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6})));
    provider.requests.recv().await.unwrap();
    let received = provider.requests.recv().await.unwrap();
    let (head, body) = received.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("post /v1/messages http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nx-api-key: sk-test-key\r\n"));
    assert!(head.contains("\r\nanthropic-version: 2023-06-01\r\n"));
    assert!(!head.contains("authorization"));
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["max_tokens"], json!(4096));
    assert_eq!(body.get("stream_options"), None);
}

#[tokio::test]
async fn models_are_asked_with_a_get_and_the_dialects_headers() {
    let list =
        r#"{"data":[{"type":"model","id":"claude-x","display_name":"Claude X"}],"has_more":false}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{list}",
        list.len()
    );
    let mut provider = provider(vec![vec![Step::Write(answer)]]).await;
    let config = UpstreamConfig {
        kind: UpstreamKind::Anthropic,
        ..config()
    };
    let upstream = Upstream::new(&config, &provider.base_url).unwrap();

    let models = upstream.models().await.unwrap();

    assert_eq!(
        models,
        json!({"object": "list", "data": [{"id": "claude-x", "object": "model", "created": 0,
            "owned_by": "anthropic"}]})
    );
    let request = provider.requests.recv().await.unwrap().to_ascii_lowercase();
    assert!(
        request.starts_with("get /v1/models http/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains("\r\nx-api-key: sk-test-key\r\n"));
    assert!(request.contains("\r\naccept: application/json\r\n"));
    assert!(!request.contains("content-type"));
}

#[tokio::test]
async fn connection_closed_before_any_response_is_retried() {
    let hang_up = vec![];

    retried_then_streams(hang_up).await;
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let limited = http_error("429 Too Many Requests", "retry-after: 1\r\n", "{}");
    let started = std::time::Instant::now();

    retried_then_streams(vec![Step::Write(limited)]).await;

    // The 10 ms backoff was replaced by the provider's second.
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn retry_after_past_the_first_token_deadline_fails_at_once() {
    let limited = http_error(
        "429 Too Many Requests",
        "retry-after: 18446744073709551615\r\n", // u64::MAX seconds: must not overflow
        r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
    );
    let started = std::time::Instant::now();

    let (events, error) = run_response(&[&limited]).await;

    assert!(events.is_empty());
    assert!(
        matches!(&error, Some(UpstreamError::Http { status: 429, message }) if message == "Rate limit reached"),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn bad_request_is_not_retried_and_keeps_the_provider_message() {
    let body = r#"{"error":{"message":"Unknown parameter: 'foo'.","type":"invalid_request_error","param":"foo","code":"unknown_parameter"}}"#;
    let mut provider = provider(vec![vec![Step::Write(http_error(
        "400 Bad Request",
        "",
        body,
    ))]])
    .await;

    let (events, error) = run(config(), &provider.base_url).await;

    assert!(events.is_empty());
    let error = error.unwrap();
    assert_eq!(error.code(), "upstream_http_error");
    assert!(
        matches!(&error, UpstreamError::Http { status: 400, message } if message == "Unknown parameter: 'foo'."),
        "{error:?}"
    );
    provider.requests.recv().await.unwrap();
    assert!(
        provider.requests.recv().await.is_none(),
        "no second request"
    );
}

#[tokio::test]
async fn provider_messages_quoting_credentials_are_redacted() {
    let quoting = r#"{"error":{"message":"Incorrect API key provided: sk-test-key. Your header: Bearer sk-test-key; org acme; other sk-proj-0123456789abcdef"}}"#;
    let (_, error) = run_response(&[&http_error("401 Unauthorized", "", quoting)]).await;
    let error = error.unwrap();
    assert_eq!(error.code(), "upstream_http_error");
    assert_eq!(
        error.to_string(),
        "upstream answered HTTP 401: Incorrect API key provided: [redacted]. Your header: \
         Bearer [redacted]; org [redacted]; other [redacted]"
    );

    // Mid-stream error objects too.
    let body = [
        SSE_HEAD,
        &event(r#"{"error":{"message":"key sk-test-key was revoked"}}"#),
        LAST_CHUNK,
    ];
    let (_, error) = run_response(&body).await;
    assert_eq!(
        error.unwrap().to_string(),
        "upstream reported an error: key [redacted] was revoked"
    );
}

#[tokio::test]
async fn refused_connection_is_retried_then_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    drop(listener);

    let (events, error) = run(config(), &base_url).await;

    assert!(events.is_empty());
    let error = error.unwrap();
    assert_eq!(error.code(), "upstream_connect_error", "{error:?}");
}

#[tokio::test]
async fn provider_that_never_answers_hits_the_first_token_deadline() {
    let provider = provider(vec![vec![Step::Hang]]).await;
    let config = UpstreamConfig {
        first_token_timeout: Duration::from_millis(150),
        ..config()
    };

    let (_, error) = run(config, &provider.base_url).await;

    assert!(
        matches!(error, Some(UpstreamError::Timeout("first_token"))),
        "{error:?}"
    );
}

#[tokio::test]
async fn mid_stream_error_object_is_a_provider_error() {
    let failure =
        r#"{"error":{"message":"mock failure","type":"server_error","code":"mock_error"}}"#;

    let (events, error) =
        run_response(&[SSE_HEAD, &token("Hi"), &event(failure), LAST_CHUNK]).await;

    assert_eq!(events, [hi()]);
    assert!(
        matches!(&error, Some(UpstreamError::Provider(message)) if message == "mock failure"),
        "{error:?}"
    );
}

#[tokio::test]
async fn invalid_json_chunk_is_a_protocol_error() {
    let truncated = event("{\"choices\": [tru");

    let (events, error) = run_response(&[SSE_HEAD, &token("Hi"), &truncated, LAST_CHUNK]).await;

    assert_eq!(events, [hi()]);
    assert!(
        matches!(error, Some(UpstreamError::Protocol(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn body_ending_after_finish_without_done_completes() {
    let (events, error) =
        run_response(&[SSE_HEAD, &token("Hi"), &finish("stop"), LAST_CHUNK]).await;

    assert!(error.is_none(), "{error:?}");
    assert_eq!(events, hi_stop());
}

#[tokio::test]
async fn body_ending_without_finish_is_interrupted() {
    let (events, error) = run_response(&[SSE_HEAD, &token("Hi"), LAST_CHUNK]).await;

    assert_eq!(events, [hi()]);
    assert!(
        matches!(error, Some(UpstreamError::Interrupted(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn connection_drop_mid_stream_is_interrupted_and_not_retried() {
    let body = [SSE_HEAD, &token("Hi")];
    let provider = provider(vec![vec![Step::Write(body.concat())], ok_stream()]).await;

    let (events, error) = run(config(), &provider.base_url).await;

    assert_eq!(events, [hi()]);
    assert!(
        matches!(error, Some(UpstreamError::Interrupted(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn idle_gap_longer_than_the_idle_timeout_times_out() {
    let body = [SSE_HEAD, &token("Hi")];
    let provider = provider(vec![vec![Step::Write(body.concat()), Step::Hang]]).await;
    let config = UpstreamConfig {
        idle_timeout: Duration::from_millis(100),
        ..config()
    };

    let (events, error) = run(config, &provider.base_url).await;

    assert_eq!(events, [hi()]);
    assert!(
        matches!(error, Some(UpstreamError::Timeout("idle"))),
        "{error:?}"
    );
}

#[tokio::test]
async fn keep_alives_without_a_token_hit_the_first_token_deadline() {
    let keep_alive = chunk(": keep-alive\n\n");
    let script = vec![
        Step::Write(SSE_HEAD.to_owned()),
        Step::Repeat(keep_alive, Duration::from_millis(20)),
    ];
    let provider = provider(vec![script]).await;
    let config = UpstreamConfig {
        first_token_timeout: Duration::from_millis(150),
        ..config()
    };

    let (events, error) = run(config, &provider.base_url).await;

    assert!(events.is_empty());
    assert!(
        matches!(error, Some(UpstreamError::Timeout("first_token"))),
        "{error:?}"
    );
}

#[tokio::test]
async fn total_deadline_ends_an_endless_stream() {
    let script = vec![
        Step::Write(SSE_HEAD.to_owned()),
        Step::Repeat(token("x"), Duration::from_millis(20)),
    ];
    let provider = provider(vec![script]).await;
    let config = UpstreamConfig {
        total_timeout: Duration::from_millis(200),
        ..config()
    };

    let (events, error) = run(config, &provider.base_url).await;

    assert!(!events.is_empty());
    assert!(
        matches!(error, Some(UpstreamError::Timeout("total"))),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_endless_response_head_or_chunk_line_is_refused_not_buffered() {
    let endless_head = format!("HTTP/1.1 200 OK\r\nx-filler: {}", "a".repeat(80 * 1024));
    let endless_chunk_line = format!("{SSE_HEAD}{}{}", token("Hi"), "f".repeat(8 * 1024));
    for (response, tokens) in [(endless_head, 0), (endless_chunk_line, 1)] {
        let script = vec![Step::Write(response), Step::Hang];
        let config = UpstreamConfig {
            max_retries: 0,
            ..config()
        };
        let provider = provider(vec![script]).await;

        let (events, error) = run(config, &provider.base_url).await;

        assert_eq!(events.len(), tokens);
        assert!(
            // hyper's words: a head past its read buffer, a chunk size past 64 bits.
            matches!(&error, Some(UpstreamError::Interrupted(message) | UpstreamError::Protocol(message)) if message.contains("too large") || message.contains("overflow")),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn non_event_stream_success_is_a_protocol_error() {
    let json_200 = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\
                    connection: close\r\n\r\n{}";

    let (events, error) = run_response(&[json_200]).await;

    assert!(events.is_empty());
    assert!(
        matches!(error, Some(UpstreamError::Protocol(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection() {
    let body = [SSE_HEAD, &token("Hi")];
    let mut provider = provider(vec![vec![Step::Write(body.concat()), Step::Hang]]).await;
    let upstream = Upstream::new(&config(), &provider.base_url).unwrap();
    let mut stream = Box::pin(upstream.stream(request(), "m".into()));
    assert_eq!(stream.next().await.unwrap().unwrap(), hi());

    drop(stream);

    let hangup = tokio::time::timeout(Duration::from_secs(2), provider.hangups.recv());
    assert_eq!(hangup.await, Ok(Some(())));
}

#[test]
fn invalid_extra_header_fails_without_echoing_its_value() {
    for header in [
        "X-Api-Key sk-secret-1",
        "Bad Name: sk-secret-1",
        "X-Key: sk-\n1",
    ] {
        let config = UpstreamConfig {
            headers: vec![header.to_owned()],
            ..config()
        };
        let message = config_error(config, "http://127.0.0.1:1/v1");
        assert!(message.contains("upstream header #1"), "{message}");
        assert!(!message.contains("sk-"), "{message}");
    }
}
