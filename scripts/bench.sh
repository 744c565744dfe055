#!/usr/bin/env bash
# Side-by-side benchmark: tether, HAProxy (TCP mode) and nginx (stream module) against the same
# backends, in one run. Installs what it needs when missing, builds tether in release mode, then
# runs scripts/bench.py, which prints a markdown table and writes bench-out/results.json.
#
#   scripts/bench.sh                 # everything, 3 repetitions of 5 s per load balancer
#   scripts/bench.sh --quick         # 1 repetition of 2 s: a smoke run
#   scripts/bench.sh --only redis    # one metric (bulk, connrate, redis, pingpong, memory, state,
#                                    # udp, udpkey, upgrade)
#   scripts/bench.sh --only udp --one-cpu   # every process on one CPU (no cross-CPU wake-ups)
#
# Loopback only; every process it starts is stopped by PID when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v sockperf >/dev/null || need+=(sockperf)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v bpftool >/dev/null || need+=(bpftool)
# clang and libbpf-dev for the offload's BPF program come with the rest.
scripts/build-deps.sh "${need[@]}"

cargo build --release --quiet -p tether -p tether-bench
exec python3 scripts/bench.py "$@"
