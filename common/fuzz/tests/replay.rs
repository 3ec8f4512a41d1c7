//! Replays every saved fuzz input through its target, so that `cargo test` keeps what the
//! fuzzers found: the corpus (`fuzz/corpus/<target>/`, the seeds and what coverage-guided runs
//! kept) and the inputs that once crashed a target (`fuzz/regressions/<target>/`, each fixed
//! in the crate that had the bug).
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files directly in `dir`, sorted (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `data` through `target`; the panic's message, if it panicked.
fn run(target: fn(&[u8]), data: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| target(data)))
        .err()
        .map(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
}

#[test]
fn saved_inputs_replay_clean() {
    let mut failures = Vec::new();
    for (name, target) in shoal_fuzz::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name} is empty: run `scripts/fuzz.sh seeds`"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Some(msg) = run(*target, &data) {
                failures.push(format!("{}: {msg}", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "inputs that fail:\n{}",
        failures.join("\n")
    );
}

/// The seeds pass their targets; `SHOAL_FUZZ_WRITE_SEEDS=1` (re)writes them into the corpus.
#[test]
fn seeds_pass() {
    let write = std::env::var_os("SHOAL_FUZZ_WRITE_SEEDS").is_some();
    for (name, target) in shoal_fuzz::TARGETS {
        let seeds = shoal_fuzz::seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for (i, seed) in seeds.iter().enumerate() {
            if let Some(msg) = run(*target, seed) {
                panic!("seed {i} of {name} fails: {msg}");
            }
            if write {
                let dir = fuzz_dir().join("corpus").join(name);
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
                std::fs::write(dir.join(format!("seed-{i}")), seed)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

/// Every target has a cargo-fuzz binary that calls it, and nothing else is there.
#[test]
fn every_target_has_a_fuzz_binary() {
    let mut bins: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    bins.sort();
    let mut names: Vec<String> = shoal_fuzz::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    names.sort();
    assert_eq!(bins, names);
    for n in &names {
        let src = std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{n}.rs")))
            .unwrap_or_else(|e| panic!("{n}: {e}"));
        assert!(
            src.contains(&format!("shoal_fuzz::{n}(")),
            "fuzz/fuzz_targets/{n}.rs does not call shoal_fuzz::{n}"
        );
    }
}
