"""Interleaved per-chunk latency (K = 10, batch 1, 1 torch thread): DAP gated (the default since 2026-11-28) vs
DAP joint (the default before) vs FM, `small`, random weights. Usage: python benchmarks/latency/gated_vs_joint.py
[OUT.json]. The ratios are the result; absolute times depend on the machine and its load."""
import json
import os
import sys

import numpy as np
import torch

from dapolicy import bench
from dapolicy.info import default_spec
from dapolicy.policies import make_config
from dapolicy.policies.registry import make_policy

torch.set_num_threads(1)
spec = default_spec()
pols = {}
VARIANTS = [("dap-gated", "dap", []), ("dap-joint", "dap", ["unet.gated_dynamic_context=false"]), ("fm", "fm", [])]
for name, method, sets in VARIANTS:
    torch.manual_seed(0)
    policy = make_policy(method, spec, make_config(method, "small", sets)).eval()
    pols[name] = (policy, "jacobi" if method == "dap" else None)


def chunk(policy, obs, mode):
    return lambda: policy.predict_chunk(obs, mode=mode, steps=10)


cases = [bench.Case({"name": name}, chunk(p, bench.random_obs(p, 1, 1), mode)) for name, (p, mode) in pols.items()]
times = bench.time_interleaved(cases, 40, warmup=5)
out = {c.labels["name"]: {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))}
       for c, t in zip(cases, times)}
out["ratio_gated_over_joint"] = out["dap-gated"]["p50_ms"] / out["dap-joint"]["p50_ms"]
out["ratio_gated_over_fm"] = out["dap-gated"]["p50_ms"] / out["fm"]["p50_ms"]
out["ratio_joint_over_fm"] = out["dap-joint"]["p50_ms"] / out["fm"]["p50_ms"]
print(json.dumps(out, indent=1))
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump({**out, "load_avg_after": os.getloadavg()}, f, indent=1)
