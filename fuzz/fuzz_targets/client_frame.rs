//! The broker's parser of client frames on arbitrary bodies: see `ferry::fuzz_checks::client_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry::fuzz_checks::client_frame(data));
