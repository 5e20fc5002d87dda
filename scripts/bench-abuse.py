#!/usr/bin/env python3
"""A hostile client against a local pool, for a bounded time (issue #30).

A real `caravel server` and one agent on loopback. For DURATION seconds (default 60), at
once:

  flood       opens up to 20,000 connections (this process's descriptor limit less
              1,000) that send half a request head and stall
  slowloris   50 connections that trickle one header byte a second
  badtoken    requests with wrong tokens, as fast as one thread can send them
  cardinality requests to /s/t$i/s$i/ for ever new i (metric label growth)
  fuzz        random methods, paths, query strings and bodies to every API route

and meanwhile, as an honest user, a well-formed submit (admin token) every 0.5 s, each
job run by the agent to the end. Prints, as its last line, one JSON object:

  requests           HTTP requests the attackers completed (an answer was read)
  server_5xx         answers >= 500 to the attackers and the honest user
  panics             "panicked" lines in the server's and agent's logs
  peak_rss_bytes     the server's peak resident memory (VmHWM)
  max_open_fds       the most descriptors the server held at once (sampled every 0.5 s)
  honest_p99_ms      p99 latency of the honest submits
  honest_failures    honest submits that failed
  agent_sync_failures  the agent's "server unreachable" / "cannot report" log lines
  metrics_bytes      the size of /metrics at the end (label cardinality)

  scripts/bench-abuse.py [DURATION_S]     (needs a release build; CARAVEL_BIN to override)
  SERVER_ARGS="--rate-limit off --rate-limit-anonymous off --max-connections 100000" \\
      scripts/bench-abuse.py               (the same attack with the limits off)
"""
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

duration = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
binary = os.path.abspath(os.environ.get("CARAVEL_BIN", "target/release/caravel"))
server_args = os.environ.get("SERVER_ARGS", "").split()
work = tempfile.mkdtemp(prefix="caravel-abuse-")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


port = free_port()
addr = ("127.0.0.1", port)
url = f"http://127.0.0.1:{port}"
procs = []
stop = threading.Event()
lock = threading.Lock()
stats = {"requests": 0, "server_5xx": 0}


def count(status):
    with lock:
        stats["requests"] += 1
        if status >= 500:
            stats["server_5xx"] += 1


def request(method, path, token=None, body=None, timeout=10):
    req = urllib.request.Request(url + path, method=method, data=body)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def start():
    slog = open(os.path.join(work, "server.log"), "w")
    s = subprocess.Popen([binary, "server", "--listen", f"127.0.0.1:{port}", "--data-dir",
                          os.path.join(work, "server")] + server_args,
                         stdout=subprocess.DEVNULL, stderr=slog)
    procs.append(s)
    tokf = os.path.join(work, "server", "admin.token")
    for _ in range(200):
        if os.path.exists(tokf) and os.path.exists(os.path.join(work, "server", "agent.token")):
            break
        time.sleep(0.05)
    admin = open(tokf).read().strip()
    agent_token = open(os.path.join(work, "server", "agent.token")).read().strip()
    alog = open(os.path.join(work, "agent.log"), "w")
    a = subprocess.Popen([binary, "agent", "--server", url, "--token", agent_token, "--name", "a",
                          "--cpus", "4", "--listen", "127.0.0.1:0", "--work-dir",
                          os.path.join(work, "agent")], stdout=subprocess.DEVNULL, stderr=alog)
    procs.append(a)
    for _ in range(200):
        try:
            nodes = json.loads(urllib.request.urlopen(urllib.request.Request(
                url + "/v1/nodes", headers={"authorization": f"Bearer {admin}"}), timeout=5).read())
            if nodes and nodes[0]["state"] == "ready":
                break
        except Exception:
            pass
        time.sleep(0.1)
    return s, admin


server, admin = start()
sample = {"peak_fds": 0}


def sampler():
    while not stop.is_set():
        try:
            n = len(os.listdir(f"/proc/{server.pid}/fd"))
            sample["peak_fds"] = max(sample["peak_fds"], n)
        except OSError:
            pass
        time.sleep(0.5)


def flood():
    held = []
    # The flood's sockets are this process's descriptors too: leave the rest of the
    # script (the honest client, the other attackers) a thousand.
    while not stop.is_set() and len(held) < min(20000, hard - 1000):
        try:
            s = socket.create_connection(addr, timeout=2)
            s.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        except OSError:
            time.sleep(0.01)
    while not stop.is_set():
        time.sleep(0.2)
    for s in held:
        s.close()


def slowloris():
    conns = []
    while not stop.is_set():
        while len(conns) < 50:
            try:
                s = socket.create_connection(addr, timeout=2)
                s.sendall(b"GET / HTTP/1.1\r\n")
                conns.append(s)
            except OSError:
                break
        alive = []
        for s in conns:
            try:
                s.sendall(b"X")
                alive.append(s)
            except OSError:
                s.close()
        conns = alive
        time.sleep(1)
    for s in conns:
        s.close()


def badtoken():
    i = 0
    while not stop.is_set():
        try:
            count(request("GET", "/v1/jobs", token=f"guess-{i}", timeout=5))
        except Exception:
            pass
        i += 1


def cardinality():
    i = 0
    while not stop.is_set():
        try:
            count(request("GET", f"/s/t{i}/s{i}/", timeout=5))
        except Exception:
            pass
        i += 1


ROUTES = ["/v1/whoami", "/v1/jobs", "/v1/jobs/1", "/v1/jobs/1/cancel", "/v1/jobs/1/logs",
          "/v1/jobs/1/checkpoints", "/v1/jobs/1/checkpoint-cut", "/v1/jobs/1/tasks/0/checkpoint",
          "/v1/registries", "/v1/nodes", "/v1/nodes/a/drain", "/v1/tenants", "/v1/usage",
          "/v1/agent/sync", "/v1/agent/events", "/v1/services", "/v1/services/x", "/healthz",
          "/metrics", "/v1/openapi.json", "/nope", "/v1/jobs/%FF"]


def fuzz():
    rng = random.Random(30)
    while not stop.is_set():
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
        path = rng.choice(ROUTES) + rng.choice(["", "?limit=x", "?state=%FF", "?version=-1"])
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        token = rng.choice([None, "bad"])
        try:
            count(request(method, path, token=token, body=body, timeout=5))
        except Exception:
            pass


threads = [threading.Thread(target=f, daemon=True)
           for f in (sampler, flood, slowloris, badtoken, cardinality, fuzz)]
for t in threads:
    t.start()
honest = []
honest_failures = 0
failure_kinds = {}
jobs = []
t_end = time.time() + duration
while time.time() < t_end:
    t0 = time.time()
    try:
        body = json.dumps({"command": "true", "resources": {"cpu_milli": 100}}).encode()
        req = urllib.request.Request(url + "/v1/jobs", method="POST", data=body,
                                     headers={"authorization": f"Bearer {admin}",
                                              "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            jobs.append(json.load(r)["id"])
        honest.append((time.time() - t0) * 1000)
    except urllib.error.HTTPError as e:
        honest_failures += 1
        failure_kinds[f"http {e.code}"] = failure_kinds.get(f"http {e.code}", 0) + 1
        if e.code >= 500:
            stats["server_5xx"] += 1
    except Exception as e:
        honest_failures += 1
        k = type(e).__name__ + ": " + str(getattr(e, "reason", e))[:60]
        failure_kinds[k] = failure_kinds.get(k, 0) + 1
    time.sleep(max(0, 0.5 - (time.time() - t0)))
stop.set()
for t in threads:
    t.join(timeout=10)
# Every honest job runs to the end: the agent kept working under the attack.
unfinished = 0
deadline = time.time() + 60
for j in jobs:
    while True:
        st = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{url}/v1/jobs/{j}", headers={"authorization": f"Bearer {admin}"}), timeout=10).read())
        if st["state"] in ("succeeded", "failed", "cancelled"):
            break
        if time.time() > deadline:
            unfinished += 1
            break
        time.sleep(0.2)
metrics = urllib.request.urlopen(urllib.request.Request(
    url + "/metrics", headers={"authorization": f"Bearer {admin}"}), timeout=10).read()
peak_rss = 0
for line in open(f"/proc/{server.pid}/status"):
    if line.startswith("VmHWM:"):
        peak_rss = int(line.split()[1]) * 1024
# The agent first: a server killed first would leave it a failed sync to log.
for p in reversed(procs):
    p.kill()
    p.wait()
logs = open(os.path.join(work, "server.log")).read() + open(os.path.join(work, "agent.log")).read()
agent_log = open(os.path.join(work, "agent.log")).read()
for line in agent_log.splitlines():
    if "server unreachable" in line or "cannot report" in line:
        print(line, file=sys.stderr)
honest.sort()
p99 = honest[min(len(honest) - 1, int(len(honest) * 0.99))] if honest else None
if not os.environ.get("KEEP"):
    shutil.rmtree(work, ignore_errors=True)
else:
    print(work, file=sys.stderr)
print(json.dumps({
    "duration_s": duration,
    "requests": stats["requests"],
    "server_5xx": stats["server_5xx"],
    "panics": logs.count("panicked"),
    "peak_rss_bytes": peak_rss,
    "max_open_fds": sample["peak_fds"],
    "honest_submits": len(honest),
    "honest_p99_ms": round(p99, 1) if p99 is not None else None,
    "honest_failures": honest_failures,
    "honest_failure_kinds": failure_kinds,
    "honest_unfinished": unfinished,
    "agent_sync_failures": agent_log.count("server unreachable") + agent_log.count("cannot report"),
    "metrics_bytes": len(metrics),
}))
