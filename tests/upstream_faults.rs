//! Upstream failures, one per way a provider breaks (issue 5): each ends its generation with a
//! clear status and error code, after delivering every token the provider sent before the fault
//! (intact, in order), and never disturbs the generations running next to it. Retries happen
//! only before the first token.

mod common;

use std::time::{Duration, Instant};

use common::{chat_request, token_texts, Event, Gateway};
use futures_util::future::join_all;
use serde_json::{json, Value};
use tokenfan::Config;

#[tokio::test]
async fn upstream_500_before_the_first_token_is_retried() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 5, "interval_ms": 0, "status": 500, "status_times": 2, "key": "flaky"}))
        .await;
    let events = gateway.events(&id, None).await;
    assert_eq!(token_texts(&events, 0).len(), 5);
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(gateway.mock_stats().await["keys"]["flaky"], 3);
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_drop_mid_stream_ends_with_an_error_event() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 20, "interval_ms": 0, "fail_after": 7, "key": "drop"}))
        .await;
    let events = gateway.events(&id, None).await;
    assert_eq!(token_texts(&events, 0).len(), 7);
    let error = events.last().unwrap();
    assert_eq!(error.event, "error");
    assert_eq!(error.id.as_deref(), Some("7"));
    assert_eq!(error.json()["status"], "failed");
    assert_eq!(error.json()["code"], "upstream_interrupted");
    // Never retried after tokens were sent: that would duplicate them.
    assert_eq!(gateway.mock_stats().await["keys"]["drop"], 1);
    let (_, snapshot) = gateway.snapshot(&id).await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(snapshot["error"]["code"], "upstream_interrupted");
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_client_error_fails_the_generation_without_retry() {
    let gateway = Gateway::start().await;
    let id = gateway.create(json!({"status": 400, "key": "bad"})).await;
    let events = gateway.events(&id, None).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "error");
    assert_eq!(events[0].json()["code"], "upstream_http_error");
    assert_eq!(gateway.mock_stats().await["keys"]["bad"], 1);
    gateway.shutdown().await;
}

/// Tokens per faulty generation; faults strike after [`BEFORE`] of them.
const TOKENS: usize = 6;
const BEFORE: usize = 3;
/// A long token, delivered whole.
const BIG_TOKEN: usize = 512 << 10;
/// A token that makes one SSE line longer than the parser's 1 MiB limit.
const OVERSIZED_TOKEN: usize = 1 << 20;
const MAX_RETRIES: u64 = 2;

/// How a faulty generation must end.
#[derive(Debug, Clone, Copy)]
struct Expect {
    /// `completed`, or the `status` of the `error` event.
    status: &'static str,
    /// The `code` of the `error` event; `None` for `completed`.
    code: Option<&'static str>,
    /// Tokens delivered before the end: the first ones of the provider's text.
    tokens: usize,
    /// Requests the gateway made to the provider: retries show here.
    requests: u64,
}

const COMPLETED: Expect = Expect {
    status: "completed",
    code: None,
    tokens: TOKENS,
    requests: 1,
};

fn failed(code: &'static str, tokens: usize, requests: u64) -> Expect {
    Expect {
        status: "failed",
        code: Some(code),
        tokens,
        requests,
    }
}

/// Short upstream deadlines, so that timeouts strike within a second.
fn short_timeouts(config: &mut Config) {
    config.upstream.first_token_timeout = Duration::from_secs(1);
    config.upstream.idle_timeout = Duration::from_secs(1);
    config.upstream.total_timeout = Duration::from_secs(10);
    config.upstream.max_retries = MAX_RETRIES as u32;
}

/// For faults that are not timeouts: a loaded machine must not turn them into one.
fn patient_timeouts(config: &mut Config) {
    short_timeouts(config);
    config.upstream.first_token_timeout = Duration::from_secs(10);
    config.upstream.idle_timeout = Duration::from_secs(10);
}

/// Every fault that is not a timeout, all at once on one gateway, next to a healthy generation:
/// each faulty generation is also a bystander of all the others. Deadlines are long, so that a
/// loaded machine cannot turn a fault into a timeout.
#[tokio::test]
async fn each_upstream_fault_gets_its_own_error_and_loses_nothing_else() {
    let mut cases: Vec<(String, Value, Expect)> = Vec::new();
    for status in [400, 401, 403, 404, 422] {
        let expect = failed("upstream_http_error", 0, 1);
        cases.push((
            format!("status {status}"),
            json!({"status": status}),
            expect,
        ));
    }
    for status in [500, 502, 503, 504] {
        let expect = failed("upstream_http_error", 0, 1 + MAX_RETRIES);
        cases.push((
            format!("status {status}"),
            json!({"status": status}),
            expect,
        ));
    }
    let protocol = "upstream_protocol_error";
    #[rustfmt::skip]
    cases.extend([
        ("200 with a JSON body", json!({"body": "json"}), failed(protocol, 0, 1)),
        ("invalid JSON in a chunk", json!({"invalid_json_after": BEFORE}), failed(protocol, BEFORE, 1)),
        ("a chunk without choices", json!({"no_choices_after": BEFORE}), COMPLETED),
        ("a first chunk without choices", json!({"no_choices_after": 0}), COMPLETED),
        ("an error object mid-stream", json!({"error_after": BEFORE}), failed("upstream_error", BEFORE, 1)),
        ("finish_reason without [DONE]", json!({"done": false}), COMPLETED),
        ("clean end without finish_reason", json!({"end_after": BEFORE}), failed("upstream_interrupted", BEFORE, 1)),
        ("connection dropped", json!({"fail_after": BEFORE}), failed("upstream_interrupted", BEFORE, 1)),
        ("512 KiB tokens", json!({"token_bytes": BIG_TOKEN, "tokens": 3}), Expect { tokens: 3, ..COMPLETED }),
        ("a token over the line limit", json!({"token_bytes": OVERSIZED_TOKEN}), failed(protocol, 0, 1)),
    ].map(|(name, knobs, expect)| (name.to_owned(), knobs, expect)));
    run_side_by_side(patient_timeouts, cases).await;
}

/// Every way a provider goes silent, all at once, next to a healthy generation, with one-second
/// deadlines. Its own test (and runtime thread): the heavy cases above cannot stall its timers.
#[tokio::test]
async fn each_silent_upstream_times_out_and_loses_nothing_else() {
    let timeout = |tokens| failed("upstream_timeout", tokens, 1);
    #[rustfmt::skip]
    let cases = [
        ("a stream that never ends", json!({"hang_after": BEFORE}), timeout(BEFORE)),
        ("a stream that never starts", json!({"hang_after": 0}), timeout(0)),
        ("a first token that never comes", json!({"first_token_ms": 5000}), timeout(0)),
        ("headers that never come", json!({"headers_ms": 5000}), timeout(0)),
    ].map(|(name, knobs, expect)| (name.to_owned(), knobs, expect));
    run_side_by_side(short_timeouts, cases.into()).await;
}

/// Runs every case at once on one gateway configured by `configure`, next to a bystander.
async fn run_side_by_side(configure: fn(&mut Config), cases: Vec<(String, Value, Expect)>) {
    let gateway = Gateway::start_with(configure).await;
    let bystander = Bystander::start(&gateway).await;

    let runs = cases
        .iter()
        .enumerate()
        .map(|(seed, (name, knobs, expect))| {
            check_fault(&gateway, name, seed as u64, knobs.clone(), *expect)
        });
    join_all(runs).await;

    bystander.assert_whole(&gateway).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn too_many_requests_is_retried_after_the_providers_retry_after() {
    let gateway = Gateway::start().await;
    let bystander = Bystander::start(&gateway).await;
    let started = Instant::now();

    let knobs = json!({"status": 429, "status_times": 1, "retry_after": 1});
    check_fault(
        &gateway,
        "429",
        1,
        knobs,
        Expect {
            requests: 2,
            ..COMPLETED
        },
    )
    .await;

    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    bystander.assert_whole(&gateway).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn refused_connections_fail_each_generation_cleanly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let gateway = Gateway::start_with(|config| {
        config.upstream.url = Some(url);
        config.upstream.max_retries = 1;
    })
    .await;

    // There is no healthy upstream to compare with: every generation fails alike, and the
    // gateway stays up.
    let ids = join_all((0..3).map(|_| gateway.create(json!({})))).await;
    for id in &ids {
        let events = gateway.events(id, None).await;
        assert_ended(&events, failed("upstream_connect_error", 0, 0));
    }
    let livez = gateway
        .http
        .get(gateway.url("/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(livez.status(), 200);
    gateway.shutdown().await;
}

#[tokio::test]
async fn tls_handshake_with_a_plain_http_provider_is_a_connect_error() {
    let gateway = Gateway::start_with(|config| {
        config.upstream.url = config
            .upstream
            .url
            .take()
            .map(|url| url.replace("http://", "https://"));
        config.upstream.max_retries = 0;
    })
    .await;

    let id = gateway.create(json!({})).await;

    let events = gateway.events(&id, None).await;
    assert_ended(&events, failed("upstream_connect_error", 0, 0));
    gateway.shutdown().await;
}

/// A provider that writes its stream one byte at a time (each byte its own write, 1 ms apart)
/// is slow but fine while every gap is under the idle timeout, and is cut by the total one.
#[tokio::test]
async fn trickling_provider_completes_under_the_idle_timeout_and_not_past_the_total() {
    let knobs = json!({"tokens": 3, "trickle_ms": 1});
    // The first token is some 350 bytes in: give it time; every gap stays a millisecond.
    let trickle_timeouts = |config: &mut Config| {
        short_timeouts(config);
        config.upstream.first_token_timeout = Duration::from_secs(10);
    };
    let patient = Gateway::start_with(trickle_timeouts).await;
    let hurried = Gateway::start_with(|config| {
        trickle_timeouts(config);
        // The stream is over a thousand bytes: more than a second at one byte per millisecond.
        config.upstream.total_timeout = Duration::from_millis(600);
    })
    .await;
    let bystander = Bystander::start(&patient).await;

    let completes = check_fault(
        &patient,
        "trickle",
        1,
        knobs.clone(),
        Expect {
            tokens: 3,
            ..COMPLETED
        },
    );
    let times_out = async {
        let id = hurried.create(with_key(knobs.clone(), "trickle", 1)).await;
        let events = hurried.events(&id, None).await;
        // Whatever arrived before the deadline is the start of the text, intact.
        let delivered = token_texts(&events, 0);
        let reference = reference_tokens(&hurried, &knobs, 1).await;
        assert!(reference.starts_with(&delivered), "{delivered:?}");
        assert_ended(&events, failed("upstream_timeout", delivered.len(), 1));
    };
    tokio::join!(completes, times_out);

    bystander.assert_whole(&patient).await;
    patient.shutdown().await;
    hurried.shutdown().await;
}

/// Runs one faulty generation (its knobs get `key` = `name` and `seed`) and checks how it ended
/// against the provider's own text for the same seed.
async fn check_fault(gateway: &Gateway, name: &str, seed: u64, knobs: Value, expect: Expect) {
    let knobs = with_key(knobs, name, seed);
    let id = gateway.create(knobs.clone()).await;
    let events = gateway.events(&id, None).await;

    let delivered = token_texts(&events, 0);
    assert_eq!(
        delivered.len(),
        expect.tokens,
        "{name}: tokens delivered: {events:?}"
    );
    let reference = reference_tokens(gateway, &knobs, seed).await;
    assert!(
        reference.starts_with(&delivered),
        "{name}: tokens differ from the provider's"
    );
    assert_ended(&events, expect);
    let (_, snapshot) = gateway.snapshot(&id).await;
    assert_eq!(snapshot["status"], expect.status, "{name}: {snapshot}");
    assert_eq!(
        snapshot["text"],
        delivered.concat(),
        "{name}: snapshot text"
    );
    let requests = &gateway.mock_stats().await["keys"][name];
    assert_eq!(
        requests, expect.requests,
        "{name}: requests to the provider"
    );
}

/// Checks the terminal event of a stream.
fn assert_ended(events: &[Event], expect: Expect) {
    let last = events.last().expect("no events");
    let data = last.json();
    assert_eq!(last.id.as_deref(), Some(expect.tokens.to_string().as_str()));
    match expect.code {
        None => {
            assert_eq!(last.event, "done", "{data}");
            assert_eq!(data["status"], "completed");
            assert_eq!(data["finish_reason"], "stop");
            assert!(data["usage"]["total_tokens"].is_u64(), "{data}");
        }
        Some(code) => {
            assert_eq!(last.event, "error", "{data}");
            assert_eq!(data["status"], expect.status);
            assert_eq!(data["code"], code, "{data}");
            assert!(!data["message"].as_str().unwrap_or("").is_empty(), "{data}");
        }
    }
}

fn with_key(mut knobs: Value, name: &str, seed: u64) -> Value {
    let defaults = json!({"tokens": TOKENS, "interval_ms": 0, "key": name, "seed": seed});
    for (knob, value) in defaults.as_object().unwrap() {
        knobs
            .as_object_mut()
            .unwrap()
            .entry(knob)
            .or_insert(value.clone());
    }
    knobs
}

/// The tokens the mock streams for these knobs without any fault, straight from the mock.
async fn reference_tokens(gateway: &Gateway, knobs: &Value, seed: u64) -> Vec<String> {
    let mut clean = json!({"tokens": TOKENS, "interval_ms": 0, "seed": seed});
    for knob in ["tokens", "token_bytes"] {
        if let Some(value) = knobs.get(knob) {
            clean[knob] = value.clone();
        }
    }
    let mut request = chat_request(clean);
    request["stream"] = json!(true);
    let body = gateway
        .http
        .post(format!("http://{}/v1/chat/completions", gateway.mock_addr))
        .json(&request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| {
            let chunk: Value = serde_json::from_str(data).unwrap();
            let content = chunk["choices"][0]["delta"]["content"].as_str()?;
            (!content.is_empty()).then(|| content.to_owned())
        })
        .collect()
}

/// A healthy generation running through a test's faults.
struct Bystander {
    id: String,
    knobs: Value,
}

impl Bystander {
    const SEED: u64 = 4242;

    async fn start(gateway: &Gateway) -> Self {
        // About a second of tokens: it runs while the faults strike.
        let knobs =
            json!({"tokens": 50, "interval_ms": 20, "seed": Self::SEED, "key": "bystander"});
        let id = gateway.create(knobs.clone()).await;
        Self { id, knobs }
    }

    async fn assert_whole(self, gateway: &Gateway) {
        let events = gateway.events(&self.id, None).await;
        let reference = reference_tokens(gateway, &self.knobs, Self::SEED).await;
        assert_eq!(
            token_texts(&events, 0),
            reference,
            "the bystander lost tokens"
        );
        assert_ended(
            &events,
            Expect {
                tokens: 50,
                ..COMPLETED
            },
        );
    }
}
