//! Frame decoding on arbitrary bytes: `cargo +nightly fuzz run frame` (from comm/).
//! Decoding must never panic, and never accept a frame longer than the maximum.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshflow_comm::frame::{decode_frame, decode_header};
use meshflow_comm::Rank;

const MAX_FRAME_BYTES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok((decoded, payload)) = decode_frame(data, Rank(0), MAX_FRAME_BYTES) {
        assert!(decoded.payload_bytes as u64 <= MAX_FRAME_BYTES);
        assert_eq!(decoded.meta.bytes(), payload.len());
    }
    let _ = decode_header(data, Rank(0), MAX_FRAME_BYTES);
});
