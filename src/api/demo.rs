//! The demo page at `/`: a prompt box that creates a generation, several viewers of it side by
//! side (each the browser's own `EventSource`), and the gateway's figures from `/metrics`.
//!
//! The assets are plain HTML, CSS and JavaScript under `assets/demo/`, compiled into the binary:
//! no build step, no framework, nothing fetched from elsewhere (the CSP says so too).

use axum::{
    extract::Path,
    http::{header, HeaderName},
    response::{IntoResponse, Response},
};

use super::error::ApiError;

const INDEX_HTML: &str = include_str!("../../assets/demo/index.html");
const DEMO_JS: &str = include_str!("../../assets/demo/demo.js");
const DEMO_CSS: &str = include_str!("../../assets/demo/demo.css");

/// Same-origin only: the page talks to this gateway and to nothing else.
const CSP: &str = "default-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// `GET /`
pub async fn page() -> Response {
    asset_response("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /demo/{asset}`
pub async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    match name.as_str() {
        "demo.js" => Ok(asset_response("text/javascript; charset=utf-8", DEMO_JS)),
        "demo.css" => Ok(asset_response("text/css; charset=utf-8", DEMO_CSS)),
        _ => Err(ApiError::RouteNotFound),
    }
}

fn asset_response(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, &'static str); 4] = [
        (header::CONTENT_TYPE, content_type),
        // The assets change with the binary; revalidating costs little.
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, body).into_response()
}
