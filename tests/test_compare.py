"""`dap benchmark --compare`: paired differences of two rows on the same episodes."""

import json
import shutil

import numpy as np
import pytest
from conftest import copy_with_edited_cell

from dapolicy import benchmark as bm
from dapolicy.cli import main as cli_main
from dapolicy.compare import ALL_TASKS, compare, mcnemar_exact_p, paired_difference, pooled_over_tasks


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(1, 9) == mcnemar_exact_p(9, 1) == pytest.approx(2 * 11 / 1024)


def test_paired_difference_of_identical_and_of_opposite_methods():
    same = {s: np.array([[x, x] for x in (True, False, True, True)]) for s in (0, 1, 2)}
    r = paired_difference(same)
    assert r["difference"] == 0 and r["ci95"] == [0.0, 0.0] and r["mcnemar_p"] == 1.0 and r["n"] == 12
    better = {s: np.array([[True, False]] * 10) for s in (0, 1)}
    r = paired_difference(better)
    assert r["difference"] == 1.0 and r["ci95"] == [1.0, 1.0] and r["a_only"] == 20 and r["mcnemar_p"] < 1e-5
    with pytest.raises(ValueError, match="no paired episodes"):
        paired_difference({})


def test_seed_to_seed_variation_widens_the_interval():
    """The same pooled counts, spread evenly or concentrated in one seed: the second is less certain."""
    even = {s: np.array([[True, False]] * 5 + [[False, False]] * 45) for s in (0, 1, 2)}
    lumpy = {0: np.array([[True, False]] * 15 + [[False, False]] * 35),
             1: np.array([[False, False]] * 50), 2: np.array([[False, False]] * 50)}
    width = [np.subtract(*reversed(paired_difference(p)["ci95"])) for p in (even, lumpy)]
    assert width[1] > 1.5 * width[0]


def test_the_bootstrap_draws_seeds_within_each_stratum():
    """Task A: A always better; task B: never different. Drawn within tasks, every resample holds two runs of
    each, so the difference is exactly 0.5; drawn across them, the mix of tasks varies and so does it."""
    pairs = {"a:0": np.array([[1, 0]] * 10), "a:1": np.array([[1, 0]] * 10),
             "b:0": np.array([[1, 1]] * 10), "b:1": np.array([[0, 0]] * 10)}
    strata = {key: key[0] for key in pairs}
    stratified, mixed = paired_difference(pairs, strata=strata), paired_difference(pairs)
    assert stratified["difference"] == mixed["difference"] == 0.5
    assert stratified["ci95"] == [0.5, 0.5] and mixed["ci95"][0] < 0.5 < mixed["ci95"][1]
    # one stratum is the unstratified bootstrap, draw for draw
    assert paired_difference(pairs, strata={key: "x" for key in pairs}) == mixed


def test_suites_that_two_tasks_share_are_pooled_over_them():
    ones = np.array([[1, 0]] * 4)
    rows = {("peg", "none"): {0: ones, 1: ones}, ("pick", "none"): {0: ones},
            ("peg", "OOD (pooled)"): {0: ones}, ("peg", "light"): {0: ones}}
    pooled = pooled_over_tasks(rows)
    assert list(pooled) == ["none"]  # only "none" has cells on two tasks
    pairs, strata = pooled["none"]
    assert sorted(pairs) == ["peg:0", "peg:1", "pick:0"]
    assert strata == {"peg:0": "peg", "peg:1": "peg", "pick:0": "pick"}


def test_compare_over_two_tasks_adds_rows_for_all_tasks(smoke, tmp_path):
    """The smoke suite with its task listed twice (the second name's cells copies of the first's, one episode
    changed): the 'all tasks' rows pool both tasks' episodes."""
    folder, work = smoke
    copy = tmp_path / "two"
    shutil.copytree(folder, copy)
    toml = (copy / "suite.toml").read_text()
    task = toml[toml.index("[tasks.button]"):toml.index("[methods.dap]")]
    (copy / "suite.toml").write_text(toml.replace("[methods.dap]", task.replace("button", "twin") + "[methods.dap]"))
    for cell in (copy / "cells" / "test").glob("*__button__*.json"):
        record = json.loads(cell.read_text())
        record["task"] = "twin"
        if cell.name == "dap__button__s0__none.json":
            record["episode_successes"] = [1.0, 1.0]
            record["successes"] = 2
        (cell.parent / cell.name.replace("__button__", "__twin__")).write_text(json.dumps(record))
    report = compare(bm.load_suite(copy / "suite.toml"), "dap", "fm", work=work)
    by = {(r["task"], r["suite"]): r for r in report["results"]}
    assert (ALL_TASKS, "none") in by and (ALL_TASKS, "OOD (pooled)") in by
    both = by[(ALL_TASKS, "none")]
    assert both["n"] == by[("button", "none")]["n"] + by[("twin", "none")]["n"] == 4
    assert both["rate_a"] == (by[("button", "none")]["rate_a"] + by[("twin", "none")]["rate_a"]) / 2
    assert both["seeds"] == ["button:0", "twin:0"]


def test_compare_pairs_the_rows_cells_episode_by_episode(smoke, tmp_path, capsys):
    folder, work = smoke
    suite = bm.load_suite(folder / "suite.toml")
    report = compare(suite, "dap", "fm", work=work)
    assert [(r["task"], r["suite"]) for r in report["results"]] == [
        ("button", "none"), ("button", "light"), ("button", "OOD (pooled)")]
    cell = json.loads((folder / "cells" / "test" / "dap__button__s0__none.json").read_text())
    assert report["results"][0]["rate_a"] == cell["successes"] / cell["episodes"]
    assert len(cell["episode_successes"]) == cell["episodes"] == 2
    out = tmp_path / "compare.json"
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--compare", "dap,fm", "--work", str(work),
                     "--out", str(out)]) == 0
    assert "| button | none |" in capsys.readouterr().out and json.loads(out.read_text())["a"] == "dap"
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--compare", "dap"]) == 2
    assert "two rows" in capsys.readouterr().err
    # --seeds limits the comparison to those training seeds (the smoke suite has seed 0 only)
    assert compare(suite, "dap", "fm", work=work, seeds=[0])["seeds"] == [0]
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--compare", "dap,fm", "--work", str(work),
                     "--seeds", "1"]) == 2
    assert "no finished cells in common" in capsys.readouterr().err
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--compare", "dap,fm", "--work", str(work),
                     "--seeds", "0,x"]) == 2
    assert "--seeds takes a comma list" in capsys.readouterr().err


def test_cells_without_episode_records_use_the_run_folder_only_when_it_matches(smoke, tmp_path):
    folder, work = smoke
    # as written before the cells recorded their episodes
    copy, record = copy_with_edited_cell(folder, tmp_path / "smoke", "fm__button__s0__none.json",
                                         lambda r: r.pop("episode_successes"))
    path = copy / "cells" / "test" / "fm__button__s0__none.json"
    suite = bm.load_suite(copy / "suite.toml")
    assert compare(suite, "dap", "fm", work=work)["results"][0]["rate_b"] == record["successes"] / 2
    with pytest.raises(bm.SuiteError, match="no finished cells in common"):
        compare(suite, "dap", "fm", tasks=["nothing"], work=work)
    record["successes"] = 1 - record["successes"] if record["successes"] < 2 else 0  # disagrees with the run's file
    path.write_text(json.dumps(record))
    report = compare(suite, "dap", "fm", work=work)
    assert any("fm__button__s0__none.json" in why for why in report["skipped"])


def test_paired_scores_count_who_scored_higher_and_use_the_sign_test():
    scores = {0: np.array([[0.5, 0.25], [0.75, 0.75], [0.2, 0.4], [1.0, 0.0]])}
    r = paired_difference(scores)
    assert r["difference"] == pytest.approx((0.25 + 0 - 0.2 + 1.0) / 4)
    assert (r["a_only"], r["b_only"]) == (2, 1) and r["mcnemar_p"] == mcnemar_exact_p(2, 1)
    assert r["ci95"][0] <= r["difference"] <= r["ci95"][1]


def test_compare_on_scores_reads_the_cells_scores_and_falls_back_to_the_run_folder(smoke, tmp_path, capsys):
    folder, work = smoke
    suite = bm.load_suite(folder / "suite.toml")
    cell = json.loads((folder / "cells" / "test" / "dap__button__s0__none.json").read_text())
    assert len(cell["episode_scores"]) == cell["episodes"] and all(0 <= x <= 1 for x in cell["episode_scores"])
    report = compare(suite, "dap", "fm", work=work, metric="score")
    assert report["metric"] == "score"
    assert report["results"][0]["rate_a"] == pytest.approx(np.mean(cell["episode_scores"]))
    # a cell written before scores were recorded: its run folder's episode records give them
    copy, _ = copy_with_edited_cell(folder, tmp_path / "smoke", "dap__button__s0__none.json",
                                    lambda r: r.update(episode_scores=[0.0] * len(r["episode_scores"])))
    edited = compare(bm.load_suite(copy / "suite.toml"), "dap", "fm", work=work, metric="score")
    assert edited["results"][0]["rate_a"] == 0.0  # the cell's own record wins when it has one
    copy2, _ = copy_with_edited_cell(folder, tmp_path / "smoke2", "dap__button__s0__none.json",
                                     lambda r: r.pop("episode_scores"))
    fallback = compare(bm.load_suite(copy2 / "suite.toml"), "dap", "fm", work=work, metric="score")
    assert fallback["results"][0]["rate_a"] == pytest.approx(report["results"][0]["rate_a"])
    elsewhere = compare(bm.load_suite(copy2 / "suite.toml"), "dap", "fm", work=tmp_path / "nowhere", metric="score")
    assert any("pass the --work folder" in why for why in elsewhere["skipped"])
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--compare", "dap,fm", "--metric", "score",
                     "--work", str(work)]) == 0
    assert "sign test p" in capsys.readouterr().out
    with pytest.raises(bm.SuiteError, match="unknown metric"):
        compare(suite, "dap", "fm", work=work, metric="coverage")
