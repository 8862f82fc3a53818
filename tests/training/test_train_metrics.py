import json

from dapolicy.training.metrics import MetricsLog, plot_losses, read_metrics


def test_metrics_log_truncate_and_plot(tmp_path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for stage in ("vae", "dynamics"):
        for step in (5, 10, 15):
            log.write({"kind": "train", "stage": stage, "step": step, "loss": 1.0 / step})
        log.write({"kind": "val", "stage": stage, "step": 15, "val_loss": 0.1})
        log.write({"kind": "stage_end", "stage": stage, "step": 15})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "tra')  # torn line from a kill mid-write
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 10
    log.truncate_after(("vae", "dynamics", "policy"), "dynamics", 10)
    kept = [(r["stage"], r["kind"], r["step"]) for r in log.records()]
    assert ("dynamics", "train", 10) in kept and ("dynamics", "train", 15) not in kept
    assert ("vae", "stage_end", 15) in kept and ("dynamics", "stage_end", 15) not in kept
    log.write({"kind": "train", "stage": "policy", "step": 1, "loss": float("nan")})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == "nan"
    plot_losses(log.records(), "vae", tmp_path / "plots" / "loss_vae.png")
    assert (tmp_path / "plots" / "loss_vae.png").stat().st_size > 1000
    plot_losses(log.records(), "absent", tmp_path / "plots" / "none.png")
    assert not (tmp_path / "plots" / "none.png").exists()


def test_optional_logger_is_never_required(tmp_path) -> None:
    import importlib.util

    import pytest

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ValueError, match="pip install tensorboard, or pass --logger none"):
        MetricsLog(tmp_path / "m.jsonl", logger="tensorboard")


def _fake_wandb(monkeypatch) -> list:
    """A stand-in `wandb` module recording init/log/finish calls (the real package is optional)."""
    import importlib.machinery
    import sys
    import types

    calls: list = []

    class Run:
        def log(self, values: dict) -> None:
            calls.append(("log", values))

        def finish(self, exit_code: int = 0) -> None:
            calls.append(("finish", exit_code))

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_project_and_finish(tmp_path, monkeypatch) -> None:
    calls = _fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    log = MetricsLog(tmp_path / "a.jsonl", logger="wandb")
    log.write({"kind": "train", "stage": "vae", "step": 1, "loss": 0.5})
    log.close()
    log.close()  # idempotent
    assert calls[0][1]["project"] == "dapolicy" and calls[-1] == ("finish", 0)
    assert [c[0] for c in calls] == ["init", "log", "finish"]
    calls.clear()
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    MetricsLog(tmp_path / "b.jsonl", logger="wandb").close(failed=True)
    assert calls == [("init", calls[0][1]), ("finish", 1)] and calls[0][1]["project"] == "from-env"
    calls.clear()
    MetricsLog(tmp_path / "c.jsonl", logger="wandb", wandb_project="mine").close()
    assert calls[0][1]["project"] == "mine"


def test_training_finishes_the_wandb_run(tmp_path, monkeypatch, square_store) -> None:
    from dapolicy.cli import main

    calls = _fake_wandb(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--data", str(square_store), "--out", str(out), "--method", "fm", "--config", "tiny",
                 "--steps", "1", "--threads", "1", "--quiet", "--logger", "wandb", "--wandb-project", "p"]) == 0
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[-1] == ("finish", 0)
    assert json.loads((out / "config.json").read_text())["train"]["wandb_project"] == "p"
