import pytest

from dapolicy.policies.base import StagePreset
from dapolicy.training.config import TrainConfig, parse_steps

STAGES = ("vae", "dynamics", "policy")


def test_parse_steps_forms() -> None:
    assert parse_steps(None, STAGES) == {}
    assert parse_steps("50", STAGES) == {"vae": 50, "dynamics": 50, "policy": 50}
    assert parse_steps("50", ("policy",)) == {"policy": 50}
    assert parse_steps(7, ("vae", "policy")) == {"vae": 7, "policy": 7}
    assert parse_steps("vae=900, dynamics=1500,policy=2200", STAGES) == {"vae": 900, "dynamics": 1500, "policy": 2200}
    assert parse_steps({"policy": 3}, STAGES) == {"policy": 3}
    assert parse_steps("policy=3", ("policy",), known=STAGES) == {"policy": 3}


@pytest.mark.parametrize("bad", ["x", "vae=", "foo=3", "vae=-1", "vae=1.5", "-4"])
def test_parse_steps_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_steps(bad, STAGES)


def test_presets_and_validation() -> None:
    small = TrainConfig.preset("small")
    assert small.steps == {} and small.weight_decay == 1e-6 and small.warmup_steps == 100 and small.grad_clip == 1.0
    preset = StagePreset(steps=2200, lr=3e-4, batch_size=64)
    assert small.budget("policy", preset) == (2200, 3e-4, 64)
    override = TrainConfig(steps={"policy": 5}, lr={"policy": 1e-3}, stage_batch_size={"policy": 2})
    assert override.budget("policy", preset) == (5, 1e-3, 2) and override.budget("vae", preset) == (2200, 3e-4, 64)
    assert TrainConfig.preset("tiny").log_interval == 5
    with pytest.raises(ValueError):
        StagePreset(steps=1, lr=1e-3, batch_size=0)
    with pytest.raises(ValueError):
        TrainConfig(lr={"policy": 0.0})
    with pytest.raises(ValueError):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError):
        TrainConfig(logger="mlflow")
    with pytest.raises(ValueError):
        TrainConfig(steps={"vae": -3})


def test_round_trip_and_overrides() -> None:
    cfg = TrainConfig.preset("tiny")
    back = TrainConfig.from_dict({**cfg.to_dict(), "unknown_future_key": 1})
    assert back == cfg
    assert cfg.with_overrides(amp=None, threads=1).threads == 1
    assert cfg.with_overrides(amp=None).amp == cfg.amp


def test_stage_batch_sizes_and_auto_threads() -> None:
    from dapolicy.policies import make_config
    from dapolicy.training.config import auto_threads

    presets = make_config("dap", "small").training
    assert presets.vae.batch_size == 32 and presets.policy.batch_size == 64
    assert parse_steps("vae=16", STAGES, what="--batch-size") == {"vae": 16}
    with pytest.raises(ValueError, match="--batch-size"):
        parse_steps("x", STAGES, what="--batch-size")
    with pytest.raises(ValueError):
        TrainConfig(stage_batch_size={"vae": 0})
    assert auto_threads() >= 1
