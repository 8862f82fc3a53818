"""`dap bench`: per-chunk inference latency of every coupling mode, as ratios to the plain policy.

The machine is shared and noisy, so modes are timed interleaved (round-robin, same observation, batch 1)
in one process and reported as ratios to mode "off" (the policy without dynamics): DESIGN §4 asks for
coupled DAP <= 1.3x the plain flow policy at the same K.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from dapolicy.policies.coupling import COUPLING_MODES


def bench_modes(policy: Any, reps: int = 30, steps: int | None = None,
                modes: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Median/p90 ms per chunk for each mode on a random batch-1 observation; ratios to mode "off"."""
    modes = modes if modes is not None else policy.capabilities.modes
    if not modes:
        raise ValueError(f"method {policy.method!r} has no coupling modes to compare")
    rng = np.random.default_rng(seed)
    cfg, spec = policy.config, policy.spec
    obs = {"images": rng.integers(0, 256, (1, cfg.n_obs_steps, len(spec.cameras), spec.image_size,
                                           spec.image_size, 3), dtype=np.uint8),
           "proprio": rng.normal(size=(1, cfg.n_obs_steps, spec.proprio_dim)).astype(np.float32)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:  # warm-up
        policy.predict_chunk(obs, mode=m, steps=steps)
    for _ in range(reps):
        for m in modes:
            t0 = time.perf_counter()
            policy.predict_chunk(obs, mode=m, steps=steps)
            times[m].append((time.perf_counter() - t0) * 1e3)
    base = float(np.median(times["off"])) if "off" in times else None
    return {m: {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                "ratio_to_off": (float(np.median(t)) / base) if base else float("nan")}
            for m, t in times.items()}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (with model/) or a saved model folder")
    p.add_argument("--reps", type=int, default=30, help="timed chunks per mode (default 30)")
    p.add_argument("--flow-steps", type=int, default=None, help="K (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    from dapolicy.evaluate import load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy(args.run, "cpu")
    result = bench_modes(policy, reps=args.reps, steps=args.flow_steps)
    k = args.flow_steps or policy.config.flow.steps
    print(f"batch 1, K={k}, {torch.get_num_threads()} thread(s), {args.reps} chunks per mode (interleaved)")
    print("| mode | p50 ms | p90 ms | p50 / off |\n|---|---|---|---|")
    for mode, r in result.items():
        print(f"| {mode} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['ratio_to_off']:.2f}x |")
    return 0
