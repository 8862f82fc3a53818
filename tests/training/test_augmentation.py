"""Random-shift augmentation reaches training (and only training) in every method that has it.

The training loop keeps the policy itself in eval mode and puts only the stage's network in training mode; an
augmentation gated on the policy's own mode would never run (until 2026-11-27 it never did)."""

from __future__ import annotations

import json

import pytest

from dapolicy.policies import base
from dapolicy.train import train
from dapolicy.training.config import TrainConfig

METHODS = ("dap", "dp-c", "dp-t", "fm", "pi0")  # every method with image augmentation


def counting_shift(monkeypatch, module) -> dict[str, int]:
    calls = {"n": 0}
    real = module.random_shift

    def shift(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "random_shift", shift)
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_training_augments_the_images_unless_told_not_to(method, square_store, tmp_path, monkeypatch):
    calls = counting_shift(monkeypatch, base)
    common = dict(method=method, config="tiny", steps=3, threads=1, progress=False, batch_size=4, device="cpu",
                  overrides=["obs_encoder=resnet"] if method in ("fm", "dap") else None)
    run = train(square_store, tmp_path / "on", **common)
    assert calls["n"] >= 3  # at least once per policy step
    assert json.loads((run / "config.json").read_text())["train"]["augment"] is True
    calls["n"] = 0
    run = train(square_store, tmp_path / "off", augment=False, **common)
    assert calls["n"] == 0
    assert json.loads((run / "config.json").read_text())["train"]["augment"] is False


def test_validation_and_inference_never_augment(square_store, tmp_path, monkeypatch):
    import numpy as np
    import torch

    from dapolicy.policies import load_pretrained

    calls = counting_shift(monkeypatch, base)
    run = train(square_store, tmp_path / "run", method="fm", config="tiny", steps=3, threads=1, progress=False,
                batch_size=4, device="cpu", overrides=["obs_encoder=resnet"])
    assert calls["n"] == 3  # one per training step; the validation loss at the end of the stage adds none
    policy = load_pretrained(run / "model")
    t_o = policy.n_obs_steps
    obs = {"images": np.zeros((2, t_o, 1, 32, 32, 3), np.uint8), "proprio": np.zeros((2, t_o, 2), np.float32)}
    calls["n"] = 0
    policy.policy_net.train()  # left in training mode: inference puts it in eval mode first
    policy.predict_chunk(obs)
    assert calls["n"] == 0
    batch = {"images": torch.zeros(2, t_o, 1, 32, 32, 3, dtype=torch.uint8), "proprio": torch.zeros(2, t_o, 2)}
    policy.observation_tokens(batch, augment=True)  # asked to, but the network is not training
    assert calls["n"] == 0
    policy.policy_net.train()
    policy.observation_tokens(batch, augment=True)
    assert calls["n"] == 1


def test_a_run_stored_before_the_switch_resumes_without_augmentation():
    assert TrainConfig.from_dict({"warmup_steps": 5}).augment is False  # it trained without: it goes on without
    assert TrainConfig.from_dict(TrainConfig().to_dict()).augment is True
