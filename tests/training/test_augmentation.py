"""Random-shift augmentation reaches training (and only training) in every method that has it.

The training loop keeps the policy itself in eval mode and puts only the stage's network in training mode; an
augmentation gated on the policy's own mode would never run (until 2026-11-27 it never did)."""

from __future__ import annotations

import json

import pytest

from dapolicy.policies import dp_c, fm, pi0
from dapolicy.train import train
from dapolicy.training.config import TrainConfig

SHIFTERS = {"fm": fm, "dap": fm, "dp-c": dp_c, "dp-t": dp_c, "pi0": pi0}


def counting_shift(monkeypatch, module) -> dict[str, int]:
    calls = {"n": 0}
    real = module.random_shift

    def shift(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "random_shift", shift)
    return calls


@pytest.mark.parametrize("method", sorted(SHIFTERS))
def test_training_augments_the_images_unless_told_not_to(method, square_store, tmp_path, monkeypatch):
    calls = counting_shift(monkeypatch, SHIFTERS[method])
    common = dict(method=method, config="tiny", steps=3, threads=1, progress=False, batch_size=4, device="cpu",
                  overrides=["obs_encoder=resnet"] if method in ("fm", "dap") else None)
    run = train(square_store, tmp_path / "on", **common)
    assert calls["n"] >= 3  # at least once per policy step
    assert json.loads((run / "config.json").read_text())["train"]["augment"] is True
    calls["n"] = 0
    run = train(square_store, tmp_path / "off", augment=False, **common)
    assert calls["n"] == 0
    assert json.loads((run / "config.json").read_text())["train"]["augment"] is False


def test_inference_never_augments(square_store, tmp_path, monkeypatch):
    import numpy as np

    from dapolicy.policies import load_pretrained

    run = train(square_store, tmp_path / "run", method="fm", config="tiny", steps=2, threads=1, progress=False,
                batch_size=4, device="cpu", overrides=["obs_encoder=resnet"])
    calls = counting_shift(monkeypatch, fm)
    policy = load_pretrained(run / "model")
    policy.policy_net.train()  # even a network left in training mode is not augmented at inference
    t_o = policy.n_obs_steps
    policy.predict_chunk({"images": np.zeros((2, t_o, 1, 32, 32, 3), np.uint8), "proprio": np.zeros((2, t_o, 2))})
    assert calls["n"] == 0


def test_a_run_stored_before_the_switch_resumes_without_augmentation():
    assert TrainConfig.from_dict({"warmup_steps": 5}).augment is False  # it trained without: it goes on without
    assert TrainConfig.from_dict(TrainConfig().to_dict()).augment is True
