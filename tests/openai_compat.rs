//! `POST /v1/chat/completions` answers like OpenAI's API while running as a tokenfan generation:
//! the chunks, the usage chunk, `[DONE]`, the plain `chat.completion`, OpenAI's error shape, and
//! every token exactly once even when the reader was dropped from fan-out.

mod common;

use std::time::Duration;

use common::{get_text, parse_events, read_events, token_texts, Event, Gateway, WAIT};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

const GENERATION_ID: &str = "x-tokenfan-generation-id";

fn chat(mock: Value, extra: Value) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "mock": mock,
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

async fn post_chat(gateway: &Gateway, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = gateway
        .http
        .post(gateway.url("/v1/chat/completions"))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn generation_id(response: &reqwest::Response) -> String {
    let id = response.headers()[GENERATION_ID].to_str().unwrap();
    assert!(id.starts_with("gen_"), "{id}");
    id.to_owned()
}

/// The `data:` payloads of a chat stream, as JSON, except the final `[DONE]`.
fn chunks(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .take_while(|e| e.data != "[DONE]")
        .map(|e| {
            assert_eq!(e.event, "message", "OpenAI streams carry no event names");
            assert_eq!(e.id, None, "OpenAI streams carry no ids");
            e.json()
        })
        .collect()
}

fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn streaming_answers_like_openai_with_usage_and_done() {
    let gateway = Gateway::start().await;
    let body = chat(
        json!({"tokens": 12, "interval_ms": 1}),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let response = post_chat(&gateway, &body, &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let id = generation_id(&response);
    let events = read_events(response).await;

    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks = chunks(&events);
    assert_eq!(chunks.len() + 1, events.len(), "nothing after [DONE]");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"]);
        assert!(chunk["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(chunk["model"], "gpt-test");
        assert!(chunk["created"].as_u64().unwrap() > 1_700_000_000);
    }
    let role = &chunks[0]["choices"][0];
    assert_eq!(role["index"], 0);
    assert_eq!(role["delta"]["role"], "assistant");
    assert_eq!(role["finish_reason"], Value::Null);

    // One chunk per token, then the finish chunk, then usage with empty choices.
    let tokens = &chunks[1..chunks.len() - 2];
    assert_eq!(tokens.len(), 12);
    assert!(tokens.iter().all(|c| c["usage"].is_null()));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);

    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(content(&chunks), snapshot["text"]);
    assert_eq!(snapshot["usage"], usage["usage"]);
    gateway.shutdown().await;
}

#[tokio::test]
async fn without_include_usage_no_chunk_mentions_usage() {
    let gateway = Gateway::start().await;
    let body = chat(
        json!({"tokens": 3, "interval_ms": 1}),
        json!({"stream": true}),
    );
    let events = read_events(post_chat(&gateway, &body, &[]).await).await;
    let chunks = chunks(&events);
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "{chunks:?}"
    );
    assert_eq!(chunks.len(), 1 + 3 + 1);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    gateway.shutdown().await;
}

#[tokio::test]
async fn another_viewer_attaches_to_the_chat_generation() {
    let gateway = Gateway::start().await;
    let body = chat(
        json!({"tokens": 30, "interval_ms": 5}),
        json!({"stream": true}),
    );
    let response = post_chat(&gateway, &body, &[]).await;
    let id = generation_id(&response);
    let (chat_events, viewer_events) =
        tokio::join!(read_events(response), gateway.events(&id, None));
    let viewer_text = token_texts(&viewer_events, 0).concat();
    assert_eq!(content(&chunks(&chat_events)), viewer_text);
    assert_eq!(viewer_events.last().unwrap().event, "done");
    assert_eq!(gateway.wait_finished(&id).await["text"], viewer_text);
    gateway.shutdown().await;
}

#[tokio::test]
async fn without_stream_answers_one_chat_completion() {
    let gateway = Gateway::start().await;
    let body = chat(json!({"tokens": 5, "interval_ms": 1}), json!({}));
    let response = post_chat(&gateway, &body, &[]).await;
    assert_eq!(response.status(), 200);
    let id = generation_id(&response);
    let completion: Value = response.json().await.unwrap();
    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(completion["object"], "chat.completion");
    assert!(completion["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(completion["model"], "gpt-test");
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], snapshot["text"]);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(completion["usage"]["completion_tokens"], 5);

    // max_tokens reaches the provider; its finish reason comes back.
    let capped = chat(
        json!({"tokens": 5, "interval_ms": 1}),
        json!({"max_tokens": 2}),
    );
    let completion: Value = post_chat(&gateway, &capped, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(completion["choices"][0]["finish_reason"], "length");
    gateway.shutdown().await;
}

#[tokio::test]
async fn idempotency_key_replays_the_same_generation_in_full() {
    let gateway = Gateway::start().await;
    let body = chat(
        json!({"tokens": 8, "interval_ms": 2}),
        json!({"stream": true}),
    );
    let key = [("idempotency-key", "chat-retry-1")];
    let first = post_chat(&gateway, &body, &key).await;
    let id = generation_id(&first);
    let first_text = content(&chunks(&read_events(first).await));

    let again = post_chat(&gateway, &body, &key).await;
    assert_eq!(generation_id(&again), id);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again_text = content(&chunks(&read_events(again).await));
    assert_eq!(again_text, first_text);
    assert_eq!(gateway.mock_stats().await["requests"], 1);
    gateway.shutdown().await;
}

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
async fn openai_error(response: reqwest::Response, status: u16, kind: &str, code: &str) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert!(error.as_object().unwrap().contains_key("param"));
}

#[tokio::test]
async fn request_errors_use_openai_error_shape() {
    let gateway = Gateway::start().await;
    let url = gateway.url("/v1/chat/completions");
    let invalid_json = gateway
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"model\":")
        .send()
        .await
        .unwrap();
    openai_error(invalid_json, 400, "invalid_request_error", "invalid_json").await;

    let no_messages = json!({"model": "m", "messages": []});
    let response = post_chat(&gateway, &no_messages, &[]).await;
    openai_error(response, 400, "invalid_request_error", "invalid_request").await;

    let bad_stream = chat(json!({}), json!({"stream": "yes"}));
    let response = post_chat(&gateway, &bad_stream, &[]).await;
    openai_error(response, 400, "invalid_request_error", "invalid_request").await;

    let body = chat(json!({}), json!({}));
    let reused_key = [("idempotency-key", "k")];
    let response = post_chat(&gateway, &body, &reused_key).await;
    assert_eq!(response.status(), 200);
    let other = chat(json!({"tokens": 1}), json!({}));
    let response = post_chat(&gateway, &other, &reused_key).await;
    openai_error(
        response,
        422,
        "invalid_request_error",
        "idempotency_key_reused",
    )
    .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_failure_is_an_error_object_in_the_stream_and_a_502_without_stream() {
    let gateway = Gateway::start().await;
    let failing = json!({"tokens": 10, "interval_ms": 1, "error_after": 4});
    let response = post_chat(
        &gateway,
        &chat(failing.clone(), json!({"stream": true})),
        &[],
    )
    .await;
    assert_eq!(
        response.status(),
        200,
        "headers were sent before the failure"
    );
    let events = read_events(response).await;
    assert!(
        events.iter().all(|e| e.data != "[DONE]"),
        "no [DONE] after an error"
    );
    let last = events.last().unwrap().json();
    assert_eq!(last["error"]["type"], "server_error");
    assert_eq!(last["error"]["code"], "upstream_error");
    assert!(!content(&chunks(&events[..events.len() - 1])).is_empty());

    let response = post_chat(&gateway, &chat(failing, json!({})), &[]).await;
    openai_error(response, 502, "server_error", "upstream_error").await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn draining_gateway_refuses_with_503_and_retry_after() {
    let gateway = Gateway::start().await;
    // A running generation keeps the drain going while we knock.
    gateway
        .create(json!({"tokens": 1000, "interval_ms": 50}))
        .await;
    // Fresh connections: the drain closes idle keep-alive ones.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = gateway.url("/v1/chat/completions");
    let readyz = gateway.url("/readyz");
    let shutdown = tokio::spawn(gateway.shutdown());
    tokio::time::timeout(WAIT, async {
        while http.get(&readyz).send().await.unwrap().status() != 503 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let response = http
        .post(&url)
        .json(&chat(json!({}), json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "5");
    openai_error(response, 503, "server_error", "draining").await;
    shutdown.await.unwrap();
}

/// A streaming reader that falls behind leaves the live fan-out like any subscriber and catches
/// up from the log at its cursor (it could not be told to reconnect anyway): every token,
/// exactly once.
#[tokio::test]
async fn slow_chat_reader_is_dropped_from_fan_out_and_still_gets_every_token_once() {
    let gateway = Gateway::start_with(|c| {
        c.stream.channel_capacity = 8;
        c.connection.socket_send_buffer = Some(16 * 1024);
        c.connection.write_timeout = Duration::from_secs(30);
    })
    .await;
    let flood = json!({"tokens": 300, "interval_ms": 1, "token_bytes": 4000});
    let body = serde_json::to_vec(&chat(flood, json!({"stream": true}))).unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: tokenfan\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();

    // Do not read until the generation is over: the reader is far behind by then.
    let mut head = vec![0; 1024];
    let n = stream.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    let id = head
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{GENERATION_ID}: ")))
        .expect("generation id header in the first read")
        .to_owned();
    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(snapshot["status"], "completed");

    let mut raw = head.into_bytes();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let body = dechunk(&raw[raw.find("\r\n\r\n").unwrap() + 4..]);
    let events = parse_events(&body);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert_eq!(content(&chunks(&events)), snapshot["text"]);
    // It really fell behind (no other test in this binary has a slow reader).
    assert!(fell_behind(&gateway).await > 0);
    gateway.shutdown().await;
}

async fn fell_behind(gateway: &Gateway) -> u64 {
    get_text(&gateway.http, &gateway.url("/metrics"))
        .await
        .lines()
        .filter(|line| line.starts_with("tokenfan_subscribers_fell_behind_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// With API keys configured, the endpoint is part of the backend API: a key is required (the
/// refusal in OpenAI's shape, as the SDKs expect), and the response hands out a subscribe token
/// so that a viewer without a key can attach to the generation.
#[tokio::test]
async fn with_api_keys_a_key_is_required_and_viewers_get_a_subscribe_token() {
    let gateway = Gateway::start_with(|c| {
        c.access.api_keys = vec![tokenfan::config::Secret::new("sk-tokenfan")];
    })
    .await;
    let body = chat(
        json!({"tokens": 4, "interval_ms": 1}),
        json!({"stream": true}),
    );
    let missing = post_chat(&gateway, &body, &[]).await;
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    openai_error(missing, 401, "invalid_request_error", "missing_credentials").await;

    let response = post_chat(&gateway, &body, &[("authorization", "Bearer sk-tokenfan")]).await;
    assert_eq!(response.status(), 200);
    let id = generation_id(&response);
    let token = response.headers()["x-tokenfan-subscribe-token"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = content(&chunks(&read_events(response).await));

    let events_url = gateway.url(&format!("/v1/generations/{id}/events"));
    let refused = gateway.http.get(&events_url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let viewer = gateway
        .http
        .get(&events_url)
        .query(&[("token", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(viewer.status(), 200);
    assert_eq!(token_texts(&read_events(viewer).await, 0).concat(), text);
    gateway.shutdown().await;
}
