//! Everything a provider streams is logged, not only text: reasoning and tool-call fragments
//! are events with the same `id` = index rule as tokens, resumable with `Last-Event-ID`, and
//! the snapshot and the OpenAI-compatible endpoint assemble them.

mod common;

use common::{parse_events, Event, Gateway};
use serde_json::{json, Value};

fn tool_request(mock: Value) -> Value {
    json!({
        "model": "tokenfan-mock",
        "messages": [{"role": "user", "content": "Find two things"}],
        "tools": [
            {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
        ],
        "mock": mock,
    })
}

/// Joins `tool_call` events by tool-call index, as a client of the event stream does.
fn assemble(events: &[Event]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for event in events.iter().filter(|e| e.event == "tool_call") {
        let data = event.json();
        let index = data["tool_call_index"].as_u64().unwrap() as usize;
        if index == calls.len() {
            calls.push(Default::default());
        }
        let call = &mut calls[index];
        if let Some(id) = data["id"].as_str() {
            call.0 = id.to_owned();
        }
        if let Some(name) = data["name"].as_str() {
            call.1 = name.to_owned();
        }
        call.2.push_str(data["arguments"].as_str().unwrap());
    }
    calls
}

#[tokio::test]
async fn reasoning_and_parallel_tool_calls_are_events_resumable_by_id() {
    let gateway = Gateway::start().await;
    let mock = json!({"tool_calls": 2, "reasoning": 3, "interval_ms": 1});
    let (status, created) = gateway.post_generation(tool_request(mock), &[]).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let snapshot = gateway.wait_finished(id).await;

    let events = gateway.events(id, None).await;
    let (done, logged) = events.split_last().unwrap();
    for (index, event) in logged.iter().enumerate() {
        assert_eq!(event.id.as_deref(), Some(index.to_string().as_str()));
        assert_eq!(event.json()["index"], index);
    }
    let kinds: Vec<&str> = logged.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds[..3], ["reasoning"; 3]);
    assert!(
        kinds[3..].iter().all(|kind| *kind == "tool_call"),
        "{kinds:?}"
    );
    assert_eq!(done.event, "done");
    assert_eq!(done.id.as_deref(), Some(logged.len().to_string().as_str()));
    assert_eq!(done.json()["finish_reason"], "tool_calls");
    assert_eq!(done.json()["token_count"], logged.len());

    // The snapshot assembles what the events carry.
    assert_eq!(snapshot["text"], "");
    assert_eq!(snapshot["refusal"], Value::Null);
    let reasoning: String = logged[..3]
        .iter()
        .map(|e| e.json()["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(snapshot["reasoning"], reasoning);
    let calls = assemble(&events);
    let snapshot_calls: Vec<(String, String, String)> = snapshot["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|call| {
            assert_eq!(call["type"], "function");
            let text = |v: &Value| v.as_str().unwrap().to_owned();
            (
                text(&call["id"]),
                text(&call["function"]["name"]),
                text(&call["function"]["arguments"]),
            )
        })
        .collect();
    assert_eq!(calls, snapshot_calls);
    assert_eq!(calls[0].1, "search");
    assert_eq!(calls[1].1, "lookup");
    for call in &calls {
        let arguments: Value = serde_json::from_str(&call.2).unwrap();
        assert!(arguments["query"].is_string());
    }

    // A viewer that had ids 0..=5 gets exactly the rest.
    let rest = gateway.events(id, Some(5)).await;
    assert_eq!(rest[..], events[6..]);
    gateway.shutdown().await;
}

#[tokio::test]
async fn chat_completions_streams_tool_calls_as_openai_chunks() {
    let gateway = Gateway::start().await;
    let mut request = tool_request(json!({"tool_calls": 1, "interval_ms": 1}));
    request["stream"] = json!(true);
    let body = gateway
        .chat_completions(&request)
        .await
        .text()
        .await
        .unwrap();
    let chunks: Vec<Value> = parse_events(&body)
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(Event::json)
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    let opening = deltas[0];
    assert_eq!(opening["index"], 0);
    assert_eq!(opening["type"], "function");
    assert!(opening["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        opening["function"],
        json!({"name": "search", "arguments": ""})
    );
    for fragment in &deltas[1..] {
        let keys: Vec<&String> = fragment.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["function", "index"], "{fragment}");
    }
    let arguments: String = deltas
        .iter()
        .map(|d| d["function"]["arguments"].as_str().unwrap())
        .collect();
    assert!(
        serde_json::from_str::<Value>(&arguments).is_ok(),
        "{arguments}"
    );
    let finish = chunks
        .iter()
        .find_map(|chunk| chunk["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
    assert!(body.ends_with("data: [DONE]\n\n"));
    gateway.shutdown().await;
}
