import pytest

from dapolicy.training.config import DEFAULT_STEPS, TrainConfig, parse_steps


def test_parse_steps_forms() -> None:
    assert parse_steps(None) == {}
    assert parse_steps("50") == {"vae": 50, "dynamics": 50, "policy": 50}
    assert parse_steps("50", ("policy",)) == {"policy": 50}
    assert parse_steps(7, ("vae", "policy")) == {"vae": 7, "policy": 7}
    assert parse_steps("vae=900, dynamics=1500,policy=2200") == {"vae": 900, "dynamics": 1500, "policy": 2200}
    assert parse_steps({"policy": 3}) == {"policy": 3}


@pytest.mark.parametrize("bad", ["x", "vae=", "foo=3", "vae=-1", "vae=1.5"])
def test_parse_steps_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_steps(bad)


def test_presets_and_validation() -> None:
    small = TrainConfig.preset("small")
    assert small.steps == DEFAULT_STEPS["small"] and small.batch_size == 64 and small.weight_decay == 1e-6
    assert small.lr_for("policy") == 3e-4 and small.warmup_steps == 100 and small.grad_clip == 1.0
    assert TrainConfig.preset("tiny", batch_size=2).batch_size == 2
    assert small.steps_for("unknown") == small.default_steps
    with pytest.raises(ValueError):
        TrainConfig.preset("huge")
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)
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
    assert cfg.with_overrides(batch_size=None, threads=1).threads == 1
    assert cfg.with_overrides(batch_size=None).batch_size == cfg.batch_size


def test_stage_batch_sizes_and_auto_threads() -> None:
    from dapolicy.training.config import auto_threads

    cfg = TrainConfig.preset("small")
    assert cfg.batch_for("vae") == 32 and cfg.batch_for("policy") == 64
    assert parse_steps("vae=16", what="--batch-size") == {"vae": 16}
    with pytest.raises(ValueError, match="--batch-size"):
        parse_steps("x", what="--batch-size")
    with pytest.raises(ValueError):
        TrainConfig(stage_batch_size={"vae": 0})
    assert auto_threads() >= 1
