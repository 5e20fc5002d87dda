# A stand-in for torch.distributed training, stdlib only, for the gang checkpoint tests.
#
# Ranks meet at MASTER_ADDR:MASTER_PORT; each step every rank sends rank 0 its step and
# state, rank 0 checks that all are at the same step (and hold the same replicated
# model) and answers with the next model. A rank that finds a peer at another step, a
# peer gone, or a checkpoint missing its part exits non-zero, as gloo and the frameworks
# do. Three ways of checkpointing, all unmodified by Caravel (PATTERN):
#   a  rank 0 saves one file (ckpt.json, by rename); every rank loads it.
#   b  sharded (torch.distributed.checkpoint-style): every rank writes its shard into
#      step-N/, rank 0 writes step-N/metadata.json once all shards are written; every
#      rank loads its shard from the newest step with metadata.
#   c  trainer-style (Hugging Face Trainer): rank 0 writes checkpoint-N/ (model.json),
#      every rank its rng_state_<rank>.json, rank 0 trainer_state.json last; every rank
#      resumes from the newest checkpoint-N/ with a trainer_state.json.
# EXPECT=1 computes, in one process, the result an uninterrupted run prints.
import json
import os
import shutil
import socket
import sys
import time

P = 1000003
pattern = os.environ["PATTERN"]
STEPS = int(os.environ.get("STEPS", "300"))
EVERY = int(os.environ.get("EVERY", "40"))
PAUSE = float(os.environ.get("PAUSE", "0.05"))
# Rank 1 of the first attempt falls asleep for good at this step (a hung rank).
HANG_AT = int(os.environ.get("HANG_AT", "-1"))


def next_x(x, step, mines):
    if pattern == "a":
        return (x * 31 + step) % P
    if pattern == "b":
        return 0
    return (x * 31 + step + sum(mines)) % P


def next_mine(mine, step, rank):
    if pattern == "a":
        return 0
    if pattern == "b":
        return (mine * 31 + step + rank) % P
    return (mine * 17 + rank + 1) % P


def result(x, mines):
    if pattern == "b":
        # Resumed at the last step: no step was taken to gather the shards.
        return sum(mines) % P if mines else "unknown"
    return x


if os.environ.get("EXPECT"):
    world = int(os.environ["WORLD_SIZE"])
    x, mines = 1, [r + 1 for r in range(world)]
    for step in range(STEPS):
        x = next_x(x, step, mines)
        mines = [next_mine(m, step, r) for r, m in enumerate(mines)]
    print(result(x, mines))
    sys.exit(0)

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
d = os.environ["CARAVEL_CHECKPOINT_DIR"]


def fail(code, msg):
    print(f"FAIL rank={rank} {msg}", flush=True)
    sys.stderr.write(f"rank {rank}: {msg}\n")
    sys.exit(code)


def write_json(path, obj):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def newest(prefix, marker):
    """The newest `prefix<N>` folder that holds `marker`, as (N, path)."""
    best = None
    for name in os.listdir(d):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            n = int(name[len(prefix):])
            if os.path.exists(os.path.join(d, name, marker)) and (best is None or n > best[0]):
                best = (n, os.path.join(d, name))
    return best


# ---- resume
step, x, mine = 0, 1, rank + 1
if pattern == "a":
    p = os.path.join(d, "ckpt.json")
    if os.path.exists(p):
        s = read_json(p)
        step, x = s["step"], s["x"]
elif pattern == "b":
    found = newest("step-", "metadata.json")
    if found:
        n, path = found
        shard = os.path.join(path, f"shard-{rank}.json")
        if not os.path.exists(shard):
            fail(3, f"step {n} has metadata but no shard of rank {rank}: inconsistent checkpoint")
        s = read_json(shard)
        step, mine = s["step"], s["mine"]
else:
    found = newest("checkpoint-", "trainer_state.json")
    if found:
        n, path = found
        rng = os.path.join(path, f"rng_state_{rank}.json")
        if not os.path.exists(rng):
            fail(3, f"checkpoint-{n} is complete but has no rng state of rank {rank}")
        m = read_json(os.path.join(path, "model.json"))
        r = read_json(rng)
        if r["step"] != m["step"]:
            fail(3, f"checkpoint-{n}: rng state of step {r['step']} beside a model of step {m['step']}")
        step, x, mine = m["step"], m["x"], r["rng"]
resumed = step
print(f"START rank={rank} step={step} attempt={os.environ.get('CARAVEL_ATTEMPT')} world={world}",
      flush=True)

# ---- rendezvous
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
deadline = time.time() + 60
if rank == 0:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(world)
    srv.settimeout(60)
    peers = {}
    while len(peers) < world - 1:
        c, _ = srv.accept()
        f = c.makefile("rw")
        peers[int(f.readline())] = (c, f)
else:
    while True:
        try:
            c = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                fail(2, "cannot reach rank 0")
            time.sleep(0.2)
    c.settimeout(None)
    f = c.makefile("rw")
    f.write(f"{rank}\n")
    f.flush()


def exchange(msg):
    """Every rank's message to rank 0; rank 0's answer back to every rank."""
    if rank == 0:
        msgs = [msg]
        for r in range(1, world):
            line = peers[r][1].readline()
            if not line:
                fail(1, f"rank {r} is gone")
            msgs.append(json.loads(line))
        steps = {m["step"] for m in msgs}
        if len(steps) != 1:
            fail(4, f"ranks are at different steps {sorted(steps)}")
        if pattern != "b" and len({m["x"] for m in msgs}) != 1:
            fail(4, "ranks hold different models")
        answer = {"x": next_x(x, step, [m["mine"] for m in msgs]),
                  "mines": [m["mine"] for m in msgs]}
        for r in range(1, world):
            try:
                peers[r][1].write(json.dumps(answer) + "\n")
                peers[r][1].flush()
            except OSError:
                fail(1, f"rank {r} is gone")
        return answer
    try:
        f.write(json.dumps(msg) + "\n")
        f.flush()
        line = f.readline()
    except OSError:
        line = ""
    if not line:
        fail(1, "rank 0 is gone")
    return json.loads(line)


def save(step):
    if pattern == "a" and rank == 0:
        write_json(os.path.join(d, "ckpt.json"), {"step": step, "x": x})
    elif pattern == "b":
        path = os.path.join(d, f"step-{step}")
        os.makedirs(path, exist_ok=True)
        write_json(os.path.join(path, f"shard-{rank}.json"), {"step": step, "mine": mine})
    elif pattern == "c":
        path = os.path.join(d, f"checkpoint-{step}")
        if rank == 0:
            tmp = os.path.join(d, f".tmp-checkpoint-{step}")
            os.makedirs(tmp, exist_ok=True)
            write_json(os.path.join(tmp, "model.json"), {"step": step, "x": x})
            if os.path.exists(path):
                for name in os.listdir(tmp):
                    os.replace(os.path.join(tmp, name), os.path.join(path, name))
                os.rmdir(tmp)
            else:
                os.replace(tmp, path)
        os.makedirs(path, exist_ok=True)
        write_json(os.path.join(path, f"rng_state_{rank}.json"), {"step": step, "rng": mine})


def complete(step):
    """After the exchange that follows a save, every rank has written its part of it."""
    prefix = "step-" if pattern == "b" else "checkpoint-"
    marker = "metadata.json" if pattern == "b" else "trainer_state.json"
    if rank == 0:
        write_json(os.path.join(d, f"{prefix}{step}", marker), {"step": step})
    # Keep the two newest; each rank removes its own copies of older ones.
    for name in os.listdir(d):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            if int(name[len(prefix):]) < step - EVERY:
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)


pending = None
mines = []  # every rank's state as of the last step (rank 0's answer)
while step < STEPS:
    if rank == 1 and step == HANG_AT and os.environ.get("CARAVEL_ATTEMPT") == "1":
        time.sleep(10**9)
    answer = exchange({"step": step, "x": x, "mine": mine})
    if pending is not None:
        complete(pending)
        pending = None
    x = answer["x"]
    mine = next_mine(mine, step, rank)
    mines = [next_mine(m, step, r) for r, m in enumerate(answer["mines"])]
    step += 1
    if step % EVERY == 0:
        save(step)
        if pattern != "a":
            pending = step
    time.sleep(PAUSE)

print(f"FINAL rank={rank} step={step} value={result(x, mines)} resumed_from={resumed}", flush=True)
