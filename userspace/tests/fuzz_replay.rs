//! Replays the fuzz corpora without nightly or cargo-fuzz: every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through
//! `sbx_net::fuzzing::<target>`, the same body the cargo-fuzz target runs,
//! so a crash once found and fixed stays fixed. Every target must have a
//! seed and a cargo-fuzz target file. The privileged `frames` target is
//! replayed by tests/tests/frame_model.rs (it loads the eBPF program).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use sbx_net::fuzzing::{PRIVILEGED_TARGETS, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `fuzz/<kind>/<target>/` (none when the directory is absent).
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else { return Vec::new() };
    let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_target_has_seeds_and_a_cargo_fuzz_target() {
    for (target, _) in TARGETS {
        assert!(!files("corpus", target).is_empty(), "fuzz/corpus/{target}/ has no seed");
        let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        let text = std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(text.contains(&format!("sbx_net::fuzzing::{target}(data)")), "{} does not call sbx_net::fuzzing::{target}", source.display());
    }
    // And no cargo-fuzz target the replay does not know.
    for entry in std::fs::read_dir(fuzz_dir().join("fuzz_targets")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(TARGETS.iter().any(|(t, _)| *t == name), "fuzz/fuzz_targets/{name}.rs is not in sbx_net::fuzzing::TARGETS");
    }
}

#[test]
fn every_corpus_file_replays() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, body) in TARGETS {
        if PRIVILEGED_TARGETS.contains(target) {
            continue;
        }
        for file in files("corpus", target).into_iter().chain(files("regressions", target)) {
            let data = std::fs::read(&file).unwrap();
            replayed += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
                let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                failures.push(format!("{}: {message}", file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {replayed} corpus files fail:\n{}", failures.len(), failures.join("\n"));
    eprintln!("replayed {replayed} corpus files");
}
