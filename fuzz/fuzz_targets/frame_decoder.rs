//! Arbitrary bytes into the frame decoder: it must never panic, never allocate past its caps, and everything it
//! accepts must re-encode to a frame that decodes to the same message.
//!
//! Run (nightly): `cargo +nightly fuzz run frame_decoder` from the repository root (see docs/PROTOCOL.md).

#![no_main]

use fastsync::net::wire::{self, Msg};
use libfuzzer_sys::fuzz_target;

fn round_trip(m: &Msg) {
    let body = m.encode_body();
    assert!(body.len() <= wire::FRAME_BYTES_MAX, "an accepted message re-encodes over the frame cap");
    let again = Msg::decode_body(&body).expect("a decoded message re-encodes to a decodable frame");
    match (m, &again) {
        // Error texts are decoded lossily (invalid UTF-8 becomes U+FFFD, which can make them longer than the cap)
        // and cut at the cap, on a character boundary, when encoded: the same code and a prefix of the text.
        (Msg::Error { code: a, message: ma }, Msg::Error { code: b, message: mb }) => {
            assert_eq!(a, b);
            assert!(mb.len() <= wire::TEXT_BYTES_MAX && ma.starts_with(mb.as_str()), "{ma:?} re-encoded as {mb:?}");
        }
        (Msg::EntryError { path: pa, code: a, message: ma }, Msg::EntryError { path: pb, code: b, message: mb }) => {
            assert_eq!((pa, a), (pb, b));
            assert!(mb.len() <= wire::TEXT_BYTES_MAX && ma.starts_with(mb.as_str()), "{ma:?} re-encoded as {mb:?}");
        }
        _ => assert_eq!(m, &again),
    }
    // And once more through a whole frame.
    let mut frame = Vec::new();
    wire::write_msg(&mut frame, &again).expect("writing to a Vec");
    assert_eq!(wire::read_msg(&mut frame.as_slice()).expect("its own frame"), again);
}

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(m) = wire::read_msg(&mut r) {
        round_trip(&m);
    }
    if let Ok(m) = Msg::decode_body(data) {
        round_trip(&m);
    }
});
