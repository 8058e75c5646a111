//! The one place where failures become HTTP answers.
//!
//! Every error is `{"error":{"code":"…","message":"…"}}` with a fitting status. Codes are stable
//! (clients branch on them); messages are for humans and never contain secrets.

use axum::{
    extract::rejection::{PathRejection, QueryRejection},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use std::time::Duration;

use crate::{access::Denied, hub::HubError, metrics, upstream::UpstreamError};

/// Seconds a client is asked to wait before retrying a request refused for lack of capacity.
const BUSY_RETRY_AFTER_SECS: u64 = 5;

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
    #[error("the gateway is at its connection limit; retry later")]
    OverCapacity,
    #[error("{0}")]
    Denied(Denied),
    #[error("too many generations created with this key; retry after {} s", .0.as_secs().max(1))]
    RateLimited(Duration),
    #[error("this generation has as many subscribers as allowed")]
    TooManySubscribers,
    #[error("malformed HTTP request: {0}")]
    MalformedRequest(&'static str),
    #[error("request head is larger than {0} bytes or has too many headers")]
    HeadTooLarge(usize),
    /// A call to the provider outside a generation (the model list) failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidRequest(_)
            | Self::BodyRead(_)
            | Self::InvalidIdempotencyKey
            | Self::InvalidLastEventId
            | Self::InvalidQuery(_)
            | Self::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            Self::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Hub(HubError::IdempotencyKeyReused) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Hub(
                HubError::TooManyGenerations | HubError::MemoryBudgetExceeded | HubError::Store(_),
            )
            | Self::Draining
            | Self::OverCapacity => StatusCode::SERVICE_UNAVAILABLE,
            Self::Denied(Denied::WrongGeneration) => StatusCode::FORBIDDEN,
            Self::Denied(_) => StatusCode::UNAUTHORIZED,
            Self::RateLimited(_) | Self::TooManySubscribers => StatusCode::TOO_MANY_REQUESTS,
            // As OpenAI answers a model that does not exist, so that SDKs raise the same error.
            Self::GenerationNotFound
            | Self::RouteNotFound
            | Self::Hub(HubError::UnknownModel(_)) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Upstream(UpstreamError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
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
            Self::Hub(HubError::UnknownModel(_)) => "model_not_found",
            Self::Hub(HubError::TooManyGenerations) => "too_many_generations",
            Self::Hub(HubError::MemoryBudgetExceeded) => "memory_budget_exceeded",
            Self::Hub(HubError::Store(_)) => "store_unavailable",
            Self::InvalidLastEventId => "invalid_last_event_id",
            Self::InvalidQuery(_) => "invalid_query",
            Self::GenerationNotFound => "generation_not_found",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Draining => "draining",
            Self::OverCapacity => "over_capacity",
            Self::Denied(Denied::Missing) => "missing_credentials",
            Self::Denied(Denied::Invalid) => "invalid_credentials",
            Self::Denied(Denied::Expired) => "token_expired",
            Self::Denied(Denied::WrongGeneration) => "token_scope",
            Self::RateLimited(_) => "rate_limited",
            Self::TooManySubscribers => "too_many_subscribers",
            Self::MalformedRequest(_) => "malformed_request",
            Self::HeadTooLarge(_) => "head_too_large",
            Self::Upstream(error) => error.code(),
        }
    }

    /// Seconds after which a retry may succeed, for errors that are about load, not content.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited(wait) => Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            Self::Draining
            | Self::OverCapacity
            | Self::Hub(
                HubError::TooManyGenerations | HubError::MemoryBudgetExceeded | HubError::Store(_),
            ) => Some(BUSY_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// Counts refusals that operators watch: limits and credentials.
    fn record(&self) {
        match self {
            Self::Denied(_) => {
                ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => self.code()).increment(1)
            }
            Self::RateLimited(_)
            | Self::TooManySubscribers
            | Self::OverCapacity
            | Self::BodyTooLarge(_)
            | Self::Hub(HubError::TooManyGenerations | HubError::MemoryBudgetExceeded) => {
                ::metrics::counter!(metrics::LIMITED, "limit" => self.code()).increment(1)
            }
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        self.record();
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Self::Denied(denied) if denied != Denied::WrongGeneration) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The only path parameter is a generation id; one that cannot even be decoded (invalid
/// UTF-8) names no generation.
impl From<PathRejection> for ApiError {
    fn from(_: PathRejection) -> Self {
        Self::GenerationNotFound
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

pub async fn over_capacity() -> ApiError {
    ApiError::OverCapacity
}
