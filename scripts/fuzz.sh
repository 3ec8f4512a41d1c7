#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder of outside bytes (the targets of common/fuzz, run by
# the cargo-fuzz project in fuzz/ with libFuzzer).
#
# Usage: scripts/fuzz.sh [TARGET|all] [SECONDS]   build, then run each target SECONDS (600)
#        scripts/fuzz.sh list                      the targets
#        scripts/fuzz.sh merge [TARGET|all]        fold what the runs found into fuzz/corpus
#        scripts/fuzz.sh seeds                     (re)write the seeds into fuzz/corpus
#
# Each run starts from fuzz/corpus/<target> (committed: seeds and a minimised corpus) and
# fuzz/regressions/<target> (inputs that once failed), keeps what it finds in
# fuzz/target/corpus/<target> (not committed; `merge` adds what brings new coverage to
# fuzz/corpus), and writes a failing input to fuzz/artifacts/<target>/. A target's dictionary of
# tokens, if any, is fuzz/dicts/<target>.dict. One line per target sums the run up. `cargo test` replays fuzz/corpus and fuzz/regressions without libFuzzer.
#
# Needs cargo-fuzz (installed here when missing) and either a nightly toolchain through rustup
# or RUSTC_BOOTSTRAP on stable. Environment: FUZZ_SANITIZER (default none: the targets are safe
# Rust; `address` for ASan), SHOAL_BUILD_LOCK (a lock file every cargo build is run under, on
# machines that serialise builds). One fuzzer runs at a time, at nice 19, after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^shoal-fuzz-targets$')
what=${1:-all}
secs=${2:-600}
sanitizer=${FUZZ_SANITIZER:-none}

locked() {
  if [ -n "${SHOAL_BUILD_LOCK:-}" ]; then
    flock "$SHOAL_BUILD_LOCK" "$@"
  else
    "$@"
  fi
}

pick() {
  if [ "$1" = all ]; then
    echo "$targets"
  elif grep -qx "$1" <<<"$targets"; then
    echo "$1"
  else
    echo "unknown target '$1'; the targets are:" $targets >&2
    exit 2
  fi
}

cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    locked cargo install cargo-fuzz --locked >&2
  fi
  if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    (cd fuzz && locked cargo +nightly fuzz "$@")
  else
    (cd fuzz && RUSTC_BOOTSTRAP=1 locked cargo fuzz "$@")
  fi
}

bin_of() {
  echo "$root/fuzz/target/x86_64-unknown-linux-gnu/release/$1"
}

case "$what" in
list)
  echo "$targets"
  exit 0
  ;;
seeds)
  export CARGO_INCREMENTAL=0
  SHOAL_FUZZ_WRITE_SEEDS=1 locked cargo test --workspace --all-features --test replay -- seeds_pass
  exit 0
  ;;
merge)
  for t in $(pick "${2:-all}"); do
    [ -x "$(bin_of "$t")" ] || { echo "build $t first (scripts/fuzz.sh $t 0)" >&2; exit 1; }
    mkdir -p "fuzz/corpus/$t" "fuzz/target/corpus/$t"
    before=$(find "fuzz/corpus/$t" -type f | wc -l)
    nice -n 19 "$(bin_of "$t")" -merge=1 "fuzz/corpus/$t" "fuzz/target/corpus/$t" \
      >"fuzz/target/$t.merge.log" 2>&1
    after=$(find "fuzz/corpus/$t" -type f | wc -l)
    echo "$t: corpus $before -> $after files ($(du -sh "fuzz/corpus/$t" | cut -f1))"
  done
  exit 0
  ;;
esac

run_targets=$(pick "$what")
echo "==> building the fuzz targets (sanitizer: $sanitizer)"
# Release with debug assertions and overflow checks (cargo-fuzz's default).
mkdir -p fuzz/target
if ! CARGO_INCREMENTAL=0 cargo_fuzz build -s "$sanitizer" -a >fuzz/target/build.log 2>&1; then
  tail -30 fuzz/target/build.log >&2
  exit 1
fi

status=0
for t in $run_targets; do
  corpus="fuzz/target/corpus/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts" "fuzz/corpus/$t" "fuzz/regressions/$t"
  log="fuzz/target/$t.log"
  [ "$secs" -gt 0 ] || continue
  extra=()
  [ -f "fuzz/dicts/$t.dict" ] && extra+=(-dict="fuzz/dicts/$t.dict")
  # A checksummed file: comparison values guide the fuzzer to checksums that match.
  [ "$t" = meta_file ] && extra+=(-use_value_profile=1)
  # Short lists of entries: several entries in few bytes, the fastest to explore.
  max_len=65536
  [ "$t" = package_entries ] && max_len=64
  set +e
  nice -n 19 "$(bin_of "$t")" "$corpus" "fuzz/corpus/$t" "fuzz/regressions/$t" "${extra[@]}" \
    -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -max_len="$max_len" \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
  found=$(grep -o "Test unit written to .*" "$log" | sed 's/Test unit written to //' || true)
  if [ $rc -eq 0 ]; then
    echo "$t: clean, ${took:-$secs} s, ${rate:-?} exec/s, ${runs:-?} runs, ${cov:-cov ?}, corpus $(find "$corpus" -type f | wc -l)"
  else
    status=1
    echo "$t: FAILED after ${runs:-?} runs (exit $rc): ${found:-see $log}; log $log"
  fi
done
exit $status
