#!/usr/bin/env python3
"""Time from a node's death to its gang running again from its checkpoint (issue #29).

A real server and three agents on loopback (one machine, one disk: $TMPDIR). A gang of
two ranks; each rank writes SIZE_MB of checkpoint (random bytes, by rename) and then
waits. Once the server has committed a cut holding both parts, rank 1's node dies: its
agent and its processes get SIGKILL. Measured from that moment:

  detect_s   until the server counts the node lost (the lost run's end; --lost-after),
  running_s  until both ranks of the next attempt have started, each with the whole cut
             (both parts: 2 x SIZE_MB) fetched, checked and unpacked in its folder.

  scripts/bench-gang-recovery.py [SIZE_MB]    (default 1024; needs a release build)
  LOST_AFTER=4s HEARTBEAT=1s scripts/bench-gang-recovery.py   (a faster-detecting server)

Prints one JSON line.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
lost_after = os.environ.get("LOST_AFTER", "10s")
heartbeat = os.environ.get("HEARTBEAT", "2s")
binary = os.path.abspath(os.environ.get("CARAVEL_BIN", "target/release/caravel"))
work = tempfile.mkdtemp(prefix="caravel-gang-recovery-")
procs = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait(what, timeout, f, every=0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = f()
        if v:
            return v
        time.sleep(every)
    sys.exit(f"timed out waiting for {what}")


port = free_port()
url = f"http://127.0.0.1:{port}"


def call(path, body=None):
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"authorization": f"Bearer {admin}",
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def task_pids(node, job=None, index=None):
    """Processes in the node's cgroups (of one task of a job, if named)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cg = open(f"/proc/{p}/cgroup").read()
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"/caravel/{node}/" not in cg:
            continue
        if job is None or (f"CARAVEL_JOB_ID={job}".encode() in env
                           and f"CARAVEL_TASK_INDEX={index}".encode() in env):
            out.append(int(p))
    return out


try:
    log = open(os.path.join(work, "server.log"), "w")
    procs.append(subprocess.Popen(
        [binary, "server", "--listen", f"127.0.0.1:{port}", "--lost-after", lost_after,
         "--heartbeat", heartbeat, "--data-dir", os.path.join(work, "server")],
        stdout=subprocess.DEVNULL, stderr=log))
    tokens = os.path.join(work, "server")
    admin = wait("tokens", 20, lambda: os.path.exists(os.path.join(tokens, "agent.token"))
                 and open(os.path.join(tokens, "admin.token")).read().strip())
    agent_token = open(os.path.join(tokens, "agent.token")).read().strip()
    agents = {}
    for name in [f"gr{os.getpid()}-{x}" for x in "abc"]:
        agents[name] = subprocess.Popen(
            [binary, "agent", "--server", url, "--token", agent_token, "--name", name,
             "--listen", "127.0.0.1:0", "--work-dir", os.path.join(work, f"agent-{name}"),
             "--cpus", "2"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"agent-{name}.log"), "w"))
        procs.append(agents[name])
    wait("nodes", 30, lambda: sum(n["state"] == "ready" for n in call("/v1/nodes")) == 3)
    script = (f'd="$CARAVEL_CHECKPOINT_DIR"; if [ ! -f "$d/shard-$RANK" ]; then '
              f'head -c {size_mb}M /dev/urandom > "$d/.s"; mv "$d/.s" "$d/shard-$RANK"; fi; '
              'echo "started with: $(ls "$d" | tr "\\n" " ")"; exec sleep 100000')
    job = call("/v1/jobs", {"command": "sh", "args": ["-c", script], "tasks": 2, "gang": True,
                            "max_retries": 2, "resources": {"cpu_milli": 1000},
                            "disk_bytes": (4 * size_mb + 256) << 20})["id"]
    t_submit = time.time()
    wait("a cut with both parts", 600, lambda: len(call(f"/v1/jobs/{job}/checkpoint-cut")["parts"]) == 2,
         every=0.5)
    t_cut = time.time()
    j = call(f"/v1/jobs/{job}")
    node = j["task_list"][1]["node"]
    pids = task_pids(node, job, 1)
    t_kill = time.time()
    agents[node].send_signal(signal.SIGKILL)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass

    seen_lost = []

    def restarted():
        if not seen_lost and any(n["name"] == node and n["state"] == "lost"
                                 for n in call("/v1/nodes")):
            seen_lost.append(time.time())
        j = call(f"/v1/jobs/{job}")
        second = [r for r in j["runs"] if r["attempt"] == 2 and r.get("started_ms")]
        return j if len(second) == 2 else None

    j = wait("the gang running again", 600, restarted, every=0.05)
    second = [r for r in j["runs"] if r["attempt"] == 2]
    # As polled (every 50 ms or so).
    detect = (seen_lost[0] - t_kill) if seen_lost else None
    running = max(r["started_ms"] for r in second) / 1000 - t_kill
    restored = set()
    for r in second:
        req = urllib.request.Request(f"{url}/v1/jobs/{job}/logs?task={r['index']}&stream=stdout&run={r['id']}",
                                     headers={"authorization": f"Bearer {admin}"})
        text = urllib.request.urlopen(req, timeout=30).read().decode()
        restored.add(text.strip())
    print(json.dumps({
        "bench": "gang-recovery", "size_mb_per_rank": size_mb, "ranks": 2,
        "lost_after": lost_after, "heartbeat": heartbeat,
        "first_cut_s": round(t_cut - t_submit, 2),
        "detect_s": round(detect, 2) if detect is not None else None,
        "running_s": round(running, 2),
        "restore_s": round(running - detect, 2) if detect is not None else None,
        "checkpoint_from": sorted({r.get("checkpoint") for r in second}),
        "ranks_started_with": sorted(restored),
    }))
finally:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    # The dead node's leftovers, if any.
    for name in list(globals().get("agents", {})):
        for p in task_pids(name):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(work, ignore_errors=True)
