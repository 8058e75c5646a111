//! Who may do what: API keys on the backend API, subscribe tokens on streams, CORS, and an
//! open gateway refusing a public address.

mod common;

use common::{chat_request, Gateway};
use serde_json::{json, Value};
use tokenfan::config::Secret;

async fn keyed_gateway() -> Gateway {
    Gateway::start_with(|c| {
        c.access.api_keys = vec![Secret::new("key-old"), Secret::new("key-new")];
    })
    .await
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn backend_api_requires_one_of_the_configured_keys() {
    let gateway = keyed_gateway().await;
    let url = gateway.url("/v1/generations");
    let body = chat_request(json!({"tokens": 2}));

    let missing = gateway.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        error_code(missing).await,
        (401, "missing_credentials".into())
    );
    let wrong = gateway
        .http
        .post(&url)
        .bearer_auth("key-wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(wrong).await, (401, "invalid_credentials".into()));

    // Either key of a rotation works.
    for key in ["key-old", "key-new"] {
        let created = gateway
            .http
            .post(&url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let created: Value = created.json().await.unwrap();
        let snapshot_url = gateway.url(&format!(
            "/v1/generations/{}",
            created["id"].as_str().unwrap()
        ));
        let unauthorised = gateway.http.get(&snapshot_url).send().await.unwrap();
        assert_eq!(unauthorised.status(), 401);
        let snapshot = gateway
            .http
            .get(&snapshot_url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(snapshot.status(), 200);
        let cancel = gateway.http.delete(&snapshot_url).send().await.unwrap();
        assert_eq!(cancel.status(), 401);
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn subscribers_need_a_token_for_that_very_generation() {
    let gateway = keyed_gateway().await;
    let create = |tokens: u64| {
        gateway
            .http
            .post(gateway.url("/v1/generations"))
            .bearer_auth("key-new")
            .json(&chat_request(json!({"tokens": tokens, "interval_ms": 0})))
            .send()
    };
    let first: Value = create(3).await.unwrap().json().await.unwrap();
    let second: Value = create(3).await.unwrap().json().await.unwrap();
    let id = first["id"].as_str().unwrap();
    let token = first["subscribe_token"].as_str().unwrap();
    let events = |id: &str| gateway.url(&format!("/v1/generations/{id}/events"));

    // The token works as a query parameter (EventSource) and as a bearer credential.
    let by_query = gateway
        .http
        .get(format!("{}?token={token}", events(id)))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    assert_eq!(
        common::read_events(by_query).await.last().unwrap().event,
        "done"
    );
    let by_header = gateway
        .http
        .get(events(id))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(by_header.status(), 200);
    // An API key is also accepted (a backend watching its own generation).
    let by_key = gateway
        .http
        .get(events(id))
        .bearer_auth("key-old")
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.status(), 200);
    // But not in the query, where proxies log it: only subscribe tokens go there.
    let key_in_query = gateway
        .http
        .get(format!("{}?token=key-old", events(id)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(key_in_query).await,
        (401, "invalid_credentials".into())
    );

    // Refusals, identical whether or not the generation exists.
    let other = second["id"].as_str().unwrap();
    let missing_generation = "gen_0123456789abcdef0123456789abcdef";
    for target in [other, missing_generation] {
        let wrong_scope = gateway
            .http
            .get(format!("{}?token={token}", events(target)))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(wrong_scope).await,
            (403, "token_scope".into()),
            "{target}"
        );
        let none = gateway.http.get(events(target)).send().await.unwrap();
        assert_eq!(error_code(none).await, (401, "missing_credentials".into()));
        let forged = gateway
            .http
            .get(format!(
                "{}?token={}",
                events(target),
                token.replace(id, target)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(forged).await,
            (401, "invalid_credentials".into())
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn open_gateway_refuses_a_public_address_unless_told() {
    let listener = tokenfan::bind("0.0.0.0:0".parse().unwrap(), 16).unwrap();
    let error = tokenfan::serve(
        listener,
        tokenfan::Config::defaults(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, tokenfan::ServeError::Unauthenticated(_)),
        "{error}"
    );
    assert!(error.to_string().contains("--allow-unauthenticated"));

    let listener = tokenfan::bind("0.0.0.0:0".parse().unwrap(), 16).unwrap();
    let mut config = tokenfan::Config::defaults();
    config.access.allow_unauthenticated = true;
    let served = tokenfan::serve(listener, config, async {}).await;
    assert!(served.is_ok());
}

fn preflight(gateway: &Gateway, origin: &'static str) -> reqwest::RequestBuilder {
    gateway
        .http
        .request(reqwest::Method::OPTIONS, gateway.url("/v1/generations"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
}

#[tokio::test]
async fn cors_answers_only_configured_origins() {
    let gateway =
        Gateway::start_with(|c| c.access.cors_origins = vec!["https://app.example".into()]).await;
    let preflight = |origin| preflight(&gateway, origin).send();
    let allowed = preflight("https://app.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(!refused
        .headers()
        .contains_key("access-control-allow-origin"));
    gateway.shutdown().await;
}

#[tokio::test]
async fn cors_star_allows_any_origin_and_is_refused_among_others() {
    let gateway = Gateway::start_with(|c| c.access.cors_origins = vec!["*".into()]).await;
    let allowed = preflight(&gateway, "https://anywhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "*");
    gateway.shutdown().await;

    let mut config = tokenfan::Config::defaults();
    config.access.cors_origins = vec!["*".into(), "https://app.example".into()];
    let listener = tokenfan::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let error = tokenfan::serve(listener, config, std::future::pending())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("give it alone"), "{error}");
}

#[tokio::test]
async fn secrets_never_reach_logs_metrics_or_errors() {
    const API_KEY: &str = "tf-api-key-7f3a9c1e5b";
    const UPSTREAM_KEY: &str = "sk-upstream-secret-4d2e8a";
    const TOKEN_KEY: &str = "signing-key-0123456789abcdef0123456789abcdef";
    let gateway = common::process::GatewayProcess::start_with_env(
        &[],
        &[
            ("TOKENFAN_LOG", "trace"),
            ("TOKENFAN_API_KEYS", API_KEY),
            ("TOKENFAN_UPSTREAM_API_KEY", UPSTREAM_KEY),
            ("TOKENFAN_SUBSCRIBE_TOKEN_KEY", TOKEN_KEY),
        ],
    )
    .await;
    let mut seen = Vec::new();
    // A good call (the upstream key travels to the mock), a bad one, a stream, the metrics.
    let created: Value = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .bearer_auth(API_KEY)
        .json(&chat_request(json!({"tokens": 3, "interval_ms": 0})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    seen.push(
        created
            .to_string()
            .replace(created["subscribe_token"].as_str().unwrap(), ""),
    );
    let id = created["id"].as_str().unwrap();
    let wrong = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    seen.push(wrong.text().await.unwrap());
    let bad_token = gateway
        .http
        .get(gateway.url(&format!("/v1/generations/{id}/events?token={API_KEY}x")))
        .send()
        .await
        .unwrap();
    seen.push(bad_token.text().await.unwrap());
    // Reading the whole stream means the upstream call (carrying its key) has happened.
    let token = created["subscribe_token"].as_str().unwrap();
    let events_url = gateway.url(&format!("/v1/generations/{id}/events?token={token}"));
    let events = common::read_events(gateway.http.get(events_url).send().await.unwrap()).await;
    assert_eq!(events.last().unwrap().event, "done");
    seen.push(gateway.metrics_text().await);
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tokenfan"))
        .args(["serve", "--help"])
        .env("TOKENFAN_API_KEYS", API_KEY)
        .env("TOKENFAN_UPSTREAM_API_KEY", UPSTREAM_KEY)
        .env("TOKENFAN_SUBSCRIBE_TOKEN_KEY", TOKEN_KEY)
        .output()
        .unwrap();
    seen.push(String::from_utf8_lossy(&help.stdout).into_owned());
    seen.extend(gateway.output.lock().unwrap().iter().cloned());
    assert!(
        seen.len() > 10,
        "the gateway logged nothing at trace level?"
    );
    for text in &seen {
        for secret in [API_KEY, UPSTREAM_KEY, TOKEN_KEY] {
            assert!(!text.contains(secret), "secret leaked in: {text}");
        }
    }
}
