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
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "m.jsonl", logger="tensorboard")
