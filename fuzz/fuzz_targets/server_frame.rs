//! The client library's parser of broker frames: see `ferry::fuzz_checks::server_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry::fuzz_checks::server_frame(data));
