//! Several named upstreams from `--upstreams-file`: each generation goes to the upstream its
//! model routes to, in that upstream's dialect, with its own key and headers; a prefix route
//! strips the prefix; a model no upstream serves is refused without an upstream call;
//! `/v1/models` lists every upstream's models. The gateway is the real binary (keys come from
//! its environment), each upstream a real mock LLM behind a tap that records what it was sent.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{body::Body, extract::Request, http::HeaderMap, response::Response};
use common::{process::GatewayProcess, start_mock, WAIT};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const KEY_ONE: &str = "sk-upstream-one-secret";
const KEY_TWO: &str = "sk-ant-upstream-two-secret";

/// One request a tap passed on to its mock.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Value,
}

/// A provider: a real mock LLM behind a proxy that records each request.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Tap {
    async fn start() -> Self {
        let mock = start_mock().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let http = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |request: Request| {
            let (record, http) = (record.clone(), http.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                record.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers.clone(),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                let answer = http
                    .request(parts.method, format!("http://{mock}{}", parts.uri.path()))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let mut response = Response::builder().status(answer.status().as_u16());
                if let Some(content_type) = answer.headers().get("content-type") {
                    response = response.header("content-type", content_type.as_bytes());
                }
                response
                    .body(Body::from_stream(answer.bytes_stream()))
                    .unwrap()
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The requests seen so far to `path`.
    fn seen(&self, path: &str) -> Vec<(String, HeaderMap, Value)> {
        let seen = self.seen.lock().unwrap();
        let to_path = seen.iter().filter(|seen| seen.path == path);
        to_path
            .map(|seen| (seen.method.clone(), seen.headers.clone(), seen.body.clone()))
            .collect()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// Writes an upstreams file for this test and returns its path.
fn upstreams_file(test: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "tokenfan-upstreams-{test}-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// The gateway with this upstreams file, the keys in its environment.
async fn gateway(file: &Path) -> GatewayProcess {
    GatewayProcess::start_with_env(
        &["--upstreams-file", file.to_str().unwrap()],
        &[("TEST_KEY_ONE", KEY_ONE), ("TEST_KEY_TWO", KEY_TWO)],
    )
    .await
}

async fn post(gateway: &GatewayProcess, path: &str, model: &str) -> (u16, Value) {
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"tokens": 3, "interval_ms": 0},
    });
    let response = gateway
        .http
        .post(gateway.url(path))
        .json(&request)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Creates a generation of `model`, waits for its end and returns its snapshot.
async fn generate(gateway: &GatewayProcess, model: &str) -> Value {
    let (status, created) = post(gateway, "/v1/generations", model).await;
    assert_eq!(status, 201, "{model}: {created}");
    let url = gateway.url(&format!(
        "/v1/generations/{}",
        created["id"].as_str().unwrap()
    ));
    common::wait_finished(&gateway.http, &url).await
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|value| value.to_str().unwrap())
}

async fn models(gateway: &GatewayProcess) -> (u16, Vec<String>) {
    let response = gateway
        .http
        .get(gateway.url("/v1/models"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let list: Value = response.json().await.unwrap();
    let ids = list["data"].as_array().into_iter().flatten();
    (
        status,
        ids.map(|model| model["id"].as_str().unwrap().to_owned())
            .collect(),
    )
}

#[tokio::test]
async fn each_model_goes_to_its_upstream_in_its_dialect_with_its_key_and_headers() {
    let (one, two) = (Tap::start().await, Tap::start().await);
    let file = upstreams_file(
        "routes",
        &format!(
            r#"
            [[upstream]]
            name = "one"
            kind = "openai"
            url = "{}"
            api_key_env = "TEST_KEY_ONE"
            headers = {{ "X-Team" = "one" }}
            models = ["model-a"]
            default = true

            [[upstream]]
            name = "two"
            kind = "anthropic"
            url = "{}"
            api_key_env = "TEST_KEY_TWO"
            headers = {{ "X-Team" = "two" }}
            models = ["model-b"]
            prefix = "claude/"
            "#,
            one.url(),
            two.url()
        ),
    );
    let gateway = gateway(&file).await;

    // An exact name of upstream one: OpenAI's dialect, its bearer key and headers.
    let snapshot = generate(&gateway, "model-a").await;
    assert_eq!(snapshot["status"], "completed", "{snapshot}");
    assert_eq!(snapshot["token_count"], 3);
    let [(method, headers, body)] = &one.seen("/v1/chat/completions")[..] else {
        panic!("upstream one was not called once");
    };
    assert_eq!(method, "POST");
    assert_eq!(
        header(headers, "authorization"),
        Some(&*format!("Bearer {KEY_ONE}"))
    );
    assert_eq!(header(headers, "x-team"), Some("one"));
    assert_eq!(header(headers, "x-api-key"), None);
    assert_eq!(body["model"], "model-a");
    assert_eq!(two.count(), 0, "upstream two was called");

    // An exact name of upstream two: Anthropic's Messages, its x-api-key, version and headers.
    let snapshot = generate(&gateway, "model-b").await;
    assert_eq!(snapshot["status"], "completed", "{snapshot}");
    assert_eq!(snapshot["token_count"], 3);
    let [(_, headers, body)] = &two.seen("/v1/messages")[..] else {
        panic!("upstream two was not called once");
    };
    assert_eq!(header(headers, "x-api-key"), Some(KEY_TWO));
    assert_eq!(header(headers, "anthropic-version"), Some("2023-06-01"));
    assert_eq!(header(headers, "x-team"), Some("two"));
    assert_eq!(header(headers, "authorization"), None);
    assert_eq!(body["model"], "model-b");

    // A prefix route: upstream two is asked for the model without the prefix, while the
    // client's answer keeps the name it asked for.
    let (status, completion) = post(&gateway, "/v1/chat/completions", "claude/sonnet").await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["model"], "claude/sonnet");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    let sent = two.seen("/v1/messages");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].2["model"], "sonnet");

    // Any other model: the default upstream, as it is.
    let snapshot = generate(&gateway, "gpt-other").await;
    assert_eq!(snapshot["status"], "completed", "{snapshot}");
    let sent = one.seen("/v1/chat/completions");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].2["model"], "gpt-other");

    // The models of both: the configured names, the default upstream's provider list as it
    // is, and the prefixed upstream's with its prefix; each provider asked with its own key.
    let (status, ids) = models(&gateway).await;
    assert_eq!(status, 200, "{ids:?}");
    assert_eq!(
        ids,
        [
            "model-a",
            "tokenfan-mock",
            "model-b",
            "claude/tokenfan-mock"
        ]
    );
    let [(method, headers, _)] = &one.seen("/v1/models")[..] else {
        panic!("upstream one's models were not asked once");
    };
    assert_eq!(method, "GET");
    assert_eq!(
        header(headers, "authorization"),
        Some(&*format!("Bearer {KEY_ONE}"))
    );
    let [(_, headers, _)] = &two.seen("/v1/models")[..] else {
        panic!("upstream two's models were not asked once");
    };
    assert_eq!(header(headers, "x-api-key"), Some(KEY_TWO));

    // Usage is counted by the client's model name, whichever upstream served it.
    let metrics = gateway.metrics_text().await;
    for model in ["model-a", "model-b", "gpt-other"] {
        let counted = metrics.lines().any(|line| {
            line.starts_with("tokenfan_usage_completion_tokens_total{")
                && line.contains(&format!("model=\"{model}\""))
                && line.ends_with(" 3")
        });
        assert!(counted, "no usage for {model}:\n{metrics}");
    }
    assert!(!metrics.contains(KEY_ONE) && !metrics.contains(KEY_TWO));
    let output = gateway.output.lock().unwrap().join("\n");
    assert!(
        !output.contains(KEY_ONE) && !output.contains(KEY_TWO),
        "a key was logged"
    );
    std::fs::remove_file(file).unwrap();
}

#[tokio::test]
async fn an_unrouted_model_is_refused_without_an_upstream_call_and_listed_models_stay() {
    let one = Tap::start().await;
    // Upstream two's provider is down (nothing listens on port 1), and there is no default.
    let file = upstreams_file(
        "unrouted",
        &format!(
            r#"
            [[upstream]]
            name = "one"
            kind = "openai"
            url = "{}"
            api_key_env = "TEST_KEY_ONE"
            models = ["model-a", "model-c"]

            [[upstream]]
            name = "two"
            kind = "anthropic"
            url = "http://127.0.0.1:1/v1"
            api_key_env = "TEST_KEY_TWO"
            prefix = "claude/"
            "#,
            one.url()
        ),
    );
    let gateway = gateway(&file).await;

    let (status, body) = post(&gateway, "/v1/generations", "gpt-unknown").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`gpt-unknown`"));
    // The OpenAI-compatible endpoint answers in OpenAI's shape, as OpenAI does.
    let (status, body) = post(&gateway, "/v1/chat/completions", "gpt-unknown").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["type"], "not_found_error");
    // A prefix alone names no model.
    let (status, _) = post(&gateway, "/v1/generations", "claude/").await;
    assert_eq!(status, 404);
    assert_eq!(one.count(), 0, "an unrouted model reached an upstream");

    // The configured names are listed although upstream two cannot be asked for its own.
    let (status, ids) = models(&gateway).await;
    assert_eq!(status, 200, "{ids:?}");
    assert_eq!(ids, ["model-a", "model-c"]);
    assert_eq!(
        one.count(),
        0,
        "an upstream without a prefix or default was asked"
    );

    // A model of the downed upstream fails as a connect error, after its retries.
    let snapshot = generate(&gateway, "claude/sonnet").await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(
        snapshot["error"]["code"], "upstream_connect_error",
        "{snapshot}"
    );
    std::fs::remove_file(file).unwrap();
}

/// Runs `tokenfan serve ARGS…` to its exit; returns its exit code and output.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfan"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    (output.status.code(), text)
}

#[tokio::test]
async fn a_wrong_upstreams_file_stops_the_start_with_a_message_naming_upstream_and_field() {
    let file = upstreams_file(
        "wrong",
        r#"
        [[upstream]]
        name = "one"
        kind = "openai"
        url = "https://api.openai.com/v1"
        api_key = "sk-literal-never-shown"
        default = true

        [[upstream]]
        name = "two"
        kind = "anthropic"
        url = "https://api.anthropic.com/v1"
        api_key_env = "TEST_KEY_UNSET"
        prefix = "claude/"
        "#,
    );
    let started = Instant::now();
    let (code, output) = refused(&["--upstreams-file", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(
            "upstream `two`, field `api_key_env`: the environment variable `TEST_KEY_UNSET` \
             is not set or empty"
        ),
        "{output}"
    );
    assert!(output.contains(file.to_str().unwrap()), "{output}");
    assert!(!output.contains("sk-literal-never-shown"), "{output}");
    assert!(started.elapsed() < WAIT);

    // The single-upstream flags and a file: refused at once, not one silently ignored.
    let (code, output) = refused(
        &[
            "--upstreams-file",
            file.to_str().unwrap(),
            "--upstream-url",
            "http://127.0.0.1:1/v1",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("--upstream-url"), "{output}");

    // A missing file names itself.
    let (code, output) = refused(&["--upstreams-file", "/nonexistent/upstreams.toml"], &[]).await;
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("upstreams file /nonexistent/upstreams.toml"),
        "{output}"
    );
    std::fs::remove_file(file).unwrap();
}
