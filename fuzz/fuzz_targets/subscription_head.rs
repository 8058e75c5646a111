//! The request heads of subscriber connections, which tokenfan parses itself
//! (`server/subscriber.rs`) instead of hyper. Checked on every input:
//! - nothing panics, whether the bytes are a whole head or any prefix of one;
//! - a request line is told a subscription only when it is `GET /v1/generations/…/events`;
//! - a head that parses yields a request with no body announced (no `Transfer-Encoding`, no
//!   non-zero `Content-Length`): nothing can be smuggled behind it;
//! - a prefix of a head that parses is either incomplete or refused, never a different request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenfan::server::subscriber::{is_subscription_line, parse_request};

const MAX_HEAD: usize = 16 * 1024;

fuzz_target!(|head: &[u8]| {
    if let Some(true) = is_subscription_line(head, true) {
        let path_end = head[4..]
            .iter()
            .position(|&b| b == b' ' || b == b'?')
            .map(|end| end + 4)
            .unwrap_or(head.len());
        assert!(head.starts_with(b"GET /v1/generations/"));
        assert!(head[..path_end].ends_with(b"/events"));
    }
    let Ok(Some(request)) = parse_request(head, MAX_HEAD) else {
        return;
    };
    assert!(request.headers().get("transfer-encoding").is_none());
    if let Some(length) = request.headers().get("content-length") {
        assert_eq!(length.as_bytes().trim_ascii(), b"0");
    }
    for cut in [head.len() / 2, head.len().saturating_sub(1)] {
        if let Ok(Some(shorter)) = parse_request(&head[..cut], MAX_HEAD) {
            // A complete head can end early only where a blank line ends it.
            assert_eq!(shorter.uri(), request.uri());
        }
    }
});
