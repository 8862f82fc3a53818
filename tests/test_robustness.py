"""`dap robustness` on a tiny untrained policy: one evaluate() per (run, strength), a PNG and its JSON; and
`evaluate(ood=...)` with strengths and the blind control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SQUARE_SPEC, SquareEnv

import dapolicy.evaluate as ev
from dapolicy.envs.perturbations import BLIND_GREY
from dapolicy.robustness import parse_strengths, perturbation_kind, robustness, run_label


class RecordingSquareEnv(SquareEnv):
    """SquareEnv that remembers the OOD config it was built with (the evaluator's env factory)."""

    built: list = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        RecordingSquareEnv.built.append(kwargs.get("ood"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    from dapolicy.policies import make_policy

    root = tmp_path_factory.mktemp("robust")
    out = []
    for name in ("run_a", "run_b"):
        policy = make_policy("fm", SQUARE_SPEC, size="tiny")
        policy.save_pretrained(root / name / "model")
        out.append(root / name)
    return out


def test_robustness_writes_curve_png_and_json(runs, tmp_path):
    RecordingSquareEnv.built.clear()
    out = tmp_path / "curve.png"
    report = robustness(runs, "light", [1.0, 0.0], episodes=2, out=out, seed=7, max_steps=3,
                        env_factory=RecordingSquareEnv, progress=False)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["ood"] == "light" and saved["strengths"] == [0.0, 1.0] and saved["episode_seeds"] == [7, 8]
    assert [c["label"] for c in saved["runs"]] == ["fm run_a", "fm run_b"]
    for curve in saved["runs"]:
        assert [p["strength"] for p in curve["points"]] == [0.0, 1.0]
        for p in curve["points"]:
            assert p["n_episodes"] == 2 and 0.0 <= p["ci95"][0] <= p["success_rate"] <= p["ci95"][1] <= 1.0
    # every point is an ordinary evaluation, with its own result file
    assert [(c.kind, c.strength) for c in RecordingSquareEnv.built] == [("light", 0.0), ("light", 1.0)] * 2
    for run in runs:
        names = {p.name for p in (run / "eval").iterdir()}
        assert {"light@0.json", "light@1.json"} <= names
        assert json.loads((run / "eval" / "light@0.json").read_text())["ood_strength"] == 0.0


def test_robustness_cli(runs, tmp_path, monkeypatch, capsys):
    from dapolicy.cli import main

    monkeypatch.setattr(ev, "make_env", RecordingSquareEnv)
    out = tmp_path / "sub" / "novel.png"
    assert main(["robustness", str(runs[0]), "--ood", "novel-object", "--strengths", "0,2", "--episodes", "1",
                 "--max-steps", "2", "--out", str(out)]) == 0
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["ood"] == "novel_object"
    assert "fm run_a" in capsys.readouterr().out
    assert main(["robustness", str(runs[0]), "--ood", "blind", "--out", str(out)]) == 2
    assert "no" in capsys.readouterr().err
    assert main(["robustness", str(runs[0]), "--ood", "light", "--strengths", "0,abc", "--out", str(out)]) == 2
    assert "'abc'" in capsys.readouterr().err


def test_argument_errors_name_the_problem(runs):
    assert parse_strengths("1, 0,0.5,1") == [0.0, 0.5, 1.0]
    for text, word in (("0,abc", "'abc'"), ("-1", ">= 0"), (",", "no strength"), ("inf", "finite")):
        with pytest.raises(ValueError, match=word):
            parse_strengths(text)
    assert perturbation_kind("Novel-Object") == "novel_object"
    with pytest.raises(ValueError, match="sparkle"):
        perturbation_kind("sparkle")
    with pytest.raises(ValueError, match="--strengths"):
        perturbation_kind("light:0.5")
    with pytest.raises(ValueError, match="'none' has none"):
        perturbation_kind("none")
    assert run_label(runs[0] / "model", "dap") == "dap run_a"


def test_evaluate_strength_names_and_blind_control(runs, tmp_path):
    from dapolicy.policies.registry import load_pretrained

    policy = load_pretrained(runs[0])
    seen: list[np.ndarray] = []
    original = policy.predict_chunk

    def recording(obs, **kwargs):
        seen.append(np.asarray(obs["images"]).copy())
        return original(obs, **kwargs)

    policy.predict_chunk = recording
    RecordingSquareEnv.built.clear()
    kw = dict(episodes=1, videos=0, max_steps=2, out_dir=tmp_path, policy=policy, env_factory=RecordingSquareEnv,
              progress=False)
    res = ev.evaluate(runs[0], ood="distractor:0.5", **kw)
    assert (res["name"], res["ood"], res["ood_kind"], res["ood_strength"]) == ("distractor@0.5", "distractor@0.5",
                                                                             "distractor", 0.5)
    assert (tmp_path / "distractor@0.5.json").is_file()
    assert not np.all(seen[-1] == BLIND_GREY)
    seen.clear()
    res = ev.evaluate(runs[0], ood="blind", **kw)
    assert res["name"] == "blind" and (tmp_path / "blind.json").is_file()
    assert RecordingSquareEnv.built[-1].kind == "none"  # the env itself is untouched
    assert seen and all(np.all(images == BLIND_GREY) for images in seen)  # the policy saw grey frames only
    with pytest.raises(ValueError, match="not a number"):
        ev.evaluate(runs[0], ood="light:abc", **kw)


def test_curves_default_to_validation_episodes(runs, tmp_path):
    """A curve is how OOD strengths are chosen, and choices are made on validation seeds, never test seeds."""
    report = robustness(runs[:1], "light", [0.0], episodes=2, out=tmp_path / "c.png", max_steps=3,
                        env_factory=RecordingSquareEnv, progress=False)
    assert report["episode_seeds"] == [300000, 300001]
