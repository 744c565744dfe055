#!/usr/bin/env python3
"""Side-by-side benchmark of tether, HAProxy and nginx (stream) on loopback. Run via bench.sh.

Fairness rules (docs/performance.md): every load balancer runs pinned to CPU 1 with one worker
(haproxy `nbthread 1`, nginx `worker_processes 1`, tether `--workers 1`) and balances by client
IP; load generators and backends run pinned to CPU 0. For each metric the balancers are
interleaved (rep 1: direct, tether, haproxy, nginx; rep 2: ...) and medians are reported. The
balancer's CPU cost is its busy CPU time (utime+stime of its whole process tree, from /proc)
divided by the work done. Every process started here is stopped by PID at the end.
"""

import argparse
import atexit
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TETHER_BIN runs another build (an A/B of two commits in one sitting).
TETHER = os.environ.get("TETHER_BIN") or os.path.join(ROOT, "target", "release", "tether")
BENCH = os.path.join(ROOT, "target", "release", "tether-bench")
LB_CPU = "1"
GEN_CPU = "0"
BACKEND_IPS = ["127.0.0.21", "127.0.0.22"]
LB_IP = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

procs = []  # every Popen we started, stopped at exit


def stop_all():
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    procs.clear()


atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def start(cmd, cpu, log, env=None):
    p = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=log, stderr=subprocess.STDOUT,
                         env=env, start_new_session=True)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in procs:
        procs.remove(p)


def free_port(ip="127.0.0.1"):
    s = socket.socket()
    s.bind((ip, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(ip, port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {ip}:{port}")


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICK


def rss_bytes(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def hold_dma_latency():
    """Keep idle CPUs out of deep C-states while the benchmark runs (cpuidle PM QoS interface:
    write a 32-bit 0 to /dev/cpu_dma_latency and keep the file open)."""
    try:
        f = open("/dev/cpu_dma_latency", "wb", buffering=0)
        f.write(struct.pack("i", 0))
        return f
    except OSError as e:
        print(f"bench: cannot hold /dev/cpu_dma_latency ({e}); latencies include wake-up time",
              file=sys.stderr)
        return None


# === load balancers ===


class Direct:
    name = "direct"

    def __init__(self, backends, work):
        self.addr = backends[0]
        self.proc = None

    def cpu(self):
        return 0.0

    def rss(self):
        return 0


class Balancer:
    def __init__(self, backends, work):
        self.port = free_port()
        self.addr = (LB_IP, self.port)
        self.log = open(os.path.join(work, f"{self.name}.log"), "w")
        self.proc = start(self.command(backends, work), LB_CPU, self.log, self.env())
        self.wait()

    def env(self):
        return None

    def wait(self):
        wait_port(*self.addr)

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def rss(self):
        return rss_bytes(self.proc.pid)


class Tether(Balancer):
    name = "tether"

    def __init__(self, backends, work):
        super().__init__(backends, work)
        # Listening starts before a pre-filled table is ready; `ready` comes after.
        path = os.path.join(work, f"{self.name}.log")
        deadline = time.time() + 60
        while time.time() < deadline:
            with open(path) as f:
                if "ready" in f.read():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} never printed ready")

    def command(self, backends, work):
        cmd = [TETHER, "--listen", f"{LB_IP}:{self.port}", "--workers", "1"]
        for ip, port in backends:
            cmd += ["--backend", f"{ip}:{port}"]
        return cmd + self.extra

    extra = []

    def env(self):
        return dict(os.environ, RUST_LOG="warn")


class TetherSessionLog(Tether):
    """tether writing a session log line per connection (--log-sessions) to its stdout, a file
    in the work directory: what the log costs on the connection rate."""
    name = "tether-sessionlog"
    extra = ["--log-sessions"]

    def session_lines(self):
        """Session lines in its log so far (the writer flushes every batch)."""
        time.sleep(0.3)
        with open(self.log.name) as f:
            return sum(1 for line in f if line.startswith("time="))


class HAProxy(Balancer):
    name = "haproxy"
    splice = False

    def command(self, backends, work):
        cfg = os.path.join(work, f"{self.name}.cfg")
        servers = "\n".join(f"  server s{i} {ip}:{port}" for i, (ip, port) in enumerate(backends))
        splice = "  option splice-request\n  option splice-response\n" if self.splice else ""
        with open(cfg, "w") as f:
            f.write(f"""global
  nbthread 1
  maxconn 7000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend fe
  bind {LB_IP}:{self.port}
  default_backend be
backend be
  balance source
  hash-type consistent
{splice}{servers}
""")
        return ["haproxy", "-f", cfg, "-db"]


class HAProxySplice(HAProxy):
    name = "haproxy-splice"
    splice = True


class Nginx(Balancer):
    name = "nginx"
    udp = ""

    def command(self, backends, work):
        d = os.path.join(work, self.name)
        os.makedirs(d, exist_ok=True)
        servers = "\n".join(f"    server {ip}:{port};" for ip, port in backends)
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log;
user root;
events {{ worker_connections 12000; }}
stream {{
  upstream be {{
    hash $remote_addr consistent;
{servers}
  }}
  server {{
    listen {LB_IP}:{self.port}{self.udp};
    proxy_pass be;
    proxy_timeout {"60s" if self.udp else "1h"};
  }}
}}
""")
        return ["nginx", "-p", d, "-c", os.path.join(d, "nginx.conf")]


# === backends ===


def backends_of(command, ready=wait_port):
    """One backend per address of BACKEND_IPS; `command(ip, port)` gives its argv."""
    out = []
    for ip in BACKEND_IPS:
        port = free_port(ip)
        start(command(ip, port), GEN_CPU, open(os.devnull, "w"))
        ready(ip, port)
        out.append((ip, port))
    return out


def iperf_backends(work):
    return backends_of(lambda ip, port: ["iperf3", "-s", "-B", ip, "-p", str(port)])


def redis_backends(work):
    return backends_of(lambda ip, port: [
        "redis-server", "--bind", ip, "--port", str(port), "--save", "", "--appendonly", "no",
        "--maxclients", "20000", "--protected-mode", "no"])


def sockperf_backends(work):
    return backends_of(lambda ip, port: ["sockperf", "server", "--tcp", "-i", ip, "-p", str(port)])


def http_backends(work):
    d = os.path.join(work, "http")
    os.makedirs(d, exist_ok=True)
    ports = [(ip, free_port(ip)) for ip in BACKEND_IPS]
    listens = "\n".join(f"    listen {ip}:{port} backlog=4096;" for ip, port in ports)
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(f"""daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
user root;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  server {{
{listens}
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
    start(["nginx", "-p", d, "-c", os.path.join(d, "nginx.conf")], GEN_CPU, open(os.devnull, "w"))
    for ip, port in ports:
        wait_port(ip, port)
    return ports


# === metrics ===


def gen(cmd, timeout):
    r = subprocess.run(["taskset", "-c", GEN_CPU] + cmd, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr.strip()[:400]}")
    return r.stdout


def machine_busy_seconds():
    """Busy CPU time of the whole machine (every CPU, softirq and irq included), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK  # user nice system idle iowait irq softirq steal


def measure(lb, fn):
    c0 = lb.cpu()
    m0 = machine_busy_seconds()
    t0 = time.time()
    result = fn()
    result["lb_cpu_s"] = lb.cpu() - c0
    result["machine_cpu_s"] = machine_busy_seconds() - m0
    result["wall_s"] = time.time() - t0
    return result


def bulk(lb, args, streams):
    def run():
        out = json.loads(gen(["iperf3", "-c", lb.addr[0], "-p", str(lb.addr[1]), "-t",
                              str(args.seconds), "-P", str(streams), "-J"], args.seconds + 30))
        end = out["end"]
        return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
                "bytes": end["sum_received"]["bytes"]}
    r = measure(lb, run)
    r["cpu_ms_per_gb"] = r["lb_cpu_s"] * 1e3 / (r["bytes"] / 1e9)
    return r


def connrate(lb, args):
    def run():
        out = gen(["wrk", "-t1", "-c32", f"-d{args.seconds}s", "--latency", "-H",
                   "Connection: close", f"http://{lb.addr[0]}:{lb.addr[1]}/"], args.seconds + 30)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Socket errors: (.*)", out)
        return {"conn_s": rps, "conns": total, "errors": errors.group(1) if errors else ""}
    before = lb.session_lines() if hasattr(lb, "session_lines") else 0
    r = measure(lb, run)
    r["cpu_us_per_conn"] = r["lb_cpu_s"] * 1e6 / max(1, r["conns"])
    if hasattr(lb, "session_lines"):
        # One line per connection, or the figure measures nothing.
        r["session_log_lines"] = lb.session_lines() - before
    return r


def redis(lb, args):
    n = args.redis_requests

    def run():
        out = gen(["redis-benchmark", "-h", lb.addr[0], "-p", str(lb.addr[1]), "-t",
                   "ping,set,get", "-c", "50", "-n", str(n), "--csv"], 600)
        rows = list(csv.DictReader(io.StringIO(out)))
        return {"rows": {r["test"]: {"rps": float(r["rps"]), "p50_ms": float(r["p50_latency_ms"]),
                                     "p99_ms": float(r["p99_latency_ms"])} for r in rows}}
    r = measure(lb, run)
    rows = r.pop("rows")
    requests = n * len(rows)
    r["rps"] = statistics.mean(v["rps"] for v in rows.values())
    r["p50_ms"] = statistics.mean(v["p50_ms"] for v in rows.values())
    r["p99_ms"] = max(v["p99_ms"] for v in rows.values())
    r["cpu_us_per_req"] = r["lb_cpu_s"] * 1e6 / requests
    return r


def pingpong(lb, args):
    def run():
        out = gen(["sockperf", "ping-pong", "--tcp", "-i", lb.addr[0], "-p", str(lb.addr[1]),
                   "-m", "64", "-t", str(args.seconds)], args.seconds + 30)
        pct = {m.group(1): float(m.group(2))
               for m in re.finditer(r"percentile (\d+\.\d+) =\s+([\d.]+)", out)}
        return {"p50_us": pct["50.000"], "p99_us": pct["99.000"]}
    return measure(lb, run)


def memory(lb, args):
    """RSS per idle connection: open N connections through the balancer to redis, check each
    with a PING, and compare the balancer's RSS before and after."""
    n = args.idle_conns
    before = lb.rss()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(lb.addr, timeout=10)
            socks.append(s)
        for s in socks:
            s.sendall(b"PING\r\n")
        for s in socks:
            if not s.recv(16).startswith(b"+PONG"):
                raise RuntimeError("no PONG through the balancer")
        time.sleep(1)  # let the balancer settle before sampling (a measurement pause)
        after = lb.rss()
    finally:
        for s in socks:
            s.close()
    return {"conns": n, "rss_before_kib": before // 1024, "rss_after_kib": after // 1024,
            "bytes_per_conn": (after - before) / n}


def state(lb, args):
    """New connections from many source addresses (each a sticky lookup and pin)."""
    def run():
        out = gen([BENCH, "connrate", "--connect", f"{lb.addr[0]}:{lb.addr[1]}", "--sources",
                   str(args.state_sources), "--threads", "8", "--seconds", str(args.seconds)],
                  args.seconds + 60)
        return json.loads(out)
    before = lb.session_lines() if hasattr(lb, "session_lines") else 0
    r = measure(lb, run)
    r["cpu_us_per_conn"] = r["lb_cpu_s"] * 1e6 / max(1, r["conns"])
    if hasattr(lb, "session_lines"):
        # One line per connection, or the figure measures nothing.
        r["session_log_lines"] = lb.session_lines() - before
    return r


def upgrade(lb, args):
    """New connections per second, second by second, while tether upgrades in place: SIGUSR2
    0.2 s into the fourth second (the binary upgrades to itself; the hand-over is the same)."""
    seconds, at = 8, 3
    found = {}

    def kick():
        time.sleep(0.2)  # into the window: pacing, not synchronisation
        old = lb.proc.pid
        os.kill(old, signal.SIGUSR2)
        deadline = time.time() + 10
        while time.time() < deadline and "pid" not in found:
            try:
                with open(f"/proc/{old}/task/{old}/children") as f:
                    kids = f.read().split()
                if kids:
                    found["pid"] = int(kids[0])
            except OSError:
                break
            time.sleep(0.01)

    per_second, errors = [], 0
    for second in range(seconds):
        kicker = threading.Thread(target=kick) if second == at else None
        if kicker:
            kicker.start()
        out = json.loads(gen([BENCH, "connrate", "--connect", f"{lb.addr[0]}:{lb.addr[1]}",
                              "--sources", "1000", "--threads", "8", "--seconds", "1"], 60))
        per_second.append(out["conn_s"])
        errors += out["errors"]
        if kicker:
            kicker.join()
    new = found.get("pid")
    if new is None:
        raise RuntimeError("the upgrade started no new process")
    # The new process is not ours to wait for: stop it by its pid.
    os.kill(new, signal.SIGTERM)
    deadline = time.time() + 40
    while time.time() < deadline and os.path.exists(f"/proc/{new}"):
        with open(f"/proc/{new}/stat") as f:
            if ") Z" in f.read():
                break
        time.sleep(0.05)
    before = statistics.median(per_second[:at])
    after = statistics.median(per_second[at + 1:])
    print("  upgrade: conn/s by second: " + ", ".join(f"{r:.0f}" for r in per_second) +
          f" (SIGUSR2 in second {at + 1}); errors {errors}", flush=True)
    return {"before_conn_s": before, "upgrade_second_conn_s": per_second[at],
            "after_conn_s": after, "upgrade_second_ratio": per_second[at] / before,
            "errors": float(errors)}


class TetherUdp(Tether):
    name = "tether"
    extra = ["--protocol", "udp", "--udp-offload", "off"]

    def wait(self):
        pass  # UDP: nothing to connect to; Tether.__init__ waits for `ready`


def bpf_run_time_s(pid):
    """Run time of the BPF programs process `pid` holds (kernel.bpf_stats_enabled must be 1)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids.update(int(l.split()[1]) for l in f if l.startswith("prog_id:"))
        except OSError:
            pass
    total = 0
    for i in ids:
        out = subprocess.run(["bpftool", "prog", "show", "id", str(i), "-j"], capture_output=True,
                             text=True).stdout
        total += json.loads(out).get("run_time_ns", 0) if out else 0
    return total / 1e9


class TetherUdpOffload(TetherUdp):
    """Established flows forwarded by the kernel: the balancer's CPU is the process's plus the
    program's run time (kernel.bpf_stats_enabled), which the kernel charges to whichever task
    or softirq sent the datagram."""
    name = "tether-offload"
    extra = ["--protocol", "udp", "--udp-offload", "on"]

    def cpu(self):
        return cpu_seconds(self.proc.pid) + bpf_run_time_s(self.proc.pid)


class NginxUdp(Nginx):
    name = "nginx"
    udp = " udp"

    def wait(self):
        time.sleep(1)  # nginx prints nothing when ready; UDP cannot be probed with a connect


class DirectUdp(Direct):
    pass


def udp_backends(work):
    # sockperf gives no readiness signal for UDP: a short pause instead of a probe.
    return backends_of(lambda ip, port: ["sockperf", "server", "-i", ip, "-p", str(port)],
                       ready=lambda ip, port: time.sleep(0.3))


def udp_pingpong(lb, args):
    def run():
        out = gen(["sockperf", "ping-pong", "-i", lb.addr[0], "-p", str(lb.addr[1]), "-m", "64",
                   "-t", str(args.seconds)], args.seconds + 30)
        pct = {m.group(1): float(m.group(2))
               for m in re.finditer(r"percentile (\d+\.\d+) =\s+([\d.]+)", out)}
        m = re.search(r"ReceivedMessages=(\d+)", out)
        rts = int(m.group(1)) if m else 0
        return {"p50_us": pct["50.000"], "p99_us": pct["99.000"], "round_trips": rts,
                "rt_s": rts / args.seconds}
    r = measure(lb, run)
    r["cpu_us_per_rt"] = r["lb_cpu_s"] * 1e6 / max(1, r["round_trips"])
    r["machine_cpu_us_per_rt"] = r["machine_cpu_s"] * 1e6 / max(1, r["round_trips"])
    return r


def udp_rate(lb, args):
    """Round trips per second with 4 concurrent ping-pong clients (4 flows)."""
    def run():
        procs_ = [subprocess.Popen(["taskset", "-c", GEN_CPU, "sockperf", "ping-pong", "-i",
                                    lb.addr[0], "-p", str(lb.addr[1]), "-m", "64", "-t",
                                    str(args.seconds)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        total = 0
        for p in procs_:
            out, _ = p.communicate(timeout=args.seconds + 30)
            m = re.search(r"ReceivedMessages=(\d+)", out)
            total += int(m.group(1)) if m else 0
        return {"round_trips": total, "rt_s": total / args.seconds}
    r = measure(lb, run)
    r["cpu_us_per_rt"] = r["lb_cpu_s"] * 1e6 / max(1, r["round_trips"])
    r["machine_cpu_us_per_rt"] = r["machine_cpu_s"] * 1e6 / max(1, r["round_trips"])
    return r


class TetherUdpKeyed(TetherUdp):
    """Flows keyed by the first 8 payload bytes (--udp-session-key 0:8; keyed flows are never
    offloaded, so the offload is off in both tether columns)."""
    name = "tether-key"
    extra = ["--protocol", "udp", "--udp-offload", "off", "--udp-session-key", "0:8"]


def udp_echo_backends(work):
    # No readiness signal for UDP: a short pause instead of a probe.
    return backends_of(lambda ip, port: [BENCH, "udp-backend", "--listen", f"{ip}:{port}",
                                         "--name", f"u{port}"],
                       ready=lambda ip, port: time.sleep(0.3))


def udp_key(lb, args):
    """8 clients, each from its own address with its own 8-byte token, ping-pong 64 bytes."""
    def run():
        return json.loads(gen([BENCH, "udp-pingpong", "--connect", f"{lb.addr[0]}:{lb.addr[1]}",
                               "--clients", "8", "--seconds", str(args.seconds)],
                              args.seconds + 30))
    r = measure(lb, run)
    r["cpu_us_per_rt"] = r["lb_cpu_s"] * 1e6 / max(1, r["round_trips"])
    r["machine_cpu_us_per_rt"] = r["machine_cpu_s"] * 1e6 / max(1, r["round_trips"])
    return r


class TetherEmpty(Tether):
    name = "tether-empty"


class TetherMillion(Tether):
    name = "tether-1M"
    extra = ["--sticky-prefill", "1000000"]


# === driver ===

METRICS = {
    "bulk": (iperf_backends, [Direct, Tether, HAProxy, HAProxySplice, Nginx]),
    "connrate": (http_backends, [Direct, Tether, TetherSessionLog, HAProxy, Nginx]),
    "redis": (redis_backends, [Direct, Tether, HAProxy, Nginx]),
    "pingpong": (sockperf_backends, [Direct, Tether, HAProxy, Nginx]),
    "memory": (redis_backends, [Tether, HAProxy, Nginx]),
    "state": (http_backends, [TetherEmpty, TetherMillion]),
    "udp": (udp_backends, [DirectUdp, TetherUdp, TetherUdpOffload, NginxUdp]),
    "udpkey": (udp_echo_backends, [DirectUdp, TetherUdp, TetherUdpKeyed, NginxUdp]),
    "upgrade": (http_backends, [Tether]),
}


def median_of(runs):
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def run_metric(name, args, work, results):
    make_backends, lbs = METRICS[name]
    backends = make_backends(work)
    started = [cls(backends, work) for cls in lbs]
    tests = {
        "bulk": [("bulk-P1", lambda lb: bulk(lb, args, 1)), ("bulk-P4", lambda lb: bulk(lb, args, 4))],
        "connrate": [("connrate", lambda lb: connrate(lb, args))],
        "redis": [("redis", lambda lb: redis(lb, args))],
        "pingpong": [("pingpong", lambda lb: pingpong(lb, args))],
        "memory": [("memory", lambda lb: memory(lb, args))],
        "state": [("state", lambda lb: state(lb, args))],
        "upgrade": [("upgrade", lambda lb: upgrade(lb, args))],
        "udp": [("udp-pingpong", lambda lb: udp_pingpong(lb, args)),
                ("udp-rate", lambda lb: udp_rate(lb, args))],
        "udpkey": [("udp-key", lambda lb: udp_key(lb, args))],
    }[name]
    try:
        for test, fn in tests:
            reps = 1 if name in ("memory", "upgrade") else args.reps
            runs = {lb.name: [] for lb in started}
            for rep in range(reps):
                for lb in started:
                    if test == "bulk-P1" or test == "bulk-P4" or lb.name != "haproxy-splice":
                        r = fn(lb)
                        runs[lb.name].append(r)
                        print(f"  {test} rep {rep + 1} {lb.name}: " +
                              ", ".join(f"{k}={v:.4g}" for k, v in r.items()
                                        if isinstance(v, float)), flush=True)
            results[test] = {lb: median_of(rs) for lb, rs in runs.items() if rs}
        if name == "state":
            empty, full = (lb.rss() for lb in started)
            results["state"]["tether-1M"]["bytes_per_sticky_entry"] = (full - empty) / 1e6
    finally:
        for lb in started:
            if lb.proc is not None:
                stop(lb.proc)
        stop_all()


def ratio(a, b):
    return a / b if b else float("nan")


def table(results):
    lines = []
    peers = ["haproxy", "nginx"]

    def row(test, metric, unit, lower_better, lbs=None):
        res = results.get(test)
        if not res:
            return
        lbs = lbs or [k for k in ["direct", "tether", "haproxy", "haproxy-splice", "nginx"] if k in res]
        cells = [f"{res[k][metric]:.4g}" if k in res else "" for k in
                 ["direct", "tether", "haproxy", "haproxy-splice", "nginx"]]
        t = res.get("tether", {}).get(metric)
        ratios = []
        for p in ["haproxy", "haproxy-splice", "nginx"]:
            if p in res and t is not None:
                ratios.append(f"{ratio(t, res[p][metric]):.2f}")
            else:
                ratios.append("")
        lines.append(f"| {test} | {metric} ({unit}, {'lower' if lower_better else 'higher'} is better) | "
                     + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

    if any(t in results for t in ("bulk-P1", "bulk-P4", "connrate", "redis", "pingpong", "memory")):
        lines.append("| test | metric | direct | tether | haproxy | haproxy-splice | nginx "
                     "| tether/haproxy | tether/haproxy-splice | tether/nginx |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for test in ["bulk-P1", "bulk-P4"]:
        row(test, "gbit_s", "Gbit/s", False)
        row(test, "cpu_ms_per_gb", "LB CPU ms/GB", True)
    row("connrate", "conn_s", "conn/s", False)
    row("connrate", "cpu_us_per_conn", "LB CPU µs/conn", True)
    row("redis", "rps", "req/s", False)
    row("redis", "p50_ms", "ms", True)
    row("redis", "p99_ms", "ms", True)
    row("redis", "cpu_us_per_req", "LB CPU µs/req", True)
    row("pingpong", "p50_us", "µs", True)
    row("pingpong", "p99_us", "µs", True)
    row("memory", "bytes_per_conn", "RSS bytes/idle conn", True)
    udp = [t for t in ("udp-pingpong", "udp-rate") if t in results]
    if udp:
        cols = ["direct", "tether", "tether-offload", "nginx"]
        lines.append("")
        lines.append("UDP, 64-byte datagrams (tether: every datagram through its sockets; "
                     "tether-offload: established flows forwarded by the kernel):")
        lines.append("")
        lines.append("| test | metric | " + " | ".join(cols) +
                     " | offload/nginx | offload/direct | offload/tether |")
        lines.append("|---|---|" + "---|" * (len(cols) + 3))
        for test in udp:
            res = results[test]
            for metric, unit, lower in (("rt_s", "round trips/s", False), ("p50_us", "µs", True),
                                        ("p99_us", "µs", True),
                                        ("cpu_us_per_rt", "LB CPU µs/round trip", True),
                                        ("machine_cpu_us_per_rt", "machine CPU µs/round trip", True)):
                if not any(metric in res.get(c, {}) for c in cols):
                    continue
                cell = lambda c: f"{res[c][metric]:.4g}" if metric in res.get(c, {}) else ""
                o = res.get("tether-offload", {}).get(metric)
                rat = [f"{ratio(o, res[p][metric]):.2f}" if o is not None and metric in res.get(p, {})
                       else "" for p in ("nginx", "direct", "tether")]
                lines.append(f"| {test} | {metric} ({unit}, {'lower' if lower else 'higher'} is better) | "
                             + " | ".join(cell(c) for c in cols) + " | " + " | ".join(rat) + " |")
        pp = results.get("udp-pingpong", {})
        if "direct" in pp and "tether-offload" in pp:
            lines.append("")
            lines.append(f"p50 over direct: tether-offload "
                         f"{pp['tether-offload']['p50_us'] - pp['direct']['p50_us']:+.2f} µs, tether "
                         f"{pp['tether']['p50_us'] - pp['direct']['p50_us']:+.2f} µs, nginx "
                         f"{pp['nginx']['p50_us'] - pp['direct']['p50_us']:+.2f} µs")
    uk = results.get("udp-key")
    if uk:
        cols = [c for c in ("direct", "tether", "tether-key", "nginx") if c in uk]
        lines.append("")
        lines.append("UDP session key (8 clients, each its own address and 8-byte token, "
                     "64-byte ping-pong; tether-key: --udp-session-key 0:8; offload off):")
        lines.append("")
        lines.append("| metric | " + " | ".join(cols) + " | key/tether | key/nginx |")
        lines.append("|---|" + "---|" * (len(cols) + 2))
        for metric, unit, lower in (("rt_s", "round trips/s", False), ("p50_us", "µs", True),
                                    ("p99_us", "µs", True), ("errors", "lost", True),
                                    ("cpu_us_per_rt", "LB CPU µs/round trip", True),
                                    ("machine_cpu_us_per_rt", "machine CPU µs/round trip", True)):
            k = uk.get("tether-key", {}).get(metric)
            rat = [f"{ratio(k, uk[p][metric]):.2f}" if k is not None and p in uk else ""
                   for p in ("tether", "nginx")]
            lines.append(f"| {metric} ({unit}, {'lower' if lower else 'higher'} is better) | "
                         + " | ".join(f"{uk[c][metric]:.4g}" for c in cols) + " | "
                         + " | ".join(rat) + " |")
    st = results.get("state")
    if st and "tether-empty" in st and "tether-1M" in st:
        e, m = st["tether-empty"], st["tether-1M"]
        lines.append("")
        lines.append("Sticky table at scale (tether only; new connections from "
                     "many source addresses):")
        lines.append("")
        lines.append("| table | conn/s | p50 µs | p99 µs | LB CPU µs/conn |")
        lines.append("|---|---|---|---|---|")
        for k, v in (("empty", e), ("1M entries", m)):
            lines.append(f"| {k} | {v['conn_s']:.0f} | {v['p50_us']:.0f} | {v['p99_us']:.0f} "
                         f"| {v['cpu_us_per_conn']:.1f} |")
        lines.append("")
        lines.append(f"1M/empty: conn/s {m['conn_s'] / e['conn_s']:.2f}, "
                     f"CPU per conn {m['cpu_us_per_conn'] / e['cpu_us_per_conn']:.2f}; "
                     f"RSS per sticky entry {m.get('bytes_per_sticky_entry', float('nan')):.1f} bytes")
    if "pingpong" in results and "direct" in results["pingpong"]:
        d = results["pingpong"]["direct"]["p50_us"]
        added = {k: v["p50_us"] - d for k, v in results["pingpong"].items() if k != "direct"}
        lines.append("")
        lines.append("Added p50 latency over direct (µs): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in added.items()) +
                     (f"; tether/best peer = {ratio(added['tether'], min(added[p] for p in peers if p in added)):.2f}"
                      if "tether" in added else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 repetition of 2 s (smoke run)")
    ap.add_argument("--only", action="append", choices=list(METRICS), help="run only these")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--redis-requests", type=int, default=100000)
    ap.add_argument("--idle-conns", type=int, default=5000)
    ap.add_argument("--state-sources", type=int, default=20000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    ap.add_argument("--one-cpu", action="store_true",
                    help="every process (balancers, backends, load) on CPU 0: no cross-CPU wake-ups")
    args = ap.parse_args()
    if args.one_cpu:
        global LB_CPU
        LB_CPU = GEN_CPU
    if args.quick:
        args.reps, args.seconds, args.redis_requests = 1, 2, 50000
    for tool in ["taskset", "haproxy", "nginx", "iperf3", "sockperf", "wrk", "redis-server"]:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (run scripts/bench.sh, which installs it)")
    if os.cpu_count() < 2:
        sys.exit("bench: needs 2 CPUs (balancer on CPU 1, load on CPU 0)")
    dma = hold_dma_latency()
    # The offload program's run time is counted only while BPF statistics are on.
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    stats_before = None
    if "udp" in (args.only or list(METRICS)):
        try:
            with open(stats_path) as f:
                stats_before = f.read().strip()
            with open(stats_path, "w") as f:
                f.write("1")
        except OSError as e:
            print(f"bench: cannot enable BPF statistics ({e}): the offload's program time is "
                  "not counted", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="tether-bench-")
    results = {}
    try:
        for name in args.only or list(METRICS):
            print(f"== {name}", flush=True)
            run_metric(name, args, work, results)
    finally:
        stop_all()
        if dma:
            dma.close()
        if stats_before is not None:
            with open(stats_path, "w") as f:
                f.write(stats_before)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps, "seconds": args.seconds,
            "kernel": os.uname().release, "dma_latency_held": dma is not None,
            "one_cpu": args.one_cpu,
            "versions": {
                "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
                "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
            }}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    md = table(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print()
    print(md)
    print(f"\n(written to {args.out}/results.json and results.md; work dir {work})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
