//! `--max-header-bytes` enforced on the parsed request, on both connection paths.
//!
//! hyper's `max_buf_size` bounds its read buffer, not the head: it reads ahead in growing
//! steps and accepts any head that is complete in what it read, so a 10,000-byte limit let a
//! 15 KB head through. This check measures the head in its canonical form (`Name: value\r\n`
//! per field), which a sender can shrink only by the optional spaces.

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};

use super::error::ApiError;

pub async fn limit(
    State(max): State<usize>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if head_size(&request) > max {
        return Err(ApiError::HeadTooLarge(max));
    }
    Ok(next.run(request).await)
}

/// Bytes of `METHOD target HTTP/1.1\r\n`, the fields and the blank line.
fn head_size(request: &Request) -> usize {
    let target = request
        .uri()
        .path_and_query()
        .map_or(1, |target| target.as_str().len());
    let line = request.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + fields + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_counts_the_canonical_head() {
        let request = Request::get("/livez?x=1")
            .header("host", "t")
            .body(axum::body::Body::empty())
            .unwrap();
        let head = "GET /livez?x=1 HTTP/1.1\r\nhost: t\r\n\r\n";
        assert_eq!(head_size(&request), head.len());
    }
}
