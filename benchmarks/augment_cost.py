"""What random-shift augmentation costs per training step: FM `small` (16-wide ResNet-GN, two 64-px cameras,
batch 64), loss + backward with and without it, interleaved in one process so that machine noise hits both.

    python benchmarks/augment_cost.py [--reps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dapolicy.policies.registry import make_config, make_policy
from dapolicy.spec import EnvSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = EnvSpec(name="timing", cameras=("a", "b"), image_size=64, action_dim=4, proprio_dim=4, max_steps=10,
                   action_low=(-1.0,) * 4, action_high=(1.0,) * 4)
    policy = make_policy("fm", spec, make_config("fm", "small", ["obs_encoder=resnet", "resnet.width=16"]))
    rng = np.random.default_rng(0)
    policy.action_normalizer.fit(rng.standard_normal((100, 4)).astype(np.float32), "action")
    policy.proprio_normalizer.fit(rng.standard_normal((100, 4)).astype(np.float32), "proprio")
    policy.eval()
    policy.policy_net.train()  # as the training loop leaves them
    b = 64
    batch = {"images": torch.randint(0, 255, (b, 2, 2, 64, 64, 3), dtype=torch.uint8), "proprio": torch.randn(b, 2, 4),
             "action": torch.randn(b, 16, 4), "action_is_pad": torch.zeros(b, 16, dtype=torch.bool)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.reps + 1):  # the first round warms up
        for augment in (True, False):
            policy.augment_in_training = augment
            start = time.perf_counter()
            policy.compute_loss(batch, "policy")["loss"].backward()
            times[augment].append(time.perf_counter() - start)
    on, off = float(np.median(times[True][1:])), float(np.median(times[False][1:]))
    print(f"policy step with augmentation {on * 1e3:.0f} ms, without {off * 1e3:.0f} ms: ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
