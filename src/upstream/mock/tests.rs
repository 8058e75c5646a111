//! The mock over real sockets: `serve` on 127.0.0.1:0, reqwest (or raw TCP) as the client.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
    time::timeout,
};

use super::{serve, Interval, MockConfig, Stats, MAX_KEYS};

/// A running mock and the means to stop it.
struct Running {
    addr: SocketAddr,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start() -> Self {
        let config = MockConfig {
            tokens: 5,
            interval: Interval {
                min: Duration::ZERO,
                max: Duration::from_millis(2),
            },
            first_token: Duration::ZERO,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, config, async move {
            let _ = stop.await;
        }));
        Self {
            addr,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Streams a completion and returns the `data:` payloads, in order.
    async fn stream(&self, mock: Value) -> Vec<String> {
        let response = self.post(request(mock, true)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        data_lines(&response.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// Fires the shutdown signal and waits for `serve` to return.
    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        timeout(Duration::from_secs(2), self.task)
            .await
            .expect("serve returns promptly after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn request(mock: Value, stream: bool) -> Value {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "stream": stream,
        "mock": mock,
    })
}

fn data_lines(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn parse(data: &str) -> Value {
    serde_json::from_str(data).unwrap()
}

/// The content tokens of a stream, without the role chunk's empty content.
fn tokens(data: &[String]) -> Vec<String> {
    data.iter()
        .filter(|line| *line != "[DONE]")
        .filter_map(|line| {
            parse(line)["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|content| !content.is_empty())
        .collect()
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Sends `body` as a chat request over a raw socket, for tests that read the bytes of the answer.
async fn raw_post(addr: SocketAddr, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket
}

/// Sends `body` over a raw socket and reads a chunked response until its terminating chunk;
/// returns it and how many reads it took.
async fn raw_stream(addr: SocketAddr, body: &Value) -> (String, usize) {
    let mut socket = raw_post(addr, body).await;
    let (mut received, mut reads) = (Vec::new(), 0);
    let mut buf = [0; 4096];
    while !received.ends_with(b"\r\n0\r\n\r\n") {
        let read = timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
        let n = read.expect("the stream did not end").unwrap();
        assert!(n > 0, "closed before the terminating chunk");
        received.extend_from_slice(&buf[..n]);
        reads += 1;
    }
    (String::from_utf8(received).unwrap(), reads)
}

/// The chunks of a chunked body, without their framing.
fn dechunk(mut body: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return chunks;
        }
        chunks.push(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Sends `body` over a raw socket and returns everything until the server closes it.
async fn raw_exchange(addr: SocketAddr, body: &Value) -> String {
    let mut socket = raw_post(addr, body).await;
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match timeout(Duration::from_secs(2), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
    String::from_utf8(received).unwrap()
}

#[tokio::test]
async fn text_is_deterministic_for_a_seed() {
    let mock = Running::start().await;
    let first = tokens(&mock.stream(json!({"seed": 7, "tokens": 20})).await);
    let again = tokens(&mock.stream(json!({"seed": 7, "tokens": 20})).await);
    let other = tokens(&mock.stream(json!({"seed": 8, "tokens": 20})).await);
    assert_eq!(first.len(), 20);
    assert_eq!(first, again);
    assert_ne!(first, other);
    // Pinned, so that a seed names the same text in every build and process.
    assert_eq!(first.concat(), GOLDEN_SEED_7);
    mock.stop().await;
}

const GOLDEN_SEED_7: &str =
    "Voice a brings new network, you writes moves light we, we model finds, simple. Bright but";

#[tokio::test]
async fn default_seed_is_the_hash_of_the_messages() {
    let mock = Running::start().await;
    let ask = |content: &str| json!({"messages": [{"role": "user", "content": content}], "stream": true, "mock": {"tokens": 12}});
    let mut texts = Vec::new();
    for content in ["Hello", "Hello", "Goodbye"] {
        let response = mock.post(ask(content)).await;
        texts.push(tokens(&data_lines(&response.text().await.unwrap())));
    }
    assert_eq!(texts[0], texts[1]);
    assert_ne!(texts[0], texts[2]);
    mock.stop().await;
}

#[tokio::test]
async fn stream_has_role_tokens_finish_and_done_last() {
    let mock = Running::start().await;
    let data = mock.stream(json!({"tokens": 3})).await;
    assert_eq!(data.len(), 1 + 3 + 1 + 1, "{data:?}");
    let role = parse(&data[0]);
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(role["model"], "m");
    assert_eq!(
        role["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let finish = parse(&data[4]);
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["id"], role["id"]);
    assert!(data.iter().all(|line| !line.contains("usage")));
    assert_eq!(data.last().unwrap(), "[DONE]");
    mock.stop().await;
}

#[tokio::test]
async fn usage_chunk_comes_only_with_include_usage() {
    let mock = Running::start().await;
    let mut body = request(json!({"tokens": 4}), true);
    body["stream_options"] = json!({"include_usage": true});
    let response = mock.post(body).await;
    let data = data_lines(&response.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage = parse(&data[data.len() - 2]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    assert_eq!(usage["usage"]["total_tokens"], prompt + 4);
    mock.stop().await;
}

#[tokio::test]
async fn max_tokens_caps_the_stream_with_finish_reason_length() {
    let mock = Running::start().await;
    for cap in ["max_tokens", "max_completion_tokens"] {
        let mut body = request(json!({"tokens": 10, "seed": 1}), true);
        body[cap] = json!(3);
        let data = data_lines(&mock.post(body).await.text().await.unwrap());
        assert_eq!(tokens(&data).len(), 3, "{cap}");
        assert_eq!(
            parse(&data[4])["choices"][0]["finish_reason"],
            "length",
            "{cap}"
        );
    }
    mock.stop().await;
}

#[tokio::test]
async fn stamp_starts_each_token_with_emit_time_in_micros() {
    let mock = Running::start().await;
    let before = now_micros();
    let stamped = tokens(
        &mock
            .stream(json!({"tokens": 3, "stamp": true, "token_bytes": 64}))
            .await,
    );
    let after = now_micros();
    assert_eq!(stamped.len(), 3);
    for token in stamped {
        let (stamp, rest) = token.split_once(' ').unwrap();
        assert_eq!(stamp.len(), 16, "{token:?}");
        let stamp: u128 = stamp.parse().unwrap();
        assert!((before..=after).contains(&stamp));
        assert!(!rest.is_empty());
        assert!(token.len() >= 64, "token_bytes pads: {token:?}");
    }
    mock.stop().await;
}

#[tokio::test]
async fn fail_after_drops_the_connection_without_done() {
    let mock = Running::start().await;
    let raw = raw_exchange(
        mock.addr,
        &request(json!({"tokens": 5, "fail_after": 2}), true),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 OK"), "{raw}");
    assert_eq!(
        raw.matches("\"content\":\"").count(),
        1 + 2,
        "role + 2 tokens: {raw}"
    );
    assert!(!raw.contains("[DONE]"));
    assert!(!raw.contains("finish_reason\":\"stop"));
    assert!(!raw.ends_with("0\r\n\r\n"), "no terminating chunk: {raw}");
    mock.stop().await;
}

#[tokio::test]
async fn error_after_sends_the_error_object_and_ends() {
    let mock = Running::start().await;
    let data = mock.stream(json!({"tokens": 5, "error_after": 2})).await;
    assert_eq!(tokens(&data[..3]).len(), 2);
    assert_eq!(
        parse(&data[3]),
        json!({"error": {"message": "mock failure", "type": "server_error", "code": "mock_error"}})
    );
    assert_eq!(data.len(), 4, "nothing after the error: {data:?}");
    mock.stop().await;
}

#[tokio::test]
async fn end_after_ends_the_body_cleanly_without_finish_or_done() {
    let mock = Running::start().await;
    let body = request(json!({"tokens": 5, "end_after": 2}), true);
    let (raw, _) = raw_stream(mock.addr, &body).await;
    assert_eq!(
        raw.matches("\"content\":\"").count(),
        1 + 2,
        "role + 2 tokens: {raw}"
    );
    assert!(
        !raw.contains("finish_reason\":\"stop") && !raw.contains("[DONE]"),
        "{raw}"
    );
    mock.stop().await;
}

#[tokio::test]
async fn done_false_ends_after_the_finish_and_usage_chunks() {
    let mock = Running::start().await;
    let mut body = request(json!({"tokens": 2, "done": false}), true);
    body["stream_options"] = json!({"include_usage": true});
    let response = mock.post(body).await;
    let data = data_lines(&response.text().await.unwrap());
    assert_eq!(tokens(&data).len(), 2);
    assert_eq!(parse(&data[3])["choices"][0]["finish_reason"], "stop");
    assert!(parse(&data[4])["usage"].is_object(), "{data:?}");
    assert_eq!(data.len(), 5, "no [DONE]: {data:?}");
    mock.stop().await;
}

#[tokio::test]
async fn injected_chunks_come_once_and_the_stream_goes_on() {
    let mock = Running::start().await;
    let data = mock
        .stream(json!({"tokens": 3, "invalid_json_after": 1}))
        .await;
    assert!(serde_json::from_str::<Value>(&data[2]).is_err(), "{data:?}");
    let valid: Vec<String> = data.iter().filter(|d| *d != &data[2]).cloned().collect();
    assert_eq!(tokens(&valid).len(), 3);
    assert_eq!(data.last().unwrap(), "[DONE]");

    let data = mock
        .stream(json!({"tokens": 3, "no_choices_after": 0}))
        .await;
    let first = parse(&data[0]);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert!(
        first.get("choices").is_none() && first.get("usage").is_none(),
        "{first}"
    );
    assert_eq!(tokens(&data).len(), 3);
    assert_eq!(data.last().unwrap(), "[DONE]");
    mock.stop().await;
}

#[tokio::test]
async fn body_json_answers_a_streaming_request_with_one_completion() {
    let mock = Running::start().await;
    let response = mock
        .post(request(json!({"tokens": 2, "body": "json"}), true))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let completion: Value = response.json().await.unwrap();
    assert_eq!(completion["object"], "chat.completion");
    mock.stop().await;
}

#[tokio::test]
async fn headers_ms_holds_the_response_back() {
    let mock = Running::start().await;
    let started = std::time::Instant::now();
    let response = mock
        .post(request(json!({"tokens": 1, "headers_ms": 150}), true))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.status(), 200);
    mock.stop().await;
}

/// Each byte is its own write: a reader sees the stream arrive in one-byte reads.
#[tokio::test]
async fn trickle_writes_the_stream_one_byte_at_a_time() {
    let mock = Running::start().await;
    let body = request(json!({"tokens": 1, "trickle_ms": 1}), true);
    let (raw, reads) = raw_stream(mock.addr, &body).await;
    let chunks = dechunk(raw.split_once("\r\n\r\n").unwrap().1);
    assert!(chunks.iter().all(|chunk| chunk.len() == 1), "{chunks:?}");
    assert!(chunks.concat().ends_with("data: [DONE]\n\n"), "{chunks:?}");
    assert!(chunks.len() > 300, "{} bytes", chunks.len());
    // Reads may merge a few writes, but nothing near one read per frame.
    assert!(
        reads > chunks.len() / 4,
        "{reads} reads for {} bytes",
        chunks.len()
    );
    mock.stop().await;
}

#[tokio::test]
async fn status_fails_only_the_first_times_requests_with_a_key() {
    let mock = Running::start().await;
    let knobs =
        json!({"tokens": 2, "status": 503, "status_times": 1, "key": "retry-me", "retry_after": 3});
    let failed = mock.post(request(knobs.clone(), true)).await;
    assert_eq!(failed.status(), 503);
    assert_eq!(failed.headers()["retry-after"], "3");
    let error: Value = failed.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["code"], "mock_status");

    let streamed = mock.post(request(knobs, true)).await;
    assert_eq!(streamed.status(), 200);
    let data = data_lines(&streamed.text().await.unwrap());
    assert_eq!(tokens(&data).len(), 2);
    assert_eq!(data.last().unwrap(), "[DONE]");
    mock.stop().await;
}

#[tokio::test]
async fn status_without_times_fails_every_request() {
    let mock = Running::start().await;
    for _ in 0..2 {
        let response = mock.post(request(json!({"status": 429}), true)).await;
        assert_eq!(response.status(), 429);
        assert!(response.headers().get("retry-after").is_none());
    }
    mock.stop().await;
}

#[tokio::test]
async fn hang_after_keeps_the_connection_silent_until_shutdown() {
    let mock = Running::start().await;
    let mut response = mock
        .post(request(json!({"tokens": 5, "hang_after": 2}), true))
        .await;
    let mut received = String::new();
    while tokens(&data_lines(&received)).len() < 2 {
        let chunk = response.chunk().await.unwrap().unwrap();
        received.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let silence = timeout(Duration::from_millis(200), response.chunk()).await;
    assert!(silence.is_err(), "no bytes while hanging: {silence:?}");

    let end = tokio::spawn(async move { response.chunk().await });
    mock.stop().await;
    let end = timeout(Duration::from_secs(1), end).await.unwrap().unwrap();
    assert!(end.is_err(), "shutdown cuts the hanging stream: {end:?}");
}

#[tokio::test]
async fn hang_after_zero_sends_nothing_after_the_headers() {
    let mock = Running::start().await;
    let mut response = mock.post(request(json!({"hang_after": 0}), true)).await;
    assert_eq!(response.status(), 200);
    let silence = timeout(Duration::from_millis(200), response.chunk()).await;
    assert!(silence.is_err(), "no bytes while hanging: {silence:?}");
    mock.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_openai_errors() {
    let mock = Running::start().await;
    let cases = [
        (
            request(json!({"tokns": 3}), true),
            "invalid_mock_knob",
            "tokns",
        ),
        (
            request(json!({"tokens": "3"}), true),
            "invalid_mock_knob",
            "invalid type",
        ),
        (
            request(json!({"interval_ms": [9, 1]}), true),
            "invalid_mock_knob",
            "interval_ms",
        ),
        (
            request(json!({"fail_after": 1, "hang_after": 1}), true),
            "invalid_mock_knob",
            "at most one",
        ),
        (
            request(json!({"status_times": 1}), true),
            "invalid_mock_knob",
            "needs status",
        ),
        (
            request(json!({"status": 200}), true),
            "invalid_mock_knob",
            "status 200",
        ),
        (
            request(json!({"end_after": 1, "no_choices_after": 1}), true),
            "invalid_mock_knob",
            "at most one",
        ),
        (
            request(json!({"body": "xml"}), true),
            "invalid_mock_knob",
            "unknown variant",
        ),
        (
            request(json!({"trickle_ms": 1}), false),
            "invalid_mock_knob",
            "trickle_ms needs a streaming request",
        ),
        (
            request(json!({"trickle_ms": 1, "body": "json"}), true),
            "invalid_mock_knob",
            "trickle_ms needs a streaming request",
        ),
        (
            request(json!({"status": 503, "key": "k".repeat(257)}), true),
            "invalid_mock_knob",
            "key length 257 is above the limit of 256",
        ),
        (
            json!({"model": "m", "stream": true}),
            "invalid_request",
            "messages",
        ),
        (json!({"messages": "hi"}), "invalid_request", "invalid type"),
        (json!({"messages": []}), "invalid_request", "at least one"),
    ];
    for (body, code, needle) in cases {
        let response = mock.post(body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(error["error"]["code"], code, "{body}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{message:?} should name {needle:?}"
        );
    }

    let malformed = mock
        .client
        .post(mock.url("/v1/chat/completions"))
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let error: Value = malformed.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_json");
    mock.stop().await;
}

#[tokio::test]
async fn non_streaming_request_gets_the_whole_completion() {
    let mock = Running::start().await;
    let streamed = tokens(&mock.stream(json!({"tokens": 6, "seed": 3})).await).concat();
    let mut body = request(json!({"tokens": 6, "seed": 3}), false);
    body["max_tokens"] = json!(100);
    let completion: Value = mock.post(body).await.json().await.unwrap();
    assert_eq!(completion["object"], "chat.completion");
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], streamed.as_str());
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(completion["usage"]["completion_tokens"], 6);
    mock.stop().await;
}

#[tokio::test]
async fn stats_count_requests_and_keys() {
    let mock = Running::start().await;
    for key in ["a", "b", "a"] {
        mock.stream(json!({"tokens": 1, "key": key})).await;
    }
    mock.post(request(json!({"tokens": 1}), true)).await;
    mock.post(request(json!({"bogus": 1}), true)).await;
    let stats = mock.get("/mock/stats").await;
    assert_eq!(stats, json!({"requests": 5, "keys": {"a": 2, "b": 1}}));
    mock.stop().await;
}

#[test]
fn remembered_keys_are_bounded_and_the_oldest_is_forgotten() {
    let stats = Stats::default();
    for key in 0..=MAX_KEYS {
        assert_eq!(stats.count_key(&key.to_string()), 1);
    }
    assert_eq!(stats.count_key("1"), 2);
    let keys = stats.keys.lock().unwrap();
    assert_eq!(keys.counts.len(), MAX_KEYS);
    assert!(!keys.counts.contains_key("0"));
}

#[tokio::test]
async fn models_lists_the_mock_model() {
    let mock = Running::start().await;
    let models = mock.get("/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tokenfan-mock");
    mock.stop().await;
}

#[test]
fn default_config_matches_the_flag_defaults() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockConfig,
    }
    assert_eq!(Cli::parse_from(["mock"]).mock, MockConfig::default());
    let custom = Cli::parse_from([
        "mock",
        "--mock-interval",
        "5ms..10ms",
        "--mock-first-token",
        "1s",
    ]);
    assert_eq!(custom.mock.interval.to_string(), "5ms..10ms");
    assert_eq!(custom.mock.first_token, Duration::from_secs(1));
}

#[test]
fn interval_parses_a_range_or_a_fixed_delay() {
    let range: Interval = "20ms..80ms".parse().unwrap();
    assert_eq!(
        (range.min, range.max),
        (Duration::from_millis(20), Duration::from_millis(80))
    );
    let fixed: Interval = "50ms".parse().unwrap();
    assert_eq!(
        (fixed.min, fixed.max),
        (Duration::from_millis(50), Duration::from_millis(50))
    );
    assert_eq!(fixed.to_string(), "50ms");
    assert!("80ms..20ms".parse::<Interval>().is_err());
    assert!("fast".parse::<Interval>().is_err());
}
