//! Operator endpoints: liveness, readiness (false while draining) and Prometheus metrics.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    Json,
};
use serde_json::json;

use super::App;

/// The process is up and serving HTTP; stays 200 during a drain so it is not killed early.
pub async fn livez() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Whether new work should be sent here: 503 from the first moment of a drain.
pub async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    if app.drain.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else if app
        .store_health
        .as_ref()
        .is_some_and(|health| !health.ready())
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "store_unreachable"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}

pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    crate::metrics::record_process(app.hub.log_bytes(), app.hub.settings().log_memory_budget);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.prometheus.render(),
    )
}
