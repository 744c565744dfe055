#!/usr/bin/env bash
# Demo: tether in front of three local backends; clients from twelve source addresses connect
# three times each and print which backend served them. Then one backend is stopped and the same
# clients connect again: its clients fail over, everybody else stays put. Last, a backend is
# drained through the admin API: its pinned clients stay, new clients go elsewhere.
# Needs only the Rust toolchain. Loopback only; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p tether -p tether-bench
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

args=(--listen 127.0.0.10:0 --workers 2 --admin 127.0.0.10:0)
for b in "${backends[@]}"; do args+=(--backend "$b"); done
echo "\$ tether ${args[*]}"
"$bin/tether" "${args[@]}" >"$work/tether.out" 2>"$work/tether.err" &
tether_pid=$!
pids+=($tether_pid)
wait_line "$work/tether.out" "^ready"
addr=$(awk '/^listening tcp/ {print $3; exit}' "$work/tether.out")
admin=$(awk '/^admin http/ {sub("http://", "", $2); sub("/$", "", $2); print $2; exit}' "$work/tether.out")

# http METHOD PATH [BODY]: one request to the admin API with bash's /dev/tcp (no curl needed);
# prints the body, one JSON object per line.
http() {
  local body="${3:-}"
  exec 3<>"/dev/tcp/${admin%:*}/${admin##*:}"
  printf '%s %s HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s' "$1" "$2" "${#body}" "$body" >&3
  sed '1,/^\r$/d' <&3 | sed 's/},{/},\n{/g'
  echo
  exec 3<&-
}

echo
echo "== 12 clients (127.1.0.1 .. 127.1.0.12), 3 connections each, through $addr"
"$bin/tether-bench" clients --connect "$addr" --sources 12 --rounds 3

echo
echo "== backend bravo stops; the same clients connect again"
kill "$pid_bravo"
wait "$pid_bravo" 2>/dev/null || true
"$bin/tether-bench" clients --connect "$addr" --sources 12 --rounds 2

echo
echo "== drain alpha (admin API at http://$admin/): its pinned clients keep it, new clients"
echo "   (127.1.0.13 .. 127.1.0.24) go elsewhere"
echo "\$ PUT /api/services/default/backends/alpha {\"state\":\"drain\"}"
http PUT /api/services/default/backends/alpha '{"state":"drain"}' >/dev/null
"$bin/tether-bench" clients --connect "$addr" --sources 24 --rounds 1
echo "\$ GET /api/backends"
http GET /api/backends

echo
echo "== tether stops on SIGTERM; its log:"
kill -TERM "$tether_pid"
wait "$tether_pid" 2>/dev/null || true
sed 's/^/  /' "$work/tether.err"
