"""Held-out demo-action error of trained runs, averaged over noise seeds (docs/results.md, section 1).

Every run is scored on the same validation windows of the first run's data, in the first run's action units,
in its default sampling mode and (DAP) in mode `off`:

    python benchmarks/alignment/action_error.py RUN [RUN ...] [--windows 256] [--seeds 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dapolicy import diagnose as dg
from dapolicy.data.sampler import WindowSampler
from dapolicy.policies.registry import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (the first one's data and units are used)")
    parser.add_argument("--windows", type=int, default=256, help="held-out windows")
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per run and mode")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = load_pretrained(f"{args.runs[0]}/model")
    data, _, _ = dg.validation_episodes(args.runs[0], None, None)
    dims = dg.ChunkDims.of(ref)
    sampler = WindowSampler(data.episode_ends, n_obs=dims.n_obs_steps, horizon=dims.horizon,
                            next_obs_offset=dims.next_obs_offset)
    batch = sampler.gather(data.arrays(), dg.choose_windows(len(sampler), args.windows, 0))
    obs = {"images": batch["images"], "proprio": batch["proprio"]}
    valid = ~np.asarray(batch["action_is_pad"], bool)
    demo = dg._normalized_actions(ref, batch["action"])
    print("run | mode | action MSE vs demo (mean +- s.e. over noise seeds)")
    for run in args.runs:
        policy = load_pretrained(f"{run}/model")
        for mode in [None] + (["off"] if policy.capabilities.predicts_next_obs else []):
            errors = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                actions = policy.predict_chunk(obs, **({"mode": mode} if mode else {})).actions
                errors.append(dg._masked_mse(dg._normalized_actions(ref, actions), demo, valid).mean())
            print(f"{run} | {mode or 'default'} | {np.mean(errors):.4f} +- {np.std(errors) / np.sqrt(len(errors)):.4f}")


if __name__ == "__main__":
    main()
