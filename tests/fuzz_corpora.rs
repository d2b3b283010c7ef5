//! Replays the fuzz targets' corpora (`fuzz/corpus/<target>/`, inputs the fuzzers kept
//! for the code paths they reach) through the same checks the targets run, so that every
//! `cargo test` exercises them on stable Rust without a fuzzer.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 20, "{target}: only {} inputs", inputs.len());
    for input in inputs {
        let bytes = std::fs::read(&input).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{target} fails on {}", input.display());
    }
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", ferry::fuzz_checks::frame_decoder);
}

#[test]
fn client_frame_corpus() {
    replay("client_frame", ferry::fuzz_checks::client_frame);
}

#[test]
fn server_frame_corpus() {
    replay("server_frame", ferry::fuzz_checks::server_frame);
}

#[test]
fn storage_record_corpus() {
    replay("storage_record", ferry::fuzz_checks::storage_record);
}
