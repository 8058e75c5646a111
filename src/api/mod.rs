//! The HTTP API: thin handlers that parse, call the hub, and map the result.
//!
//! - [`generations`]: the backend API (create, snapshot, cancel).
//! - [`events`]: the subscriber SSE stream.
//! - [`ops`]: `/livez`, `/readyz`, `/metrics`.
//! - [`error`]: the one error type and its HTTP mapping.

pub mod error;
pub mod events;
pub mod generations;
pub mod ops;

use std::sync::Arc;

use axum::{
    routing::{get, post},
    Router,
};
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{drain::Drain, hub::Hub};

/// What every handler shares.
pub struct App {
    pub hub: Arc<Hub>,
    pub drain: Drain,
    pub prometheus: PrometheusHandle,
    pub max_request_body: usize,
    /// The `event: reconnect` sent to every evicted subscriber, encoded once.
    pub slow_consumer_frame: Bytes,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/generations", post(generations::create))
        .route(
            "/v1/generations/{id}",
            get(generations::snapshot).delete(generations::cancel),
        )
        .route("/v1/generations/{id}/events", get(events::subscribe))
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(app)
}
