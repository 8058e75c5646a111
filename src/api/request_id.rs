//! A request id on every API request, and one access log line per request.
//!
//! The id is the caller's `x-request-id` when it sends a sane one, a random one otherwise; it
//! is echoed in the response and is a field of the request's span, so every line logged while
//! serving the request carries it — and so does every line of a generation the request
//! created, whose task's span is a child of it. The access line is logged when the response
//! head is ready: a stream's duration is not the request's, and frames are never logged.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};
use tracing::{field, info, info_span, Instrument};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest caller-chosen id kept; a longer (or non-printable) one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .filter(|id| is_sane(id.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id);
    let method = request.method().clone();
    // The route template, never the path: paths carry generation ids.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method = %method,
        route,
        key = field::Empty,
    );
    crate::telemetry::trace::adopt_parent(&span, request.headers());
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        info!(
            target: "tokenfan::access",
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    });
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}

fn is_sane(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic)
}

fn new_request_id() -> HeaderValue {
    let id = format!("{:032x}", rand::random::<u128>());
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_are_kept_only_when_short_and_printable() {
        assert!(is_sane(b"req-42_abc"));
        assert!(!is_sane(b""));
        assert!(!is_sane(b"has space"));
        assert!(!is_sane("é".as_bytes()));
        assert!(!is_sane(&[b'a'; MAX_REQUEST_ID_LEN + 1]));
        let generated = new_request_id();
        assert_eq!(generated.len(), 32);
        assert!(is_sane(generated.as_bytes()));
    }
}
