//! Storage records and recovery on arbitrary bytes: see `ferry::fuzz_checks::storage_record`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry::fuzz_checks::storage_record(data));
