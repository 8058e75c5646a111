//! Provider text made safe to show: credentials removed before it reaches viewers, snapshots
//! and logs, and control characters escaped before it reaches a log line.
//!
//! A provider that rejects a key often quotes it ("Incorrect API key provided: sk-…"), and a
//! gateway copies provider messages into the error every viewer of the generation sees.

use std::fmt;

/// What replaces a credential.
const REDACTED: &str = "[redacted]";
/// Shortest run after `sk-` taken for a key: shorter ones are words like `sk-learn`.
const MIN_KEY_TAIL: usize = 8;

/// `text` without the `secrets` (the configured key, …) and without anything shaped like a
/// credential: `sk-…` keys (OpenAI, Anthropic's `sk-ant-…`) and `Bearer …` tokens.
pub(crate) fn redact(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|secret| secret.len() >= 4) {
        if text.contains(secret) {
            text = text.replace(secret, REDACTED);
        }
    }
    redact_shapes(&text)
}

fn is_key_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// RFC 6750's token68 characters.
fn is_token_byte(byte: u8) -> bool {
    is_key_byte(byte) || matches!(byte, b'.' | b'~' | b'+' | b'/' | b'=')
}

fn run_len(bytes: &[u8], accept: fn(u8) -> bool) -> usize {
    bytes.iter().take_while(|&&b| accept(b)).count()
}

fn redact_shapes(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // Everything before `copied` is in `out`; cuts fall on ASCII bytes, so on char boundaries.
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let word_start = at == 0 || !is_token_byte(bytes[at - 1]);
        let rest = &bytes[at..];
        if word_start && rest.starts_with(b"sk-") {
            let len = run_len(rest, is_key_byte);
            if len >= 3 + MIN_KEY_TAIL {
                out.push_str(&text[copied..at]);
                out.push_str(REDACTED);
                at += len;
                copied = at;
                continue;
            }
        }
        if word_start && rest.len() > 7 && rest[..7].eq_ignore_ascii_case(b"bearer ") {
            let spaces = run_len(&rest[7..], |b| b == b' ');
            let len = run_len(&rest[7 + spaces..], is_token_byte);
            if len > 0 {
                out.push_str(&text[copied..at + 7 + spaces]);
                out.push_str(REDACTED);
                at += 7 + spaces + len;
                copied = at;
                continue;
            }
        }
        at += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// Displays text with control characters (newlines above all) escaped, so that text from a
/// provider cannot forge log lines: `tracing::warn!(message = %LogSafe(&text), …)`.
pub struct LogSafe<'a>(pub &'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_key_and_credential_shapes_are_removed() {
        let message = "Incorrect API key provided: my-own-key-123. Header was \
                       'Authorization: Bearer abc.DEF-ghi_jk=' and sk-proj-AbCdEf0123456789, \
                       sk-ant-api03-xyzxyzxyz; bearer   tok/en+1 (end)";
        assert_eq!(
            redact(message, &["my-own-key-123"]),
            "Incorrect API key provided: [redacted]. Header was \
             'Authorization: Bearer [redacted]' and [redacted], \
             [redacted]; bearer   [redacted] (end)"
        );
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for text in [
            "rate limited, retry in 2s",
            "the model sk-learn is unknown",
            "task-sk-0123456789 is fine",
            "Bearer",
            "unbearer x",
            "Ünïcödé — sk-",
        ] {
            assert_eq!(redact(text, &[]), text);
        }
        // Too short to be anyone's key: not searched for, or every "a" would go.
        assert_eq!(redact("a b c", &["a"]), "a b c");
    }

    #[test]
    fn log_safe_text_cannot_start_a_line() {
        let forged = "boom\nlevel=INFO msg=\"all good\"\r\t\u{1b}[31m";
        assert_eq!(
            LogSafe(forged).to_string(),
            "boom\\nlevel=INFO msg=\"all good\"\\r\\t\\u{1b}[31m"
        );
    }
}
