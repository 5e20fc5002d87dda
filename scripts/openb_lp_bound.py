"""Lower bound on the GPU capacity any placement must leave idle when it places every
fractional-GPU pod of an openb pod list: the LP relaxation (Gilmore-Gomory, solved by
column generation) of packing the pods' GPU shares into whole GPUs. Memory, CPU, nodes and
GPU models are ignored, so the true optimum can only be worse.

    pip install scipy
    python3 scripts/openb_lp_bound.py [default|cpu050|gpushare40|...]

Prints the shares' total demand, the fewest GPUs that can hold them (LP bound) and the
capacity left over in those GPUs, as a percentage of the cluster's GPU capacity; also
first-fit-decreasing (offline, knowing every pod) for comparison.
"""
import collections, csv, os, sys

import numpy as np
from scipy.optimize import linprog

HERE = os.path.dirname(os.path.abspath(__file__))
T = os.path.join(HERE, "..", "..", "shared", "traces", "alibaba-gpu-v2023-openb")
name = sys.argv[1] if len(sys.argv) > 1 else "default"
pods = list(csv.DictReader(open(os.path.join(T, f"openb_pod_list_{name}.csv"))))
nodes = list(csv.DictReader(open(os.path.join(T, "openb_node_list_gpu_node.csv"))))
cap = sum(int(n["gpu"]) for n in nodes) * 1000
frac = [int(p["gpu_milli"]) for p in pods if int(p["num_gpu"]) == 1 and int(p["gpu_milli"]) < 1000]
d = collections.Counter(frac)
sizes = sorted(d)
dem = np.array([d[s] for s in sizes], float)
B = 1000
pats = []
for i, s in enumerate(sizes):
    a = np.zeros(len(sizes))
    a[i] = min(B // s, d[s])
    pats.append(a)
while True:
    A = np.array(pats).T
    res = linprog(np.ones(A.shape[1]), A_ub=-A, b_ub=-dem, bounds=(0, None), method="highs")
    y = -res.ineqlin.marginals
    # Pricing: a bounded knapsack over the duals finds the most valuable new pattern.
    val = np.zeros(B + 1)
    take = [[0] * len(sizes) for _ in range(B + 1)]
    for i, s in enumerate(sizes):
        for _ in range(min(B // s, d[s])):
            for c in range(B, s - 1, -1):
                if val[c - s] + y[i] > val[c] + 1e-12:
                    val[c] = val[c - s] + y[i]
                    take[c] = take[c - s][:]
                    take[c][i] += 1
    c = int(np.argmax(val))
    if val[c] <= 1 + 1e-9:
        break
    pats.append(np.array(take[c], float))
bins = []
for s in sorted(frac, reverse=True):
    for i, b in enumerate(bins):
        if b + s <= B:
            bins[i] += s
            break
    else:
        bins.append(s)
pct = lambda x: x * 100 / cap
total = sum(int(p["num_gpu"]) * int(p["gpu_milli"]) for p in pods)
# The bound holds at 100 % arrived load only if the whole list has arrived by then, that
# is when the list asks for at most the cluster's capacity.
print(f"{name}: the list asks for {pct(total):.2f} % of GPU capacity; {len(frac)} GPU-share pods, {pct(sum(frac)):.2f} % of GPU capacity; "
      f"LP bound {res.fun:.1f} GPUs -> at least {pct(res.fun * B - sum(frac)):.2f} % idle in them; "
      f"first-fit decreasing {len(bins)} GPUs -> {pct(len(bins) * B - sum(frac)):.2f} %")
