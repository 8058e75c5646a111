//! `parse_event_id` (the `Last-Event-ID` header and `?last_event_id=`) against a reference
//! written from its contract: 1 to 20 ASCII digits whose value fits a u64. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenfan::api::events::parse_event_id;

/// Digit by digit with checked arithmetic: shares no code with `str::parse`.
fn reference(id: &str) -> Option<u64> {
    if id.is_empty() || id.len() > 20 {
        return None;
    }
    id.bytes().try_fold(0u64, |value, byte| {
        let digit = byte.checked_sub(b'0').filter(|digit| *digit <= 9)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fuzz_target!(|input: &[u8]| {
    // Header values reach the parser as text; anything else is also tried as lossy text.
    let id = String::from_utf8_lossy(input);
    assert_eq!(parse_event_id(&id), reference(&id), "for {id:?}");
});
