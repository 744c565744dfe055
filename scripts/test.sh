#!/usr/bin/env bash
# The test command: formatting, lints, and every test (unit, property, black-box on loopback).
# Needs the Rust toolchain; installs with apt-get (as root, or through sudo) what is missing of
# chromium (the status page is tested in a headless browser), clang and libbpf-dev (the UDP
# offload's BPF program is compiled by crates/offload/build.rs), iproute2 (`ip`) and ethtool
# (for tests in network namespaces of their own, joined by veth pairs) and prometheus (promtool).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
if ! command -v chromium >/dev/null 2>&1 && [ -z "${TETHER_CHROMIUM:-}" ]; then need+=(chromium); fi
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
# promtool checks /metrics by Prometheus's rules (tests/prometheus.rs).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
scripts/build-deps.sh "${need[@]}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== a second build of tether with another version string (for tests/upgrade.rs)"
# Built here, before the tests, so that it does not compete with them for the CPUs; the test
# builds it itself when run alone (a no-op once built).
CARGO_TARGET_DIR=target/rebuilt TETHER_BUILD_ID=rebuilt cargo build -q -p tether --bin tether
echo "== cargo test"
# Black-box tests start several tether processes each; two at a time keeps a 2-core machine
# responsive enough for their timeouts to stay generous.
# tests/udp.rs runs in both UDP modes: here with established flows forwarded by the kernel,
# then again with every datagram through tether's sockets.
TETHER_TEST_UDP_OFFLOAD=on cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
echo "== tests/udp.rs again, --udp-offload off"
TETHER_TEST_UDP_OFFLOAD=off cargo test --test udp -- --test-threads="${TEST_THREADS:-2}"
echo "== fuzz smoke run (PROXY header parser, config loader)"
# About a minute of fuzzing (30 s per target) after the build; scripts/fuzz.sh SECONDS for more.
scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
echo "== the Debian package: build, dpkg -i, check the installed files, unit and man page"
# As root (CI is): it installs the package on this machine. Builds the release binary the
# chaos suite then uses.
scripts/package.sh --check
echo "== chaos and soak suite, one minute (docs/reliability.md)"
# Release builds of tether and the suite, then every scenario at full scale for a minute; fails
# if any figure misses its goal. scripts/chaos.sh --minutes 10 for the figures in the docs.
scripts/chaos.sh --minutes "${CHAOS_MINUTES:-1}" --out target/chaos-ci
