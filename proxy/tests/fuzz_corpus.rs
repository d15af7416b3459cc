//! Replays every checked-in fuzz corpus file (`fuzz/corpus/TARGET/*`) through the function its
//! cargo-fuzz target calls, so inputs that once crashed (and the coverage seeds) run in every
//! `cargo test`. A new target needs a row here; the test fails when `fuzz/Cargo.toml` names a target
//! without a row or without a corpus.

#[test]
fn every_fuzz_corpus_file_replays_without_a_panic() {
    testbed::replay_fuzz_corpus(
        env!("CARGO_MANIFEST_DIR"),
        &[
            ("convert_message", mptcp_proxy::fuzz::convert_message),
            ("request_head", mptcp_proxy::fuzz::request_head),
            ("config", mptcp_proxy::fuzz::config),
            ("convert_message", mptcp_proxy::fuzz::convert_message),
        ],
    );
}
