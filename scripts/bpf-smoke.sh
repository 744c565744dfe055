#!/usr/bin/env bash
# Issue 13 groundwork, not part of CI yet: compile bpf/udp_nat.bpf.c, load it with bpftool,
# attach it at tc ingress of `lo` in a network namespace of its own, put one flow's two
# entries in its map by hand and check that datagrams are rewritten both ways (the backend sees
# the flow's address, the client the listener's) with no UDP checksum error. Needs root
# (CAP_BPF, CAP_NET_ADMIN); installs clang, libbpf-dev and bpftool when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v clang >/dev/null || need+=(clang)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v bpftool >/dev/null || need+=(bpftool)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
pin=/sys/fs/bpf/tether-smoke-$$
cleanup() { rm -rf "$work" "$pin" "$pin-maps"; }
trap cleanup EXIT

clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c bpf/udp_nat.bpf.c -o "$work/udp_nat.bpf.o"
bpftool prog load "$work/udp_nat.bpf.o" "$pin" type classifier pinmaps "$pin-maps"

cat >"$work/check.py" <<PY
import socket, struct, subprocess
MAP = "$pin-maps/FLOWS"

def tup(s, sp, d, dp):
    return (socket.inet_aton(s) + bytes(12) + socket.inet_aton(d) + bytes(12)
            + struct.pack("!HH", sp, dp) + bytes([4, 0, 0, 0]))

def put(key, to):
    value = to + bytes(24)  # last seen, packets, bytes
    subprocess.check_call(["bpftool", "map", "update", "pinned", MAP, "key", "hex"]
                          + ["%02x" % x for x in key] + ["value", "hex"]
                          + ["%02x" % x for x in value])

client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
client.bind(("127.0.0.2", 5000))
client.settimeout(5)
backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
backend.bind(("127.0.0.3", 9000))
backend.settimeout(5)
# listener 127.0.0.1:7000, the flow's own address 127.0.0.1:6000
put(tup("127.0.0.2", 5000, "127.0.0.1", 7000), tup("127.0.0.1", 6000, "127.0.0.3", 9000))
put(tup("127.0.0.3", 9000, "127.0.0.1", 6000), tup("127.0.0.1", 7000, "127.0.0.2", 5000))
for i in range(3):
    client.sendto(b"ping %d" % i, ("127.0.0.1", 7000))
    data, peer = backend.recvfrom(100)
    assert peer == ("127.0.0.1", 6000), peer
    backend.sendto(b"pong " + data, peer)
    data, peer = client.recvfrom(100)
    assert peer == ("127.0.0.1", 7000) and data == b"pong ping %d" % i, (data, peer)
udp = [l.split() for l in open("/proc/net/snmp") if l.startswith("Udp:")]
stats = dict(zip(udp[0][1:], map(int, udp[1][1:])))
assert stats["InCsumErrors"] == 0 and stats["InErrors"] == 0, stats
print("3 round trips rewritten both ways; UDP", stats)
PY
unshare -n sh -c "ip link set lo up && tc qdisc add dev lo clsact && \
  tc filter add dev lo ingress bpf da pinned $pin && python3 $work/check.py"
bpftool map dump pinned "$pin-maps/FLOWS" | grep -E '"packets"|"bytes"'
