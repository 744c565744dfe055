#!/usr/bin/env bash
# The test command: formatting, lints, and every test (unit, property, black-box on loopback).
# Needs only the Rust toolchain; installs nothing else today.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
# Black-box tests start several tether processes each; two at a time keeps a 2-core machine
# responsive enough for their timeouts to stay generous.
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
