//! Replays every checked-in fuzz corpus file (`fuzz/corpus/TARGET/*`) through the function its
//! cargo-fuzz target calls, so inputs that once crashed (and the coverage seeds) run in every
//! `cargo test`. A new target needs a row in `TARGETS`; the test fails when `fuzz/Cargo.toml` names a
//! target without a row or without a corpus.

use std::path::Path;

/// The body of one fuzz target.
type FuzzFn = fn(&[u8]);

const TARGETS: &[(&str, FuzzFn)] = &[("convert_message", mptcp_proxy::fuzz::convert_message)];

#[test]
fn every_fuzz_corpus_file_replays_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|name| !name.ends_with("-fuzz"))
        .collect();
    for name in &declared {
        assert!(
            TARGETS.iter().any(|(t, _)| t == name),
            "fuzz target {name} has no replay row in this test"
        );
    }
    for (name, target) in TARGETS {
        let dir = fuzz.join("corpus").join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("read corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", file.display());
        }
    }
}
