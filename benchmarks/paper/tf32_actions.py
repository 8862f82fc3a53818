"""How far TF32 matmuls move the sampled actions (random weights; run on a GPU, where TF32 exists).

    PYTHONPATH=src python3 benchmarks/paper/tf32_actions.py [--config paper] [--device cuda] [--out F.json]

For DAP (Jacobi) and FM at K = 10, the same observation and the same noise are sampled with fp32 matmuls
("highest") and with TF32 ("high"); the report gives the largest and the mean absolute difference of the
unnormalised actions, next to the spread of the actions themselves (their std over the chunk), so a reader
sees whether TF32's speed (`dap bench latency --matmul-precision high`) costs anything a controller would notice.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from dapolicy.bench import build_policies, random_obs


def sampled(policy, obs: dict, precision: str, mode: str | None, seed: int) -> np.ndarray:
    torch.set_float32_matmul_precision(precision)
    out = []
    for _ in range(3):  # the third call replays a CUDA graph (captured at a signature's second use)
        torch.manual_seed(seed)
        out.append(np.asarray(policy.predict_chunk(obs, mode=mode, steps=10).actions, dtype=np.float64))
    assert all(np.allclose(out[0], o, atol=1e-5) for o in out[1:]), "same precision, same seed: actions differ"
    return out[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out")
    args = p.parse_args()
    report = {"config": args.config, "device": args.device, "batch": args.batch, "steps": 10, "cases": []}
    for name, policy in build_policies(args.config, args.device, ["dap", "fm"]).items():
        obs = random_obs(policy, args.batch, seed=1)
        mode = "jacobi" if name == "dap" else None
        fp32 = sampled(policy, obs, "highest", mode, seed=0)
        tf32 = sampled(policy, obs, "high", mode, seed=0)
        diff = np.abs(fp32 - tf32)
        case = {"method": name, "mode": mode or "default", "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()), "action_std": float(fp32.std()),
                "action_abs_max": float(np.abs(fp32).max())}
        report["cases"].append(case)
        print(case, flush=True)
    torch.set_float32_matmul_precision("highest")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
