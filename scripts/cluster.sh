#!/usr/bin/env bash
# Cluster demo (issue 14): three tether instances share one virtual address behind a kernel
# ECMP route with layer-4 hashing, each in a network namespace of its own ("hosts"), with a
# client host of many addresses and a backend host of three backends; the instances share
# their pins as peers. Prints, per client, which instance and which backend served each of three
# connections; then stops a backend (its clients fail over), brings it back (nobody moves
# back, on any instance), and takes an instance out of the route (nobody moves).
# Needs root (network namespaces) and the Rust toolchain; only addresses inside its own
# namespaces are used, and everything it starts stops with it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-deps.sh
cargo build --quiet -p tether -p tether-bench
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
exec $sudo target/debug/tether-bench cluster --tether target/debug/tether "$@"
