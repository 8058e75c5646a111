//! The live feed's message format, shared by every store: `E<first>\n` then each entry as
//! `<length>:<bytes>`, or `T` for the end. Binary-safe, and decoded without trusting it: a
//! message that does not parse is treated as a missed one (the replica reads the log).

use bytes::{BufMut, Bytes, BytesMut};

use super::LiveEvent;

const ENDED: &[u8] = b"T";

/// Encodes appended entries once per append, whatever the number of replicas.
pub fn entries(first: u64, entries: &[Bytes]) -> Bytes {
    let len = 24 + entries.iter().map(|e| e.len() + 12).sum::<usize>();
    let mut buf = BytesMut::with_capacity(len);
    buf.put_u8(b'E');
    buf.put_slice(first.to_string().as_bytes());
    buf.put_u8(b'\n');
    for entry in entries {
        buf.put_slice(entry.len().to_string().as_bytes());
        buf.put_u8(b':');
        buf.put_slice(entry);
    }
    buf.freeze()
}

pub fn ended() -> Bytes {
    Bytes::from_static(ENDED)
}

/// Decodes a message; `None` for anything malformed.
pub fn decode(message: &Bytes) -> Option<LiveEvent> {
    if message.as_ref() == ENDED {
        return Some(LiveEvent::Ended);
    }
    let rest = message.strip_prefix(b"E")?;
    let newline = rest.iter().position(|&b| b == b'\n')?;
    let first = parse_number(&rest[..newline])?;
    let mut at = message.len() - rest.len() + newline + 1;
    let mut entries = Vec::new();
    while at < message.len() {
        let colon = message[at..].iter().position(|&b| b == b':')?;
        let len = usize::try_from(parse_number(&message[at..at + colon])?).ok()?;
        let start = at + colon + 1;
        let end = start.checked_add(len).filter(|&end| end <= message.len())?;
        entries.push(message.slice(start..end));
        at = end;
    }
    Some(LiveEvent::Entries { first, entries })
}

fn parse_number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_including_separators_and_empty_entries() {
        let sent = vec![
            Bytes::from_static(b"hello"),
            Bytes::from_static(b""),
            Bytes::from_static(b"3:a\nb"),
        ];
        let Some(LiveEvent::Entries { first, entries }) = decode(&super::entries(41, &sent)) else {
            panic!("not decoded");
        };
        assert_eq!(first, 41);
        assert_eq!(entries, sent);
        assert!(matches!(decode(&ended()), Some(LiveEvent::Ended)));
    }

    #[test]
    fn malformed_messages_are_refused_not_trusted() {
        for bad in [
            &b""[..],
            b"E",
            b"Ex\n",
            b"E1\n5:abc",
            b"E1\n99999999999999999999999:a",
            b"E1\nabc",
            b"X1\n",
        ] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_none(), "{bad:?}");
        }
    }
}
