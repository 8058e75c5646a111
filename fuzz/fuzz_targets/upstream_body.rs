//! The upstream HTTP/1.1 client's parsers on arbitrary bytes: the response head and the
//! chunked body, the body split into arbitrary pieces.
//!
//! Input layout: byte 0 picks the chunking (a seed and a largest piece size), the rest is the
//! input. Checked on every input:
//! - nothing panics;
//! - a complete head's length is within the input;
//! - the body decoded in pieces yields exactly the data of the whole-input decode and ends the
//!   same way (end, error, or waiting for more): framing never depends on where the network
//!   split the body;
//! - the data is never longer than the input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokenfan::upstream::http1::{parse_head_len, Decoded, Framing};
use tokenfan_fuzz::Rng;

#[derive(Debug, PartialEq)]
enum End {
    Body,
    Error,
    NeedMore,
}

/// Feeds `pieces` one after another; the data and how decoding stopped.
fn decode<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Vec<u8>, End) {
    let mut framing = Framing::CHUNKED;
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match framing.decode(&mut buf) {
                Ok(Decoded::Data(bytes)) => data.extend_from_slice(&bytes),
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::End) => return (data, End::Body),
                Err(_) => return (data, End::Error),
            }
        }
    }
    (data, End::NeedMore)
}

fuzz_target!(|input: &[u8]| {
    let [chunking, body @ ..] = input else {
        return;
    };
    if let Ok(Some(length)) = parse_head_len(body) {
        assert!(length <= body.len(), "a head longer than its input");
    }

    let (whole, whole_end) = decode(std::iter::once(body));
    assert!(whole.len() <= body.len(), "more data than input");

    let max_piece = [1, 2, 7, 64, 4096][usize::from(chunking % 5)];
    let mut rng = Rng(u64::from(*chunking));
    let mut rest = body;
    let pieces = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        let (piece, tail) = rest.split_at((1 + rng.below(max_piece)).min(rest.len()));
        rest = tail;
        Some(piece)
    });
    let (split, split_end) = decode(pieces);
    assert_eq!(split, whole, "data depends on how the body was split");
    assert_eq!(
        split_end, whole_end,
        "the end depends on how the body was split"
    );
});
