//! The HTTP API: thin handlers that parse, call the hub, and map the result.
//!
//! - [`generations`]: the backend API (create, snapshot, cancel).
//! - [`chat`]: the OpenAI-compatible `POST /v1/chat/completions`, run as a generation.
//! - [`demo`]: the demo page at `/` and its assets.
//! - [`events`]: the subscriber SSE stream.
//! - [`ops`]: `/livez`, `/readyz`, `/metrics`.
//! - [`error`]: the one error type and its HTTP mapping.

pub mod auth;
pub mod chat;
pub mod demo;
pub mod error;
pub mod events;
pub mod generations;
mod head_size;
pub mod ops;
pub mod request_id;

use std::sync::Arc;

use axum::{
    http::{header, HeaderName, HeaderValue, Method},
    middleware,
    routing::{get, post},
    Router,
};
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{access::Access, drain::Drain, hub::Hub};

/// What every handler shares.
pub struct App {
    pub hub: Arc<Hub>,
    pub access: Access,
    pub max_subscribers_per_generation: usize,
    pub drain: Drain,
    pub prometheus: PrometheusHandle,
    pub max_request_body: usize,
    /// `--max-header-bytes`, checked on the parsed head of every request.
    pub max_header_bytes: usize,
    /// The `event: reconnect` sent to every evicted subscriber, encoded once.
    pub slow_consumer_frame: Bytes,
    /// Whether the shared store answers, when there is one (for readiness).
    pub store_health: Option<crate::store_health::StoreHealth>,
    /// With a shared store, the first event of every subscriber stream: which instance serves
    /// it (`event: instance`, no id), so that a page can show viewers moving between instances.
    pub instance_frame: Option<Bytes>,
}

pub fn router(app: Arc<App>, cors: Option<CorsLayer>) -> Router {
    let backend = Router::new()
        .route("/v1/generations", post(generations::create))
        .route(
            "/v1/generations/{id}",
            get(generations::snapshot).delete(generations::cancel),
        )
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            auth::require_api_key,
        ));
    let router = Router::new()
        .merge(backend)
        .route("/v1/generations/{id}/events", get(events::subscribe))
        .route(
            "/v1/chat/completions",
            post(chat::completions).layer(middleware::from_fn_with_state(
                app.clone(),
                chat::require_api_key,
            )),
        )
        .route(
            "/v1/models",
            get(chat::models).layer(middleware::from_fn_with_state(
                app.clone(),
                chat::require_api_key,
            )),
        )
        .route("/", get(demo::page))
        .route("/demo/{asset}", get(demo::asset))
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            app.max_header_bytes,
            head_size::limit,
        ))
        .layer(middleware::from_fn(request_id::track))
        .with_state(app);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// What a connection beyond `--max-connections` is served: subscribers are told to come back
/// later (an `EventSource` would give up on an error status), probes still see the process
/// alive, and everything else is 503 with `Retry-After`.
pub fn over_capacity_router() -> Router {
    Router::new()
        .route("/v1/generations/{id}/events", get(events::over_capacity))
        .route("/livez", get(ops::livez))
        .fallback(error::over_capacity)
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidOrigin {
    #[error("invalid CORS origin {0:?}")]
    Unparsable(String),
    #[error("CORS origin \"*\" allows every origin: give it alone, not with other origins")]
    WildcardAmongOthers,
}

/// CORS for the configured browser origins; none configured, no CORS headers at all. `*` alone
/// allows any origin (tower-http panics on a `*` inside an origin list, so it is told apart
/// here).
pub fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, InvalidOrigin> {
    let allow_origin = match origins {
        [] => return Ok(None),
        [only] if only == "*" => AllowOrigin::any(),
        _ if origins.iter().any(|origin| origin == "*") => {
            return Err(InvalidOrigin::WildcardAmongOthers)
        }
        _ => AllowOrigin::list(
            origins
                .iter()
                .map(|origin| {
                    HeaderValue::from_str(origin)
                        .map_err(|_| InvalidOrigin::Unparsable(origin.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("idempotency-key"),
                request_id::REQUEST_ID_HEADER,
            ])
            .expose_headers([
                header::LOCATION,
                request_id::REQUEST_ID_HEADER,
                HeaderName::from_static("idempotent-replayed"),
                HeaderName::from_static(chat::GENERATION_ID_HEADER),
                HeaderName::from_static(chat::SUBSCRIBE_TOKEN_HEADER),
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    ))
}
