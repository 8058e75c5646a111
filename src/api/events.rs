//! The subscriber stream: `GET /v1/generations/{id}/events`.
//!
//! A subscriber first catches up from the generation's log (replay never goes through the
//! bounded channel, so a late joiner to a long generation is not "slow"), then goes live on its
//! own bounded channel. The stream ends after the terminal event, or with `event: reconnect`
//! when the hub dropped it for being slow or the gateway is shutting down; the client then
//! resumes with `Last-Event-ID` and loses nothing.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use axum::{
    body::Body,
    extract::{
        rejection::{PathRejection, QueryRejection},
        Path, Query, State,
    },
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::Stream;
use serde::Deserialize;

use super::{auth::authorize_subscriber, error::ApiError, generations::find, App};
use crate::hub::{frame, Delivery, HubError, Resume, Subscription};

/// A `Last-Event-ID` longer than this cannot be a token id (u64 has 20 digits).
const MAX_EVENT_ID_LEN: usize = 20;
/// `retry:` for a subscriber turned away at the connection limit: long, and spread, so that a
/// full instance is not hammered (a load balancer may send the retry elsewhere).
const OVER_CAPACITY_RETRY_MS: std::ops::RangeInclusive<u64> = 10_000..=20_000;
/// `retry:` while the shared store is unreachable: soon, spread so the reconnects do not land
/// together.
const STORE_UNAVAILABLE_RETRY_MS: std::ops::RangeInclusive<u64> = 1_000..=3_000;

#[derive(Deserialize)]
pub struct EventsQuery {
    last_event_id: Option<String>,
    token: Option<String>,
}

pub async fn subscribe(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if app.drain.is_draining() {
        // A browser's EventSource gives up for good on a non-200 answer; a reconnect event
        // sends it to a healthy instance instead.
        let retry = app.drain.reconnect_retry_ms();
        return Ok(event_stream(Body::from(frame::reconnect(
            retry, "shutdown",
        ))));
    }
    let Query(query) = query?;
    let Path(id) = id?;
    authorize_subscriber(&app, &headers, query.token.as_deref(), &id)?;
    let generation = match find(&app, &id).await {
        // A browser's EventSource gives up for good on an error status: while the shared store
        // is unreachable, tell it to come back instead.
        Err(ApiError::Hub(HubError::Store(error))) => {
            tracing::warn!(%error, "a subscription waits for the store");
            let retry = rand::Rng::random_range(&mut rand::rng(), STORE_UNAVAILABLE_RETRY_MS);
            return Ok(event_stream(Body::from(frame::reconnect(
                retry,
                "store_unavailable",
            ))));
        }
        found => found?,
    };
    let cursor = resume_cursor(&headers, query.last_event_id.as_deref())?;
    match app.hub.resume(&generation, cursor).await {
        Resume::Stream => {}
        Resume::NothingLeft => return Ok(StatusCode::NO_CONTENT.into_response()),
        Resume::BeyondEnd => return Err(ApiError::InvalidLastEventId),
    }
    let subscription = Subscription::open(
        app.hub.clone(),
        generation,
        cursor,
        app.max_subscribers_per_generation,
    )
    .ok_or(ApiError::TooManySubscribers)?;
    ::metrics::counter!(crate::metrics::SUBSCRIPTIONS).increment(1);
    let stream = SubscriberStream {
        app,
        subscription: Some(subscription),
        introduced: false,
    };
    Ok(event_stream(Body::from_stream(stream)))
}

/// A subscription on a connection beyond the connection limit: come back later.
pub async fn over_capacity() -> Response {
    ::metrics::counter!(crate::metrics::LIMITED, "limit" => "over_capacity").increment(1);
    let retry = rand::Rng::random_range(&mut rand::rng(), OVER_CAPACITY_RETRY_MS);
    event_stream(Body::from(frame::reconnect(retry, "over_capacity")))
}

/// A `text/event-stream` response around `body`.
pub(crate) fn event_stream(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The first token id the client lacks: the `Last-Event-ID` header (what a reconnecting
/// `EventSource` sends) wins over the `last_event_id` query parameter (what a page can set).
fn resume_cursor(headers: &HeaderMap, query: Option<&str>) -> Result<u64, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|value| value.to_str().map_err(|_| ApiError::InvalidLastEventId))
        .transpose()?;
    match header.or(query).map(str::trim) {
        None | Some("") => Ok(0),
        Some(id) => parse_event_id(id)
            .and_then(|id| id.checked_add(1))
            .ok_or(ApiError::InvalidLastEventId),
    }
}

/// A `Last-Event-ID` value as a token id: decimal digits only, at most 20 of them.
pub fn parse_event_id(id: &str) -> Option<u64> {
    let digits_only = id.len() <= MAX_EVENT_ID_LEN && id.bytes().all(|b| b.is_ascii_digit());
    digits_only.then(|| id.parse().ok()).flatten()
}

/// The body of one subscription. Small on purpose: it exists once per connected client.
struct SubscriberStream {
    app: Arc<App>,
    /// `None` once the stream has ended.
    subscription: Option<Subscription>,
    /// Whether the `instance` event (with a shared store) was sent.
    introduced: bool,
}

impl SubscriberStream {
    /// The last event of a stream the hub closed before its end: come back and resume.
    fn reconnect_frame(&self) -> Bytes {
        if self.app.drain.is_draining() {
            frame::reconnect(self.app.drain.reconnect_retry_ms(), "shutdown")
        } else {
            self.app.slow_consumer_frame.clone()
        }
    }
}

impl Stream for SubscriberStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !std::mem::replace(&mut self.introduced, true) {
            if let Some(frame) = &self.app.instance_frame {
                return Poll::Ready(Some(Ok(frame.clone())));
            }
        }
        let Some(subscription) = &mut self.subscription else {
            return Poll::Ready(None);
        };
        let frame = match ready!(subscription.poll_delivery(cx)) {
            Some(Delivery::Replayed { frames, from, to }) => {
                crate::metrics::record_replay(to - from);
                frames
            }
            Some(Delivery::Token { frame, index }) => {
                let queued = || subscription.queued();
                subscription.generation().lag().delivered(index, queued);
                frame
            }
            Some(Delivery::KeepAlive) => frame::KEEPALIVE,
            Some(Delivery::Ended(terminal)) => {
                self.subscription = None;
                terminal
            }
            Some(Delivery::Dropped) => {
                self.subscription = None;
                self.reconnect_frame()
            }
            None => return Poll::Ready(None),
        };
        Poll::Ready(Some(Ok(frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(last_event_id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "last-event-id",
            HeaderValue::from_str(last_event_id).unwrap(),
        );
        headers
    }

    #[test]
    fn header_wins_over_query_and_cursor_is_the_next_id() {
        assert_eq!(resume_cursor(&headers("41"), Some("3")).unwrap(), 42);
        assert_eq!(resume_cursor(&HeaderMap::new(), Some("3")).unwrap(), 4);
        assert_eq!(resume_cursor(&HeaderMap::new(), None).unwrap(), 0);
        assert_eq!(resume_cursor(&headers(""), None).unwrap(), 0);
    }

    #[test]
    fn malformed_event_ids_are_rejected() {
        for bad in [
            "-1",
            "1.5",
            "abc",
            "0x10",
            "18446744073709551615",
            &"9".repeat(21),
        ] {
            assert!(
                resume_cursor(&headers(bad), None).is_err(),
                "{bad} accepted"
            );
        }
    }
}
