#!/usr/bin/env python3
"""What a hung or black-holed backend costs a pinned client (docs/operations.md).

Starts two test backends (tether-bench backend) and tether in front of them, pins a client to
b0, opens an echo session through it, then stops b0 with SIGSTOP (a hung process: its kernel
still completes handshakes into the accept queue and acknowledges data) and measures, from that
moment:

- existing: how long the open session's next request waits before an answer, a close or a reset;
- new: how long a new session of the pinned client takes to get an answer, and from whom;
- down: how long until health checks mark b0 down.

In the `black-holed` variants b0's accept queue (1024) is filled first, so the kernel drops every SYN
to it, as for a host that vanished or a firewall that drops.

Usage: scripts/hung-backend.py [--only NAME] (builds nothing: run `cargo build --workspace` first).
Every process it starts is stopped by PID; every wait is bounded (CAP seconds).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TETHER = os.path.join(ROOT, "target", "debug", "tether")
BENCH = os.path.join(ROOT, "target", "debug", "tether-bench")
CAP = 45.0

SCENARIOS = [
    ("hung, defaults", [], False),
    ("hung, --connect-timeout 1s --on-down kill --idle-timeout 10s",
     ["--connect-timeout", "1s", "--on-down", "kill", "--idle-timeout", "10s"], False),
    ("black-holed, defaults", [], True),
    ("black-holed, --connect-timeout 1s --on-down kill",
     ["--connect-timeout", "1s", "--on-down", "kill"], True),
]


def start_backend(name, ip):
    p = subprocess.Popen([BENCH, "backend", "--listen", f"{ip}:0", "--name", name],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()  # "listening ADDR"
    addr = line.split()[-1]
    return p, addr


def start_tether(net, backends, extra):
    args = [TETHER, "--listen", f"127.0.{net}.1:0", "--admin", f"127.0.{net}.1:0",
            "--workers", "1"] + extra
    for name, addr in backends:
        args += ["--backend", f"{addr},name={name}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    listen = admin = None
    while True:
        line = p.stdout.readline().strip()
        if not line:
            raise SystemExit("tether exited before ready")
        if line.startswith("listening tcp "):
            listen = line.split()[-1]
        elif line.startswith("admin "):
            admin = line.split("//")[1].rstrip("/")
        elif line == "ready":
            return p, listen, admin


def hostport(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def connect(source, to, timeout=CAP):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(hostport(to))
    return s


def ask_name(source, to, timeout=CAP):
    s = connect(source, to, timeout)
    try:
        s.sendall(b"name\n")
        return s.recv(100).decode().strip()
    finally:
        s.close()


def health_of(admin, name):
    s = socket.create_connection(hostport(admin), timeout=5)
    s.sendall(b"GET /api/backends HTTP/1.0\r\nHost: x\r\n\r\n")
    raw = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        raw += chunk
    s.close()
    body = raw.split(b"\r\n\r\n", 1)[1]
    return next(b["health"] for b in json.loads(body) if b["name"] == name)


def timed(fn):
    """(seconds, outcome) of fn(), bounded by CAP."""
    start = time.monotonic()
    try:
        outcome = fn()
    except socket.timeout:
        outcome = f"nothing within {CAP:.0f}s"
    except OSError as e:
        outcome = type(e).__name__
    return time.monotonic() - start, outcome


def run(net, title, extra, blackhole):
    b0 = start_backend("b0", f"127.0.{net}.10")
    b1 = start_backend("b1", f"127.0.{net}.11")
    t, listen, admin = start_tether(net, [("b0", b0[1]), ("b1", b1[1])], extra)
    fillers = []
    try:
        # A client pinned to b0.
        client = next(f"127.1.{net}.{i}" for i in range(1, 250)
                      if ask_name(f"127.1.{net}.{i}", listen) == "b0")
        session = connect(client, listen)
        session.sendall(b"echo\n")
        session.sendall(b"before\n")
        assert session.recv(100) == b"before\n"
        os.kill(b0[0].pid, signal.SIGSTOP)
        if blackhole:
            # Fill b0's accept queue (the test backend's backlog is 1024): from now on its
            # kernel drops every SYN.
            for _ in range(1100):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(hostport(b0[1]))
                fillers.append(f)
            time.sleep(1)  # a measurement set-up, not a synchronisation: SYNs settle
        results = {}

        def existing():
            session.sendall(b"after\n")
            data = session.recv(100)
            return "answered" if data else "closed"

        def new():
            return "served by " + ask_name(client, listen)

        def down():
            while health_of(admin, "b0") != "down":
                if time.monotonic() - start > CAP:
                    return f"still up after {CAP:.0f}s"
                time.sleep(0.1)
            return "down"

        start = time.monotonic()
        threads = []
        for name, fn in [("existing", existing), ("new", new), ("down", down)]:
            th = threading.Thread(target=lambda n=name, f=fn: results.__setitem__(n, timed(f)))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        print(f"| {title} | " + " | ".join(
            f"{results[k][1]} after {results[k][0]:.1f}s" for k in ["existing", "new", "down"])
            + " |", flush=True)
    finally:
        for f in fillers:
            f.close()
        for p in [t, b0[0], b1[0]]:
            try:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                p.kill()


def main():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    only = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--only" else None
    print("| backend b0, pinned client | existing session's next request | new session | b0 marked down |")
    print("|---|---|---|---|")
    for i, (title, extra, blackhole) in enumerate(SCENARIOS):
        if only and only not in title:
            continue
        run(120 + i, title, extra, blackhole)


if __name__ == "__main__":
    main()
