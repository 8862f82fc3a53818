"""Interleaved per-chunk latency (K = 10, Jacobi): DAP gated (the default since 2026-11-28) vs DAP joint (the
default before) vs FM, random weights of a named size, on a Meta-World-shaped task.

    python benchmarks/latency/gated_vs_joint.py [--config small] [--device cpu|cuda] [--batch 1,8] [--reps 40]
        [--out OUT.json]

On the CPU it runs with one torch thread (the fast sampler's batch-1 setting); on a GPU the sampler replays CUDA
graphs from the second call, as `dap bench latency` does. The ratios are the result; absolute times depend on
the machine and its load.
"""
import argparse
import json
import os

import torch

from dapolicy import bench
from dapolicy.atomic import write_json_atomic
from dapolicy.info import default_spec
from dapolicy.policies import make_config
from dapolicy.policies.registry import make_policy

VARIANTS = [("dap-gated", "dap", []), ("dap-joint", "dap", ["unet.gated_dynamic_context=false"]), ("fm", "fm", [])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    spec = default_spec()
    policies = {}
    for name, method, sets in VARIANTS:
        torch.manual_seed(0)
        policy = make_policy(method, spec, make_config(method, args.config, sets)).to(args.device).eval()
        policies[name] = (policy, "jacobi" if method == "dap" else None)
    cases = []
    for b in (int(x) for x in args.batch.split(",")):
        for name, (policy, mode) in policies.items():
            obs = bench.random_obs(policy, b, 1)
            cases.append(bench.Case({"name": name, "batch": b},
                                    lambda p=policy, o=obs, m=mode: p.predict_chunk(o, mode=m, steps=args.steps)))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    times = bench.time_interleaved(cases, args.reps, warmup=5, sync=sync)
    out: dict = {"config": args.config, "device": args.device, "steps": args.steps, "reps": args.reps,
                 "machine": bench.machine_info(args.device), "by_batch": {}}
    for c, t in zip(cases, times):
        row = out["by_batch"].setdefault(str(c.labels["batch"]), {})
        row[c.labels["name"]] = bench.latency_stats(t)
    for row in out["by_batch"].values():
        row["ratio_gated_over_joint"] = row["dap-gated"]["p50_ms"] / row["dap-joint"]["p50_ms"]
        row["ratio_gated_over_fm"] = row["dap-gated"]["p50_ms"] / row["fm"]["p50_ms"]
        row["ratio_joint_over_fm"] = row["dap-joint"]["p50_ms"] / row["fm"]["p50_ms"]
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out["by_batch"], indent=1))
    if args.out:
        write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
