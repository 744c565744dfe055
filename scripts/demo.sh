#!/usr/bin/env bash
# Demo: tether in front of three local backends; clients from twelve source addresses connect
# three times each and print which backend served them. Then one backend is stopped and the same
# clients connect again: its clients fail over, everybody else stays put. Last, a backend is
# drained through the admin API: its pinned clients stay, new clients go elsewhere. Then the
# binary is upgraded in place (SIGUSR2) while clients keep connecting: nobody is refused,
# nobody moves.
# Needs the Rust toolchain (clang and libbpf-dev are installed if missing, for the UDP offload's
# BPF program). Loopback only; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-deps.sh
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

# tether runs from a copy of its own, so that the upgrade step can install a new file there.
cp "$bin/tether" "$work/tether"

args=(--listen 127.0.0.10:0 --workers 2 --admin 127.0.0.10:0)
for b in "${backends[@]}"; do args+=(--backend "$b"); done
echo "\$ tether ${args[*]}"
"$work/tether" "${args[@]}" >"$work/tether.out" 2>"$work/tether.err" &
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
echo "== upgrade in place: a new binary is installed and tether gets SIGUSR2 while clients"
echo "   (127.1.1.1 .. 127.1.1.24) keep connecting, round after round"
"$bin/tether-bench" clients --connect "$addr" --sources 24 --first 127.1.1.1 >"$work/before.txt"
(
  for _ in $(seq 1 300); do
    [ -e "$work/load.stop" ] && break
    if "$bin/tether-bench" clients --connect "$addr" --sources 24 --first 127.1.1.1 \
      >"$work/round.txt" 2>&1 && cmp -s <(grep '^127' "$work/before.txt") <(grep '^127' "$work/round.txt"); then
      echo same
    else
      echo "differs or failed:"; cat "$work/round.txt"
    fi
  done
) >"$work/load.log" &
load_pid=$!
pids+=($load_pid)
wait_line "$work/load.log" "same"
cp "$bin/tether" "$work/tether.next" && mv "$work/tether.next" "$work/tether"
echo "\$ kill -USR2 $tether_pid"
kill -USR2 "$tether_pid"
new_pid=""
for _ in $(seq 1 300); do
  new_pid=$(http GET /api/status | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
  [ -n "$new_pid" ] && [ "$new_pid" != "$tether_pid" ] && break
  sleep 0.1
done
[ -n "$new_pid" ] && [ "$new_pid" != "$tether_pid" ] || { echo "demo: the upgrade did not happen" >&2; cat "$work/tether.err" >&2; exit 1; }
pids+=($new_pid)
echo "GET /api/status: pid $new_pid serves now (was $tether_pid)"
rounds=$(grep -c . "$work/load.log")
for _ in $(seq 1 300); do
  [ "$(grep -c . "$work/load.log")" -ge $(( rounds + 3 )) ] && break
  sleep 0.1
done
touch "$work/load.stop"
wait "$load_pid" 2>/dev/null || true
wait "$tether_pid" 2>/dev/null || true
echo "rounds of 24 connections across the upgrade: $(grep -c '^same' "$work/load.log") with every client on its backend of before, $(grep -c '^differs' "$work/load.log") otherwise"
grep -A40 '^differs' "$work/load.log" || true
echo "the old process (pid $tether_pid) has exited: $(kill -0 "$tether_pid" 2>/dev/null && echo no || echo yes)"
echo "\$ GET /api/backends (alpha is still drained: the admin states came along)"
http GET /api/backends

echo
echo "== tether (pid $new_pid) stops on SIGTERM; the log of both processes:"
kill -TERM "$new_pid"
for _ in $(seq 1 300); do
  kill -0 "$new_pid" 2>/dev/null || break
  sleep 0.1
done
sed 's/^/  /' "$work/tether.err"
