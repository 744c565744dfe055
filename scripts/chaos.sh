#!/usr/bin/env bash
# The chaos and soak suite (issue 15; docs/reliability.md): tether, chaos backends and clients
# in a network namespace of the run's own, eight scenarios with seeded randomness, figures with
# pass lines. Writes OUT/results.json, OUT/summary.md, OUT/sessions.csv and each tether's log
# and metrics; exits non-zero if any figure misses its goal.
#
#   scripts/chaos.sh                          # 3 minutes, a seed from the clock (printed)
#   scripts/chaos.sh --minutes 10 --seed 7    # replay seed 7's schedule for 10 minutes
#   scripts/chaos.sh --minutes 1 --out DIR    # the run inside .ci/run
#
# Needs root (namespaces, raw sockets, BPF). Every process it starts is stopped by pid; all
# traffic stays inside its namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# clang and libbpf-dev for the UDP offload's program come with the rest.
scripts/build-deps.sh "${need[@]}"

minutes=3 seed="" out=chaos-out extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done
[ -n "$seed" ] && extra+=(--seed "$seed")

cargo build --release --quiet -p tether -p tether-chaos
exec target/release/tether-chaos run --tether target/release/tether --minutes "$minutes" \
    --out "$out" "${extra[@]}"
