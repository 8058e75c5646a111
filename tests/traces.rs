//! Traces over OTLP/HTTP: a real receiver on a loopback port decodes what the gateway sends
//! and the test checks the span tree, joined to the caller's trace and passed on to the
//! provider.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post, Router};
use common::{chat_request, process::GatewayProcess, WAIT};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, trace::v1::Span,
};
use prost::Message;
use serde_json::{json, Value};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN_ID: &str = "b7ad6b7169203331";

/// Serves `router` on a loopback port; returns its address.
async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// An OTLP/HTTP receiver: decodes each export and keeps its spans.
async fn otlp_receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let router = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(spans): State<Arc<Mutex<Vec<Span>>>>, body: Bytes| async move {
                    let export = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut spans = spans.lock().unwrap();
                    for resource in export.resource_spans {
                        for scope in resource.scope_spans {
                            spans.extend(scope.spans);
                        }
                    }
                },
            ),
        )
        .with_state(spans.clone());
    (serve(router).await, spans)
}

/// A provider that streams one token and remembers the `traceparent` it was sent.
async fn provider() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let body = format!(
        "{}{}data: [DONE]\n\n",
        chunk(json!({"content": "hi"}), Value::Null),
        chunk(json!({}), json!("stop"))
    );
    let router = Router::new()
        .route(
            "/v1/chat/completions",
            post(
                move |State(seen): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap| async move {
                    let traceparent = headers
                        .get("traceparent")
                        .map(|value| value.to_str().unwrap().to_owned());
                    seen.lock().unwrap().extend(traceparent);
                    ([("content-type", "text/event-stream")], body)
                },
            ),
        )
        .with_state(seen.clone());
    (serve(router).await, seen)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one span called `name` in the caller's trace (the test's polls have traces of their own).
fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<_> = spans
        .iter()
        .filter(|span| span.name == name && hex(&span.trace_id) == TRACE_ID)
        .collect();
    assert_eq!(found.len(), 1, "{name}: {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_generation_is_traced_under_the_callers_trace_and_the_provider_joins_it() {
    let (receiver, spans) = otlp_receiver().await;
    let (provider, traceparents) = provider().await;
    let mut gateway = GatewayProcess::start(&[
        "--upstream-url",
        &format!("http://{provider}/v1"),
        "--otlp-endpoint",
        &format!("http://{receiver}/v1/traces"),
    ])
    .await;
    let created = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01"))
        .json(&chat_request(json!(null)))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let completed = r#"tokenfan_generations_finished_total{status="completed"}"#;
    gateway.wait_metric(completed, |n| n == 1.0).await;
    // The last spans are sent as the process exits.
    gateway.signal(Signal::SIGTERM);
    let (status, _) = gateway.exit(Instant::now(), WAIT).await;
    assert!(status.success(), "{status}");

    let spans = spans.lock().unwrap().clone();
    let request = named(&spans, "request");
    let generation = named(&spans, "generation");
    let upstream = named(&spans, "upstream_request");
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(generation.parent_span_id, request.span_id);
    assert_eq!(upstream.parent_span_id, generation.span_id);
    assert_eq!(
        *traceparents.lock().unwrap(),
        [format!("00-{TRACE_ID}-{}-01", hex(&upstream.span_id))]
    );
}
