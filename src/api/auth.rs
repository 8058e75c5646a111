//! Credentials on requests: API keys on the backend API, subscribe tokens (or API keys) on
//! event streams. The checks themselves live in [`crate::access`].

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap},
    middleware::Next,
    response::Response,
};

use super::{error::ApiError, App};
use crate::access::Denied;

/// Middleware of the backend API: with keys configured, a valid `Authorization: Bearer <key>`
/// is required, and the key's id is handed to the handler (rate limits are per key).
pub async fn require_api_key(
    State(app): State<Arc<App>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if app.access.keys_required() {
        let presented = bearer(request.headers()).ok_or(ApiError::Denied(Denied::Missing))?;
        let key = app
            .access
            .check_api_key(presented)
            .ok_or(ApiError::Denied(Denied::Invalid))?;
        // The access log names the key by its place in the configured list, never its value.
        tracing::Span::current().record("key", key.0);
        request.extensions_mut().insert(key);
    }
    Ok(next.run(request).await)
}

/// A subscriber needs a subscribe token for this generation (`?token=`, since a browser's
/// `EventSource` cannot set headers, or `Authorization: Bearer`), or an API key as a bearer
/// credential. Never an API key in the query: URLs end up in the access logs of every proxy on
/// the way, and a subscribe token there is scoped and expires, a key is neither. Checked
/// before the generation is looked up, so the answer never reveals whether it exists.
pub fn authorize_subscriber(
    app: &App,
    headers: &HeaderMap,
    query_token: Option<&str>,
    generation_id: &str,
) -> Result<(), ApiError> {
    if !app.access.keys_required() {
        return Ok(());
    }
    let credential = match (query_token, bearer(headers)) {
        (Some(token), _) => token,
        (None, Some(credential)) if app.access.check_api_key(credential).is_some() => return Ok(()),
        (None, Some(credential)) => credential,
        (None, None) => return Err(ApiError::Denied(Denied::Missing)),
    };
    app.access
        .check_subscribe_token(credential, generation_id)
        .map_err(ApiError::Denied)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
}
