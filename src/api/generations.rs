//! The backend API: create, read and cancel generations.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{rejection::PathRejection, Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{error::ApiError, App};
use crate::{
    access::KeyId,
    hub::{registry::is_generation_id, Created, Generation, IdempotencyKey, Snapshot, Status},
};

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

#[derive(Serialize)]
struct CreatedBody<'a> {
    id: &'a str,
    status: Status,
    events_url: String,
    /// Lets a viewer (who holds no API key) subscribe to this generation only.
    subscribe_token: String,
}

/// `POST /v1/generations`: starts the upstream call and answers 201 at once, before any token.
pub async fn create(
    State(app): State<Arc<App>>,
    key: Option<Extension<KeyId>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let created = start(&app, key, &headers, body, |_| Ok(())).await?.0;
    let generation = &created.generation;
    let events_url = format!("/v1/generations/{}/events", generation.id());
    let location = format!("/v1/generations/{}", generation.id());
    let mut response = (
        StatusCode::CREATED,
        Json(CreatedBody {
            id: generation.id(),
            status: generation.status(),
            events_url,
            subscribe_token: app.access.subscribe_token(generation.id()),
        }),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    if !created.is_new {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Everything that starting a generation takes, for both creation endpoints: not draining, a
/// valid chat request (which `inspect` may check further), the key's rate budget, then the hub.
pub(crate) async fn start<T>(
    app: &App,
    key: Option<Extension<KeyId>>,
    headers: &HeaderMap,
    body: Body,
    inspect: impl FnOnce(&Map<String, Value>) -> Result<T, ApiError>,
) -> Result<(Created, T), ApiError> {
    if app.drain.is_draining() {
        return Err(ApiError::Draining);
    }
    let key = key.map(|Extension(key)| key);
    let idempotency_key = idempotency_key(headers)?.map(|idempotency| IdempotencyKey {
        scope: app.access.key_scope(key),
        key: idempotency,
    });
    let request = chat_request(headers, body, app.max_request_body).await?;
    let inspected = inspect(&request)?;
    app.access
        .take_creation(key)
        .map_err(ApiError::RateLimited)?;
    let key_label = app.access.key_label(key);
    Ok((
        app.hub.create(request, idempotency_key, key_label).await?,
        inspected,
    ))
}

/// `GET /v1/generations/{id}`
pub async fn snapshot(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Snapshot>, ApiError> {
    let Path(id) = id?;
    Ok(Json(find(&app, &id).await?.snapshot()))
}

/// `DELETE /v1/generations/{id}`: cancels the upstream call; subscribers get the terminal
/// event. Cancelling a generation that already ended changes nothing.
pub async fn cancel(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Snapshot>, ApiError> {
    let Path(id) = id?;
    let generation = find(&app, &id).await?;
    app.hub.cancel(&generation).await?;
    Ok(Json(generation.snapshot()))
}

/// Looks a generation up, here or (with a store) on any instance; an id of the wrong shape is
/// simply not found.
pub async fn find(app: &App, id: &str) -> Result<Arc<Generation>, ApiError> {
    if !is_generation_id(id) {
        return Err(ApiError::GenerationNotFound);
    }
    app.hub.find(id).await?.ok_or(ApiError::GenerationNotFound)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::InvalidIdempotencyKey)?;
    let visible = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !visible {
        return Err(ApiError::InvalidIdempotencyKey);
    }
    Ok(Some(key.to_owned()))
}

/// Reads and checks an OpenAI chat-completions request. Everything but the few fields tokenfan
/// relies on is passed to the provider untouched.
async fn chat_request(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let is_json = content_type
            .to_str()
            .ok()
            .and_then(|ct| ct.split(';').next())
            .map(|mime| mime.trim().to_ascii_lowercase())
            .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|error| {
        if std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
        {
            ApiError::BodyTooLarge(limit)
        } else {
            ApiError::BodyRead(error.to_string())
        }
    })?;
    let Value::Object(request) =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))?
    else {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    };
    validate(&request)?;
    Ok(request)
}

fn validate(request: &Map<String, Value>) -> Result<(), ApiError> {
    let invalid = |message: &str| Err(ApiError::InvalidRequest(message.into()));
    match request.get("model") {
        Some(Value::String(model)) if !model.is_empty() => {}
        _ => return invalid("`model` is required and must be a non-empty string"),
    }
    match request.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => {}
        _ => return invalid("`messages` is required and must be a non-empty array"),
    }
    match request.get("stream") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => return invalid("`stream` must be a boolean"),
    }
    match request.get("stream_options") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return invalid("`stream_options` must be an object"),
    }
    match request.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return invalid("`n` must be 1: a generation streams one choice"),
    }
    Ok(())
}
