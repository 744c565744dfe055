#!/usr/bin/env bash
# Demo: tether in front of three local backends; clients from twelve source addresses connect
# three times each and print which backend served them. Then one backend is stopped and the same
# clients connect again: its clients fail over, everybody else stays put.
# Needs only the Rust toolchain. Loopback only; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --bin tether --bin tether-bench
bin=target/debug
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# wait_line FILE PATTERN: poll FILE (written by a background process) until PATTERN appears.
wait_line() {
  for _ in $(seq 1 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: timed out waiting for '$2' in $1" >&2
  cat "$1" >&2
  exit 1
}

backends=()
for name in alpha bravo charlie; do
  i=$(( ${#backends[@]} + 11 ))
  "$bin/tether-bench" backend --listen "127.0.0.$i:0" --name "$name" >"$work/$name.out" 2>&1 &
  pids+=($!)
  eval "pid_$name=$!"
  wait_line "$work/$name.out" "listening"
  backends+=("$(awk '/listening/ {print $NF; exit}' "$work/$name.out"),name=$name")
done

args=(--listen 127.0.0.10:0 --workers 2)
for b in "${backends[@]}"; do args+=(--backend "$b"); done
echo "\$ tether ${args[*]}"
"$bin/tether" "${args[@]}" >"$work/tether.out" 2>"$work/tether.err" &
tether_pid=$!
pids+=($tether_pid)
wait_line "$work/tether.out" "^ready"
addr=$(awk '/^listening tcp/ {print $3; exit}' "$work/tether.out")

echo
echo "== 12 clients (127.1.0.1 .. 127.1.0.12), 3 connections each, through $addr"
"$bin/tether-bench" clients --connect "$addr" --sources 12 --rounds 3

echo
echo "== backend bravo stops; the same clients connect again"
kill "$pid_bravo"
wait "$pid_bravo" 2>/dev/null || true
"$bin/tether-bench" clients --connect "$addr" --sources 12 --rounds 2

echo
echo "== tether stops on SIGTERM; its log:"
kill -TERM "$tether_pid"
wait "$tether_pid" 2>/dev/null || true
sed 's/^/  /' "$work/tether.err"
