"""`dap diagnose` of a DAP run with the current images hidden from the policy, as `current_image_dropout`
trains it to expect for a share of its samples: can the policy then find the scene in the next frame?

Prints the demo-action error given the real next frame, another window's and none (the `next_obs_reliance`
block of `dap diagnose`); if the policy read the scene from the next frame, "real" would be far below the others.

    python benchmarks/alignment/hidden_images_reliance.py RUN OUT_DIR
"""

from __future__ import annotations

import json
import sys

import torch

from dapolicy.diagnose import diagnose, load_policy


def main(run: str, out: str) -> None:
    torch.set_num_threads(1)
    policy = load_policy(run, "cpu")
    tokens = policy.observation_tokens

    def images_hidden(batch, augment, image_keep=None):
        return tokens(batch, augment, image_keep=torch.zeros(batch["proprio"].shape[0], dtype=torch.bool))

    policy.observation_tokens = images_hidden
    result = diagnose(run, windows=64, out_dir=out, policy=policy)
    print(run, "current images hidden:", json.dumps(result["next_obs_reliance"]))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
