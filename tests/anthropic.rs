//! An Anthropic upstream (`--upstream-kind anthropic`), played by the embedded mock's
//! `/v1/messages`: generations and `/v1/chat/completions` work as with an OpenAI upstream —
//! text, reasoning, parallel tool calls, the follow-up turn, usage, errors and retries.

mod common;

use common::{chat_request, token_texts, Gateway};
use serde_json::{json, Value};
use tokenfan::config::UpstreamKind;

async fn anthropic_gateway() -> Gateway {
    Gateway::start_with(|c| c.upstream.kind = UpstreamKind::Anthropic).await
}

#[tokio::test]
async fn text_streams_with_usage_from_an_anthropic_upstream() {
    let gateway = anthropic_gateway().await;
    let id = gateway
        .create(json!({"tokens": 6, "interval_ms": 1, "reasoning": 2}))
        .await;
    let snapshot = gateway.wait_finished(&id).await;
    let events = gateway.events(&id, None).await;

    assert_eq!(snapshot["status"], "completed", "{snapshot}");
    assert_eq!(snapshot["finish_reason"], "stop");
    let texts = token_texts(&events[2..], 2);
    assert_eq!(texts.len(), 6);
    assert_eq!(texts.concat(), snapshot["text"]);
    assert_eq!(events[0].event, "reasoning");
    assert!(!snapshot["reasoning"].as_str().unwrap().is_empty());
    let usage = &snapshot["usage"];
    assert_eq!(usage["completion_tokens"], 8, "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + 8)
    );
    gateway.shutdown().await;
}

/// A non-streaming `/v1/chat/completions` answer.
async fn complete(gateway: &Gateway, request: Value) -> Value {
    gateway
        .chat_completions(&request)
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn tool_calls_and_the_follow_up_turn_go_through_the_translation() {
    let gateway = anthropic_gateway().await;
    let tools = json!([
        {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    ]);
    let question = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Find two things"},
    ]);
    let completion = complete(
        &gateway,
        json!({"model": "claude-mock", "messages": question, "tools": tools,
            "tool_choice": "required", "mock": {"tool_calls": 2, "interval_ms": 1}}),
    )
    .await;
    let choice = &completion["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{completion}");
    let message = &choice["message"];
    let calls = message["tool_calls"].as_array().unwrap();
    let names: Vec<&str> = calls
        .iter()
        .map(|call| call["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["search", "lookup"]);
    for call in calls {
        let arguments = call["function"]["arguments"].as_str().unwrap();
        assert!(serde_json::from_str::<Value>(arguments)
            .unwrap()
            .is_object());
    }

    // The results go back as `tool` messages, which Anthropic takes as `tool_result` blocks.
    let mut follow_up = question.as_array().unwrap().clone();
    follow_up.push(message.clone());
    for call in calls {
        follow_up.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "found"}));
    }
    let answer = complete(
        &gateway,
        json!({"model": "claude-mock", "messages": follow_up, "tools": tools,
            "mock": {"tokens": 3, "interval_ms": 1}}),
    )
    .await;
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert!(!answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    gateway.shutdown().await;
}

#[tokio::test]
async fn overloaded_is_retried_and_a_mid_stream_error_fails_the_generation() {
    let gateway = anthropic_gateway().await;
    let flaky = json!({"tokens": 3, "interval_ms": 0, "status": 529, "status_times": 1,
        "key": "anthropic-overloaded"});
    let id = gateway.create(flaky).await;
    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(snapshot["status"], "completed", "{snapshot}");
    assert_eq!(
        gateway.mock_stats().await["keys"]["anthropic-overloaded"],
        2
    );

    let (_, failing) = gateway
        .post_generation(chat_request(json!({"tokens": 5, "error_after": 2})), &[])
        .await;
    let snapshot = gateway.wait_finished(failing["id"].as_str().unwrap()).await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(snapshot["error"]["code"], "upstream_error");
    assert_eq!(
        snapshot["error"]["message"],
        "upstream reported an error: mock failure"
    );
    assert_eq!(snapshot["token_count"], 2);
    gateway.shutdown().await;
}
