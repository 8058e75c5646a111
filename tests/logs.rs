//! Logs an operator can search: JSON lines with stable fields, a request id on every line of a
//! request and of the generation it created, one access line per API request.

mod common;

use std::time::Duration;

use common::{chat_request, process::GatewayProcess, WAIT};
use serde_json::{json, Value};

/// The JSON lines the process has written so far.
fn json_lines(gateway: &GatewayProcess) -> Vec<Value> {
    let output = gateway.output.lock().unwrap();
    output
        .iter()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON line: {line}"))
        })
        .collect()
}

/// Waits until the process has logged a line that `wanted` accepts; returns every line then.
async fn wait_for_line(gateway: &GatewayProcess, wanted: impl Fn(&Value) -> bool) -> Vec<Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            let lines = json_lines(gateway);
            if lines.iter().any(&wanted) {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the line was never logged")
}

fn access_lines<'a>(lines: &'a [Value], route: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|line| line["target"] == "tokenfan::access" && line["route"] == route)
        .collect()
}

#[tokio::test]
async fn json_lines_carry_the_request_id_through_the_generation_and_one_access_line_each() {
    let gateway = GatewayProcess::start_with_env(
        &["--api-key", "key-zero", "--api-key", "key-one"],
        &[("TOKENFAN_LOG_FORMAT", "json")],
    )
    .await;
    let created = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .bearer_auth("key-one")
        .header("x-request-id", "req-from-the-backend")
        .json(&chat_request(json!({"tokens": 40, "interval_ms": 0})))
        .send()
        .await
        .unwrap();
    assert_eq!(created.headers()["x-request-id"], "req-from-the-backend");
    let created: Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let token = created["subscribe_token"].as_str().unwrap();
    let events = gateway
        .http
        .get(gateway.url(&format!("/v1/generations/{id}/events?token={token}")))
        .send()
        .await
        .unwrap();
    let generated = events.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 32, "{generated}");
    assert_eq!(common::read_events(events).await.len(), 41);

    wait_for_line(&gateway, |line| {
        line["generation_id"] == id && line["message"] == "generation ended"
    })
    .await;
    let lines = wait_for_line(&gateway, |line| {
        line["target"] == "tokenfan::access" && line["request_id"] == generated.as_str()
    })
    .await;
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line[field].is_string(), "{field} missing: {line}");
        }
    }
    // Every line of the generation names the request that created it.
    let of_generation: Vec<_> = lines
        .iter()
        .filter(|line| line["generation_id"] == id)
        .collect();
    assert!(of_generation.len() >= 2, "{of_generation:?}");
    for line in of_generation {
        assert_eq!(line["request_id"], "req-from-the-backend", "{line}");
    }
    // One access line per request, whatever the number of frames streamed.
    let create = access_lines(&lines, "/v1/generations");
    assert_eq!(create.len(), 1, "{create:?}");
    assert_eq!(create[0]["method"], "POST");
    assert_eq!(create[0]["status"], 201);
    assert_eq!(create[0]["key"], 1);
    assert_eq!(create[0]["request_id"], "req-from-the-backend");
    assert!(create[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    let stream = access_lines(&lines, "/v1/generations/{id}/events");
    assert_eq!(stream.len(), 1, "{stream:?}");
    assert_eq!(stream[0]["status"], 200);
    assert_eq!(stream[0]["request_id"], generated.as_str());
    assert!(!lines
        .iter()
        .any(|line| line.to_string().contains(id) && line["target"] == "tokenfan::access"));
}
