"""How much of a policy's cross-attention goes to the next-observation tokens, per U-Net attention layer.

DAP's policy attends to its current observation (image and proprio tokens) and to the predicted next
observation (or the learned null tokens when there is none); FM's attends to the current observation only.
This measures, on held-out expert windows, the share of each layer's softmax mass that lands on the
next-observation tokens, with the null tokens and with the real next frames, beside the share a uniform
attention would give. A policy can attend to tokens whose content it ignores: a share well above zero with
the *constant* null tokens means they serve as a place to put attention (a "register" or "sink"), not as
information. For FM the share is 0 and only the peak weight on a single observation token is reported.

    python benchmarks/cpu/attention_share.py RUN [RUN ...] [--windows 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from dapolicy.data.sampler import WindowSampler
from dapolicy.diagnose import choose_windows, validation_episodes
from dapolicy.evaluate import ChunkDims, load_policy

TAUS = (0.05, 0.5, 0.95)


class AttentionRecorder:
    """Forward pre-hooks on every cross-attention layer of a U-Net: the softmax weights [B, heads, H, M]."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.weights: list[torch.Tensor] = []
        self._handles = [layer.register_forward_pre_hook(self._record, with_kwargs=True) for layer in layers]

    def _record(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = args[0]
        keys = torch.cat([k for k, _ in kwargs["kv"]], dim=2)  # [B, heads, M, d]
        b, n, d = tokens.shape
        q = layer.q(tokens).view(b, n, layer.heads, d // layer.heads).transpose(1, 2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        self.weights.append(torch.softmax(scores, dim=-1))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def measure(run: str, windows: int, seed: int) -> dict:
    policy = load_policy(run, "cpu")
    data, _, _ = validation_episodes(run, None, None)
    dims = ChunkDims.of(policy)
    sampler = WindowSampler(data.episode_ends, n_obs=dims.n_obs_steps, horizon=dims.horizon,
                            next_obs_offset=dims.next_obs_offset)
    batch = sampler.gather(data.arrays(), choose_windows(len(sampler), windows, seed))
    obs = policy.encode_observation(policy.validate_obs({"images": batch["images"], "proprio": batch["proprio"]}),
                                     need_latents=False)
    tokens = policy.observation_tokens(obs, augment=False)
    b, n_static = tokens.shape[:2]
    conditions: dict[str, torch.Tensor | None] = {"none": None}
    if policy.policy_net.with_next_obs:
        conditions = {"null": policy.next_observation_tokens(None, b),
                      "real": policy.next_observation_tokens(policy.encode_latents(batch["next_images"]), b)}
    unet = policy.policy_net.unet
    recorder = AttentionRecorder(unet.context_layers())
    generator = torch.Generator().manual_seed(seed)
    out: dict = {"run": run, "windows": int(b), "static_tokens": int(n_static), "conditions": {}}
    try:
        for name, next_tokens in conditions.items():
            n_next = 0 if next_tokens is None else next_tokens.shape[1]
            share, peak = [], []
            for tau in TAUS:
                recorder.weights.clear()
                x = torch.randn(b, dims.horizon, policy.spec.action_dim, generator=generator)
                unet(x, torch.full((b,), tau), static_tokens=tokens, dynamic_tokens=next_tokens)
                share.append([float(w[..., n_static:].sum(-1).mean()) for w in recorder.weights])
                peak.append([float(w[..., :n_static].max(-1).values.mean()) for w in recorder.weights])
            out["conditions"][name] = {"next_tokens": n_next, "uniform_share": n_next / (n_static + n_next),
                                       "share_per_layer": np.mean(share, axis=0).round(3).tolist(),
                                       "peak_static_weight_per_layer": np.mean(peak, axis=0).round(3).tolist()}
    finally:
        recorder.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (or their model/ folders)")
    p.add_argument("--windows", type=int, default=64, help="held-out expert windows per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = []
    for run in args.runs:
        r = measure(run, args.windows, args.seed)
        results.append(r)
        for name, c in r["conditions"].items():
            print(f"{run} [{name}]: share on next tokens {c['share_per_layer']} (uniform {c['uniform_share']:.3f}); "
                  f"peak weight on one observation token {c['peak_static_weight_per_layer']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
