"""`dap benchmark --scoreboard`: where one row wins, ties and loses against the others."""

import json

import pytest
from conftest import copy_with_edited_cell

from dapolicy import benchmark as bm
from dapolicy.cli import main as cli_main
from dapolicy.compare import OOD_POOL
from dapolicy.scoreboard import markdown, scoreboard, verdict


def test_the_verdict_is_read_off_the_interval_and_needs_enough_seeds():
    assert verdict([0.01, 0.2], seeds=3) == "win"
    assert verdict([-0.2, -0.01], seeds=5) == "loss"
    assert verdict([-0.1, 0.1], seeds=3) == verdict([0.0, 0.1], seeds=3) == "tie"
    assert verdict([0.5, 0.9], seeds=2) == "too few seeds"
    assert verdict([0.5, 0.9], seeds=1, min_seeds=1) == "win"


def _set_outcomes(record, successes):
    record["episode_successes"] = [float(s) for s in successes]
    record["successes"] = int(sum(successes))


def test_scoreboard_gives_a_verdict_per_task_and_suite(smoke, tmp_path):
    folder, work = smoke
    # dap solves both in-distribution episodes, fm neither: a win for dap there, whatever the trained models did
    copy, _ = copy_with_edited_cell(folder, tmp_path / "a", "dap__button__s0__none.json",
                                    lambda r: _set_outcomes(r, [1, 1]))
    path = copy / "cells" / "test" / "fm__button__s0__none.json"
    record = json.loads(path.read_text())
    _set_outcomes(record, [0, 0])
    path.write_text(json.dumps(record))
    suite = bm.load_suite(copy / "suite.toml")

    board = scoreboard(suite, "dap", ["fm"], work=work, min_seeds=1)
    by = {(e["task"], e["suite"]): e for e in board["entries"]}
    assert set(by) == {("button", "none"), ("button", OOD_POOL)}  # the single OOD suite appears only pooled
    assert by[("button", "none")]["difference"] == 1.0 and by[("button", "none")]["verdict"] == "win"
    assert by[("button", "none")]["metric"] == "success" and by[("button", "none")]["seeds"] == 1
    assert board["tally"]["fm"]["win"] >= 1
    assert scoreboard(suite, "fm", ["dap"], work=work, min_seeds=1)["entries"][0]["verdict"] == "loss"
    # the protocol's default: one training seed supports no claim
    assert {e["verdict"] for e in scoreboard(suite, "dap", ["fm"], work=work)["entries"]} == {"too few seeds"}
    text = markdown(board)
    assert "| button | in distribution | +100.0 [+100.0, +100.0] **win** (1) |" in text
    assert "| `fm` | " in text


def test_scoreboard_errors_name_the_problem(smoke):
    folder, work = smoke
    suite = bm.load_suite(folder / "suite.toml")
    with pytest.raises(bm.SuiteError, match="no row 'nope'"):
        scoreboard(suite, "nope", ["fm"], work=work)
    with pytest.raises(bm.SuiteError, match="no row 'nope'"):
        scoreboard(suite, "dap", ["nope"], work=work)
    with pytest.raises(bm.SuiteError, match="--against"):  # the smoke suite has no [headline] to default to
        scoreboard(suite, "dap", work=work)
    with pytest.raises(bm.SuiteError, match="no task 'elsewhere'"):
        scoreboard(suite, "dap", ["fm"], tasks=["elsewhere"], work=work)
    with pytest.raises(bm.SuiteError, match="shares no finished cell"):  # the smoke suite trains seed 0 only
        scoreboard(suite, "dap", ["fm"], work=work, seeds=[1])
    assert scoreboard(suite, "dap", ["fm"], work=work, seeds=[0])["entries"]


def test_scoreboard_from_the_command_line(smoke, tmp_path, capsys):
    folder, work = smoke
    toml = str(folder / "suite.toml")
    out = tmp_path / "board.json"
    assert cli_main(["benchmark", toml, "--scoreboard", "dap", "--against", "fm", "--work", str(work),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Scoreboard of `dap`" in printed and "too few seeds" in printed
    assert json.loads(out.read_text())["row"] == "dap"
    assert (tmp_path / "board.md").read_text().startswith("Scoreboard of `dap`")
    assert cli_main(["benchmark", toml, "--against", "fm"]) == 2
    assert "--against goes with --scoreboard" in capsys.readouterr().err
    assert cli_main(["benchmark", toml, "--scoreboard", "dap", "--compare", "dap,fm"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_cells_without_episode_records_are_named_not_hidden(smoke, tmp_path):
    folder, _ = smoke
    copy, _ = copy_with_edited_cell(folder, tmp_path / "old", "fm__button__s0__light.json",
                                    lambda r: r.pop("episode_successes"))
    board = scoreboard(bm.load_suite(copy / "suite.toml"), "dap", ["fm"], work=tmp_path / "no-runs", min_seeds=1)
    assert [e["suite"] for e in board["entries"]] == ["none"]  # the OOD pool lost its only cell
    assert len(board["skipped"]) == 1 and "fm__button__s0__light.json" in board["skipped"][0]
    assert "1 cells left out" in markdown(board)
