"""Upper bound on the GPU any placement can allocate in the FGD protocol at a given arrived
load, when pods may also be turned away: a linear program over the node list's classes of
alike nodes (model, GPUs, CPU, memory), with per-class CPU, memory and GPUs, every
CPU-only pod placed, and GPU shares packed into whole GPUs by patterns (Gilmore-Gomory
column generation). Node boundaries inside a class and integrality are relaxed, so no real
placement, online or offline, can allocate more.

    pip install scipy
    python3 scripts/openb_lp_upper_bound.py [default|cpu050|gpushare40|...] [LOAD]

LOAD is the arrived GPU request as a multiple of capacity (default 1.0; the pod list is
scaled to it, its mix kept). Prints the bound, the pods it turns away, the share patterns
it fills GPUs with, and each class's CPU and GPU use.
"""
import collections, csv, os, sys

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csr_matrix, lil_matrix

HERE = os.path.dirname(os.path.abspath(__file__))
T = os.path.join(HERE, "..", "..", "shared", "traces", "alibaba-gpu-v2023-openb")
name = sys.argv[1] if len(sys.argv) > 1 else "default"
load = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
pods = list(csv.DictReader(open(os.path.join(T, f"openb_pod_list_{name}.csv"))))
nodes = list(csv.DictReader(open(os.path.join(T, "openb_node_list_gpu_node.csv"))))
cap = sum(int(n["gpu"]) for n in nodes) * 1000
classes = list(collections.Counter(
    (n["model"], int(n["gpu"]), int(n["cpu_milli"]), int(n["memory_mib"])) for n in nodes
).items())
counts = collections.Counter()
for p in pods:
    g = int(p["num_gpu"])
    m = int(p["gpu_milli"]) if g > 0 else 0
    counts[(g, m, max(1, int(p["cpu_milli"])), int(p["memory_mib"]), p.get("gpu_spec") or "")] += 1
demand = sum(g * m * c for (g, m, _, _, _), c in counts.items())
types = [(k, c * load * cap / demand) for k, c in counts.items()]
sizes = sorted({k[1] for k, _ in types if k[0] == 1 and 0 < k[1] < 1000})
si = {s: i for i, s in enumerate(sizes)}
M, S, NT = len(classes), len(sizes), len(types)


def fits(t, m):
    (g, _, cpu, mem, spec), ((model, gpus, ncpu, nmem), _) = t, classes[m]
    return cpu <= ncpu and mem <= nmem and g <= gpus and (not spec or model in spec.split("|"))


xs = [(ti, m) for ti, (t, _) in enumerate(types) for m in range(M) if fits(t, m)]
pats = [(m, tuple(1000 // s if j == i else 0 for j in range(S)))
        for m in range(M) if classes[m][0][1] > 0 for i, s in enumerate(sizes)]
R_TYPE, R_CPU, R_MEM, R_GPU, R_SIZE = 0, NT, NT + M, NT + 2 * M, NT + 3 * M
R_NODE = R_SIZE + M * S
ROWS = R_NODE + M


def solve():
    A = lil_matrix((ROWS, len(xs) + len(pats)))
    b, c = np.zeros(ROWS), np.zeros(len(xs) + len(pats))
    for j, (ti, m) in enumerate(xs):
        (g, milli, cpu, mem, _), _ = types[ti]
        A[R_TYPE + ti, j], A[R_CPU + m, j], A[R_MEM + m, j] = 1, cpu, mem
        if milli == 1000:
            A[R_GPU + m, j] = g
            if 2 * g > classes[m][0][1]:
                A[R_NODE + m, j] = 1  # at most one such pod per node
        elif g == 1:
            A[R_SIZE + m * S + si[milli], j] = 1
        c[j] = -g * milli
    for k, (m, cnt) in enumerate(pats):
        A[R_GPU + m, len(xs) + k] = 1
        for i, n in enumerate(cnt):
            if n:
                A[R_SIZE + m * S + i, len(xs) + k] = -n
    for ti, (_, n) in enumerate(types):
        b[R_TYPE + ti] = n
    for m, ((_, g, ncpu, nmem), nn) in enumerate(classes):
        b[R_CPU + m], b[R_MEM + m], b[R_GPU + m], b[R_NODE + m] = ncpu * nn, nmem * nn, g * nn, nn
    A = csr_matrix(A)
    eq = [ti for ti, (t, _) in enumerate(types) if t[0] == 0]  # CPU-only pods: all placed
    ub = [r for r in range(ROWS) if r not in set(eq)]
    res = linprog(c, A_ub=A[ub], b_ub=b[ub], A_eq=A[eq], b_eq=b[eq], bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    duals = np.zeros(ROWS)
    duals[ub] = res.ineqlin.marginals
    return res, duals


while True:
    res, duals = solve()
    added = 0
    for m in range(M):
        if classes[m][0][1] == 0:
            continue
        v = [-duals[R_SIZE + m * S + i] for i in range(S)]
        best, take = np.zeros(1001), [-1] * 1001
        for cc in range(1, 1001):
            best[cc] = best[cc - 1]
            for i, s in enumerate(sizes):
                if s <= cc and best[cc - s] + v[i] > best[cc] + 1e-12:
                    best[cc], take[cc] = best[cc - s] + v[i], i
        if best[1000] > -duals[R_GPU + m] + 1e-7:
            cnt, cc = [0] * S, 1000
            while cc > 0:
                if take[cc] < 0:
                    cc -= 1
                else:
                    cnt[take[cc]] += 1
                    cc -= sizes[take[cc]]
            if (m, tuple(cnt)) not in pats:
                pats.append((m, tuple(cnt)))
                added += 1
    if not added:
        break

alloc = -res.fun / cap * 100
print(f"{name} at {load * 100:.0f} % arrived: at most {alloc:.2f} % of GPU capacity allocated "
      f"(at least {min(load * 100, 100) - alloc:.2f} % of capacity left unallocated)")
placed = collections.defaultdict(float)
for j, (ti, _) in enumerate(xs):
    placed[ti] += res.x[j]
away, arrived = collections.defaultdict(float), collections.defaultdict(float)
for ti, (t, n) in enumerate(types):
    away[t[:2]] += n - placed[ti]
    arrived[t[:2]] += n
print("turned away (GPUs, thousandths per GPU): pods of those arrived")
for k in sorted(away):
    if away[k] > 0.5:
        print(f"  {k}: {away[k]:.1f} of {arrived[k]:.1f} ({away[k] * k[0] * k[1] / cap * 100:.2f} % of capacity)")
print("share patterns (GPUs filled that way):")
agg = collections.defaultdict(float)
for k, (m, cnt) in enumerate(pats):
    agg[tuple(s for i, s in enumerate(sizes) for _ in range(cnt[i]))] += res.x[len(xs) + k]
for pat, v in sorted(agg.items(), key=lambda kv: -kv[1])[:12]:
    if v > 0.5:
        print(f"  {pat}: {v:.1f}")
print("node classes: CPU used, GPUs used")
for m, ((model, g, ncpu, _), nn) in enumerate(classes):
    cpu = sum(types[ti][0][2] * res.x[j] for j, (ti, mm) in enumerate(xs) if mm == m)
    gpu = sum(types[ti][0][0] * res.x[j] for j, (ti, mm) in enumerate(xs)
              if mm == m and types[ti][0][1] == 1000)
    gpu += sum(res.x[len(xs) + k] for k, (mm, _) in enumerate(pats) if mm == m)
    print(f"  {nn:4d} x {model} {g} GPUs {ncpu // 1000} cores: CPU {cpu / (ncpu * nn) * 100:.0f} %, GPUs {gpu / (g * nn) * 100:.0f} %")
