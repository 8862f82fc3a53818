"""Paired rows (`paired_init`) are paired all the way through training, not only at initialisation.

The benchmark reads `dap-resnet-paired - fm-resnet-paired` as "what DAP's training adds". That holds when the two
runs of one seed share their initial weights (tests/policies/test_policy_net.py), their batches, and the flow
times, noise and augmentation drawn at every step. The last three come from the global generator, which the
training loop reseeds from (seed, stage, step) before each step (`training/loop.py`), and DAP draws them before
its own extra draws (the next-observation source, the dynamics model's estimate). So however much DAP's VAE and
dynamics model moved the generator while they were built, the policy stage's noisy action inputs match step for
step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dapolicy.nn.unet1d import CrossAttnUNet1D
from dapolicy.train import train

FAST = dict(config="tiny", threads=1, progress=False, batch_size=4, device="cpu", augment=True)
POLICY = ["obs_encoder=resnet", "paired_init=true"]


def policy_inputs(monkeypatch, store: Path, out: Path, method: str, seed: int) -> list[torch.Tensor]:
    """The noisy action chunks the policy U-Net was given during `method`'s policy stage (training steps and
    validation batches), in order."""
    seen: list[torch.Tensor] = []
    forward = CrossAttnUNet1D.forward

    def recording(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(CrossAttnUNet1D, "forward", recording)
    steps = {"vae": 2, "dynamics": 2, "policy": 3} if method == "dap" else {"policy": 3}
    train(store, out, method=method, seed=seed, steps=steps, overrides=POLICY, **FAST)
    monkeypatch.setattr(CrossAttnUNet1D, "forward", forward)
    return seen


def test_paired_dap_and_fm_runs_draw_the_same_flow_noise_at_every_step(monkeypatch, tmp_path, square_store):
    store = square_store
    fm = policy_inputs(monkeypatch, store, tmp_path / "fm", "fm", seed=0)
    dap = policy_inputs(monkeypatch, store, tmp_path / "dap", "dap", seed=0)
    assert len(fm) == len(dap) >= 3
    for a, b in zip(fm, dap):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other_seed = policy_inputs(monkeypatch, store, tmp_path / "fm1", "fm", seed=1)
    assert not torch.equal(fm[0], other_seed[0])  # the noise does depend on the seed
