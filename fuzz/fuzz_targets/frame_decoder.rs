//! The frame decoder over arbitrary bytes in arbitrary pieces: see `ferry::fuzz_checks::frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry::fuzz_checks::frame_decoder(data));
