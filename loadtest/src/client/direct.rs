//! A stream read straight from the mock LLM (`chatpath`), beside the gateway's viewers in the
//! same run: the baseline the gateway's added latency is measured against. It uses the
//! subscriber's connect, head, chunked and SSE code and does only what any streaming client of
//! a provider must: send the chat completion, read the mock's `chat.completion.chunk`s, time
//! each stamped token, and check the count at `[DONE]`. A cut stream is counted, not resumed:
//! a provider's stream cannot be.

use std::net::Ipv4Addr;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connect::connect_from;
use super::http::one_shot_request;
use super::payload::content_stamp_us;
use super::sse::SseBody;
use super::subscriber::{
    read_head, unix_micros, ConnectedGuard, Expected, Shared, MIN_READ_BUFFER,
};
use crate::worker::DirectCall;

/// Runs one direct stream until `[DONE]`, a failure, or the worker says leave.
pub async fn run(
    call: Rc<DirectCall>,
    expect: Option<Expected>,
    source: Ipv4Addr,
    shared: Rc<Shared>,
) {
    let mut leave = shared.leave.clone();
    let left = tokio::select! {
        () = stream(&call, expect, source, &shared) => false,
        _ = leave.wait_for(|go| *go) => true,
    };
    let mut counters = shared.counters.borrow_mut();
    counters.ended += 1;
    if left {
        counters.left += 1;
    }
}

async fn stream(call: &DirectCall, expect: Option<Expected>, source: Ipv4Addr, shared: &Shared) {
    let Ok(mut socket) = connect_from(source, call.mock, None).await else {
        shared.counters.borrow_mut().connect_errors += 1;
        return;
    };
    // Clients connect over the ramp: the first token stays due when the generations' are.
    let mut body = call.body.clone();
    let now_ms = unix_micros() / 1000;
    body["mock"]["first_token_ms"] = call.first_token_unix_ms.saturating_sub(now_ms).into();
    let body = body.to_string();
    let request = one_shot_request(
        call.mock,
        "POST",
        "/v1/chat/completions",
        Some(body.as_bytes()),
    );
    if socket.write_all(&request).await.is_err() {
        shared.counters.borrow_mut().connect_errors += 1;
        return;
    }
    let mut buf = vec![0u8; shared.policy.read_buffer.max(MIN_READ_BUFFER)];
    let Some((chunked, body_start, filled)) = read_head(&mut socket, &mut buf, shared).await else {
        return;
    };
    if body_start == usize::MAX {
        // A 204: the mock never answers a chat completion so.
        shared.counters.borrow_mut().protocol_errors += 1;
        return;
    }
    {
        let mut counters = shared.counters.borrow_mut();
        counters.connects += 1;
        counters.connected += 1;
    }
    let _guard = ConnectedGuard(&shared.counters);
    let mut sse = SseBody::new(chunked);
    let (mut tokens, mut done) = (0u64, false);
    let mut range = body_start..filled;
    loop {
        let now = unix_micros();
        let mut on_event = |data: &[u8]| {
            if done {
                return;
            }
            if data == b"[DONE]" {
                done = true;
            } else if let Some(emitted) = content_stamp_us(data) {
                tokens += 1;
                shared.counters.borrow_mut().direct_tokens += 1;
                let latency = now.saturating_sub(emitted).max(1);
                let _ = shared.direct_latency.borrow_mut().record(latency);
            }
        };
        if sse
            .feed(&buf[range.clone()], |ev| on_event(ev.data))
            .is_err()
        {
            shared.counters.borrow_mut().protocol_errors += 1;
            return;
        }
        if done {
            break;
        }
        let ended = sse.ended();
        match socket.read(&mut buf).await {
            Ok(n) if n > 0 && !ended => range = 0..n,
            _ => {
                shared.counters.borrow_mut().dropped_streams += 1;
                return;
            }
        }
    }
    let mut counters = shared.counters.borrow_mut();
    counters.done += 1;
    if expect.is_some_and(|e| e.tokens != tokens) {
        counters.unexpected_endings += 1;
    }
}
