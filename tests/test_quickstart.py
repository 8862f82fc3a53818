"""`dap quickstart`'s output folder: a folder made with other settings is refused (its data and run would be
reused silently) unless --overwrite; no simulator runs here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dapolicy.quickstart import SETTINGS_FILE, QuickstartConfig, _check_out_dir


def test_same_settings_continue(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    _check_out_dir(out, QuickstartConfig(), overwrite=False)
    (out / "data").mkdir()  # a phase's output, kept by a rerun
    _check_out_dir(out, QuickstartConfig(threads=1, eval_episodes=5), overwrite=False)  # not part of the identity
    assert (out / "data").is_dir()
    assert json.loads((out / SETTINGS_FILE).read_text()) == QuickstartConfig().identity()


def test_other_settings_are_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    _check_out_dir(out, QuickstartConfig(), overwrite=False)
    (out / "data").mkdir()
    other = replace(QuickstartConfig(), seed=1, steps="vae=1,dynamics=1,policy=1")
    with pytest.raises(ValueError, match=r"other settings \(steps: .* seed: 0 -> 1\).*--overwrite"):
        _check_out_dir(out, other, overwrite=False)
    assert (out / "data").is_dir() and json.loads((out / SETTINGS_FILE).read_text())["seed"] == 0
    _check_out_dir(out, other, overwrite=True)
    assert not (out / "data").exists() and json.loads((out / SETTINGS_FILE).read_text())["seed"] == 1


def test_a_folder_that_is_not_a_quickstart_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a quickstart folder.*--overwrite"):
        _check_out_dir(out, QuickstartConfig(), overwrite=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_corrupt_settings_file_names_the_file(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    out.mkdir()
    (out / SETTINGS_FILE).write_text("{")
    with pytest.raises(ValueError, match=rf"{SETTINGS_FILE} is corrupt.*--overwrite"):
        _check_out_dir(out, QuickstartConfig(), overwrite=False)


def test_the_report_shows_the_prediction_gates_when_the_policy_has_them() -> None:
    from dapolicy.quickstart import _prediction_summary

    diag = {"final_psnr_vs_real": {"front": 20.0}, "psnr_copy_current": {"front": 19.0}}
    assert not any("gates" in line for line in _prediction_summary(diag))
    lines = _prediction_summary({**diag, "prediction_gates": [0.004, -0.012]})
    assert any("+0.004 -0.012" in line for line in lines)
    assert any("-0.012" in line for line in _prediction_summary({"prediction_gates": [-0.012]}))


def test_the_report_shows_the_change_the_prediction_explains() -> None:
    from dapolicy.quickstart import _prediction_summary

    diag = {"final_psnr_vs_real": {"front": 20.0}, "psnr_copy_current": {"front": 19.0}}
    assert _prediction_summary(diag)[2].endswith("| - |")  # an older diagnose.json without the figure
    diag["change_explained"] = {"true": {"front": 0.101}, "other": {"front": -0.37}, "vae": {"front": 0.625}}
    assert _prediction_summary(diag)[2].endswith("| +0.10 (0.62) |")  # one without the action's part
    diag["change_explained"].update(no_action={"front": 0.06}, action={"front": 0.041})
    assert _prediction_summary(diag)[2].endswith("| +0.10 / +0.04 (0.62) |")
