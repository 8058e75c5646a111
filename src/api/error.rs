//! The one place where failures become HTTP answers.
//!
//! Every error is `{"error":{"code":"…","message":"…"}}` with a fitting status. Codes are stable
//! (clients branch on them); messages are for humans and never contain secrets.

use axum::{
    extract::rejection::QueryRejection,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::hub::HubError;

/// Seconds a client is asked to wait before retrying a request refused during a drain.
const DRAINING_RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("request body could not be read: {0}")]
    BodyRead(String),
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    #[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("Last-Event-ID must be a token id this generation has sent (a whole number)")]
    InvalidLastEventId,
    #[error("invalid query string: {0}")]
    InvalidQuery(String),
    #[error("no such generation (it may have expired)")]
    GenerationNotFound,
    #[error("no such endpoint")]
    RouteNotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("the gateway is shutting down; retry on another instance")]
    Draining,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidRequest(_)
            | Self::BodyRead(_)
            | Self::InvalidIdempotencyKey
            | Self::InvalidLastEventId
            | Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Hub(HubError::IdempotencyKeyReused) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::GenerationNotFound | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::BodyRead(_) => "body_read_error",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidIdempotencyKey => "invalid_idempotency_key",
            Self::Hub(HubError::IdempotencyKeyReused) => "idempotency_key_reused",
            Self::InvalidLastEventId => "invalid_last_event_id",
            Self::InvalidQuery(_) => "invalid_query",
            Self::GenerationNotFound => "generation_not_found",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Draining => "draining",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, Self::Draining) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(DRAINING_RETRY_AFTER_SECS),
            );
        }
        response
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::InvalidQuery(rejection.body_text())
    }
}

pub async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
