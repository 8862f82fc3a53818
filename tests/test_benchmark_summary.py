"""The headline summary of a suite (`[headline]` -> summary.md, fig_summary.png)."""

import json
from pathlib import Path

import pytest

from dapolicy import benchmark as bm
from dapolicy import benchmark_summary as bs
from dapolicy.stats import wilson_interval

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke" / "suite.toml"
HEADLINE = '\n[headline]\nfm = "FM"\ndap = "DAP"\n'


def suite_with_headline(tmp_path, extra=HEADLINE):
    (tmp_path / "suite.toml").write_text(SMOKE.read_text() + extra)
    return bm.load_suite(tmp_path / "suite.toml")  # reports go beside it


def cell(method, seed, kind, successes, episodes=10, score=None, task="button"):
    c = {"method": method, "task": task, "seed": seed, "suite": kind, "successes": successes, "episodes": episodes,
         "success_rate": successes / episodes, "ci95": [0.0, 1.0], "latency_p50_ms": 5.0}
    return c if score is None else {**c, "mean_score": score}


def test_a_headline_names_rows_of_the_suite_with_labels(tmp_path):
    suite = suite_with_headline(tmp_path)
    assert list(suite.headline.items()) == [("fm", "FM"), ("dap", "DAP")]  # the file's order
    with pytest.raises(bm.SuiteError, match=r"\[headline\] row 'dp-c' is not a method"):
        suite_with_headline(tmp_path, '\n[headline]\ndp-c = "DP-C"\n')
    with pytest.raises(bm.SuiteError, match=r"\[headline\] must map rows to labels"):
        suite_with_headline(tmp_path, '\n[headline]\ndap = 3\n')
    assert bm.load_suite(SMOKE).headline == {}  # optional


def test_the_headline_pools_seeds_and_only_complete_seeds_out_of_distribution(tmp_path):
    suite = suite_with_headline(tmp_path)
    suite.protocol.suites = ["none", "light", "distractor", "blind"]  # blind is a control, never OOD
    cells = [cell("dap", 0, "none", 6), cell("dap", 1, "none", 8), cell("dap", 0, "light", 2),
             cell("dap", 0, "distractor", 0), cell("dap", 0, "blind", 9), cell("dap", 1, "light", 9),
             cell("fm", 0, "none", 5)]  # dap seed 1 lacks distractor: out of its OOD pool; fm has no OOD cell
    table = bs.headline(cells, suite)
    dap = table[("dap", "button")]
    assert (dap["none"].successes, dap["none"].episodes, dap["none"].seeds) == (14, 20, [0, 1])
    assert dap["none"].rate == pytest.approx(0.7) and dap["none"].ci95 == pytest.approx(wilson_interval(14, 20))
    assert (dap["ood"].successes, dap["ood"].episodes, dap["ood"].seeds) == (2, 20, [0])
    assert table[("fm", "button")]["ood"] is None
    md = bs.headline_markdown(cells, suite, "test")
    in_dist, ood = md.split("## Out of distribution")
    assert "| FM (`fm`) | **50.0%**" in in_dist and "| DAP (`dap`) | **70.0%** [48%, 85%] (2 seeds, n=20) |" in in_dist
    assert "| FM (`fm`) | - |" in ood and "| DAP (`dap`) | **10.0%**" in ood and "(1 seed, n=20)" in ood
    assert in_dist.index("FM (`fm`)") < in_dist.index("DAP (`dap`)")  # rows in the headline's order


def test_a_scored_task_reports_the_mean_score_and_the_seeds_range(tmp_path):
    suite = suite_with_headline(tmp_path)
    cells = [cell("dap", 0, "none", 0, score=0.2), cell("dap", 1, "none", 0, score=0.4)]
    md = bs.headline_markdown(cells, suite, "test")
    assert "score **0.30** (0.20-0.40); 0/20 successes; 2 seeds" in md


def test_reports_write_the_summary_only_for_a_suite_with_a_headline(tmp_path):
    suite = suite_with_headline(tmp_path)
    folder = suite.results_dir / "cells" / "test"
    folder.mkdir(parents=True)

    for c in (cell("dap", 0, "none", 6), cell("dap", 0, "light", 2), cell("fm", 0, "none", 5)):
        (folder / f"{c['method']}__{c['task']}__s0__{c['suite']}.json").write_text(json.dumps(c))
    written = bm.write_reports(suite)
    assert {"summary.md", "fig_summary.png"} <= set(written)
    assert "| DAP (`dap`) | **60.0%**" in (suite.results_dir / "summary.md").read_text()
    assert (suite.results_dir / "fig_summary.png").stat().st_size > 0
    (suite.results_dir / "summary.md").unlink()
    plain = bm.load_suite(SMOKE)
    plain.path = suite.path  # the same cells, no headline
    assert "summary.md" not in bm.write_reports(plain) and not (suite.results_dir / "summary.md").exists()
