//! `GET /v1/models`: the provider's model list in OpenAI's shape, whatever the upstream kind,
//! behind the same key check as the chat endpoint, with provider failures in OpenAI's error shape.

mod common;

use common::Gateway;
use serde_json::Value;
use tokenfan::config::{Secret, UpstreamKind};

async fn models(gateway: &Gateway, key: Option<&str>) -> (u16, Value) {
    let mut request = gateway.http.get(gateway.url("/v1/models"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn models_come_from_the_upstream_as_an_openai_list() {
    for kind in [UpstreamKind::Openai, UpstreamKind::Anthropic] {
        let gateway = Gateway::start_with(|c| c.upstream.kind = kind).await;
        let (status, list) = models(&gateway, None).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["object"], "list");
        assert_eq!(list["data"][0]["id"], "tokenfan-mock", "{kind:?}: {list}");
        assert_eq!(list["data"][0]["object"], "model");
        gateway.shutdown().await;
    }
}

#[tokio::test]
async fn models_need_a_key_and_report_an_unreachable_provider() {
    let gateway = Gateway::start_with(|c| {
        c.access.api_keys = vec![Secret::new("models-key")];
        // Nothing listens on port 1.
        c.upstream.url = Some("http://127.0.0.1:1/v1".into());
    })
    .await;
    let (status, body) = models(&gateway, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "missing_credentials");

    let (status, body) = models(&gateway, Some("models-key")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_connect_error");
    assert_eq!(body["error"]["type"], "server_error");
    gateway.shutdown().await;
}
