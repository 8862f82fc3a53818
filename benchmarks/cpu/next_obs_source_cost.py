"""What each training-time next-observation source costs per DAP policy step: loss + backward of a trained DAP
model at batch 64 with `next_obs_mix` set to 90% of one source (10% null), interleaved in one process so that
machine noise hits every source alike. Random frames and latents: the cost does not depend on the content.

    python benchmarks/cpu/next_obs_source_cost.py RUN [--reps 6] [--threads 2]

RUN is a DAP run (or model) folder, e.g. W/runs/dap-resnet-6k-fg-imgread/pusht/s0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dapolicy.policies import NextObsMix, load_pretrained

SOURCES = ("dynamics", "rollout")


def random_batch(policy, batch_size: int) -> dict[str, torch.Tensor]:
    """A batch of the shapes the policy trains on (images, latents, next latents, proprio, action)."""
    g = torch.Generator().manual_seed(0)
    spec, t, h = policy.spec, policy.config.n_obs_steps, policy.config.horizon
    cams, size, lat = len(spec.cameras), spec.image_size, (policy.latent_channels, policy.latent_size,
                                                            policy.latent_size)
    return {"images": torch.randint(0, 255, (batch_size, t, cams, size, size, 3), generator=g, dtype=torch.uint8),
            "latents": torch.randn(batch_size, t, cams, *lat, generator=g),
            "next_latents": torch.randn(batch_size, cams, *lat, generator=g),
            "proprio": torch.randn(batch_size, t, spec.proprio_dim, generator=g),
            "action": torch.rand(batch_size, h, spec.action_dim, generator=g) * 2 - 1,
            "action_is_pad": torch.zeros(batch_size, h, dtype=torch.bool)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="DAP run or model folder")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_pretrained(args.run).train()
    if not hasattr(policy, "_rollout_estimate"):
        raise SystemExit(f"{args.run} is not a DAP model (no next-observation sources)")
    batch = random_batch(policy, args.batch)
    times: dict[str, list[float]] = {name: [] for name in SOURCES}
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for name in SOURCES:
            policy.config.next_obs_mix = NextObsMix(**{"ground_truth": 0.0, "dynamics": 0.0, "rollout": 0.0,
                                                       name: 0.9, "null": 0.1})
            torch.manual_seed(rep)
            start = time.perf_counter()
            policy.compute_loss(batch, "policy")["loss"].backward()
            policy.zero_grad(set_to_none=True)
            if rep:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["dynamics"])
    for name in SOURCES:
        median = statistics.median(times[name])
        print(f"{name:9s} median {median:.3f} s/step ({median / base:.2f}x the dynamics source), "
              f"steps {[round(x, 2) for x in times[name]]}")


if __name__ == "__main__":
    main()
