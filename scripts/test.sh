#!/usr/bin/env bash
# Runs every check shoal has: format, lints, docs, all tests, and a short benchmark smoke run.
# Installs what the tests need (redis-server for the benchmark baselines, moto for the S3
# tests) when it is missing.
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# redis-server and nats-server: benchmark baselines; etcd: the metadata backend's tests and the
# etcd cluster test; protoc: building etcd-client.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "warning: cannot install ${need[*]} (not root, no sudo); tests that need them will fail" >&2
  fi
fi

# moto: a real S3 server on loopback for the agent's s3:// package tests. Plain pip first; a
# Python that is marked externally managed (PEP 668) needs --break-system-packages.
if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  step "installing moto[server]"
  python3 -m pip install --quiet 'moto[server]' ||
    python3 -m pip install --quiet --break-system-packages 'moto[server]' ||
    echo "warning: cannot install moto[server]; the agent's S3 tests will fail" >&2
fi

# rust-toolchain.toml pins the stable version CI uses. A machine whose one toolchain is that
# version installed as `stable` (and no network to fetch another) gets it linked under the
# pinned name, which is all rustup needs.
pinned=$(sed -n 's/^channel = "\(.*\)"$/\1/p' rust-toolchain.toml)
if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q "^$pinned-"; then
  host=$(rustup run stable rustc -vV | sed -n 's/^host: //p')
  if [ "$(rustup run stable rustc --version | cut -d' ' -f2)" = "$pinned" ]; then
    step "linking toolchain stable as $pinned"
    ln -s "$(rustup run stable rustc --print sysroot)" \
      "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$pinned-$host"
  fi
fi

export CARGO_INCREMENTAL=0
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step "cargo fmt --check"
cargo fmt --all -- --check

# Every feature on: the etcd backend is part of what is tested.
step "cargo clippy (deny warnings)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked --quiet

step "cargo test"
cargo test --workspace --all-features --locked

# `cargo test` above also replayed every saved fuzz input (fuzz/corpus, fuzz/regressions)
# through the targets of common/fuzz. The cargo-fuzz project that runs them under libFuzzer
# needs nightly and runs apart (scripts/fuzz.sh); only its manifest is checked here.
step "fuzz project manifest"
cargo metadata --manifest-path fuzz/Cargo.toml --no-deps --format-version 1 >/dev/null

# Builds the criterion micro-benchmarks (perf/benches) without timing them, so a bench that no
# longer compiles fails here. Costs a release build of the perf crate's dependencies.
step "cargo bench --no-run"
cargo bench -p shoal-perf --bench cores --all-features --locked --no-run

# Smoke runs with the binary the tests just built: they prove the suites work, not how fast
# (benchmarks are not tests; `shoal bench` with a release build measures).
step "shoal bench local|cluster|calls --quick (smoke runs)"
./target/debug/shoal bench local --quick
./target/debug/shoal bench cluster --quick
./target/debug/shoal bench calls --quick
