"""`dap benchmark`: the smoke suite end to end, resumability, reports, and clear errors for bad suite files."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_with_edited_cell

from dapolicy import benchmark as bm
from dapolicy.cli import main as cli_main

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke" / "suite.toml"


def test_smoke_suite_writes_cells_csv_markdown_and_charts(smoke):
    folder, work = smoke
    cells = sorted((folder / "cells" / "test").glob("*.json"))
    assert [p.name for p in cells] == ["dap__button__s0__light.json", "dap__button__s0__none.json",
                                       "fm__button__s0__light.json", "fm__button__s0__none.json"]
    cell = json.loads(cells[0].read_text())
    for key in ("method", "task", "seed", "suite", "successes", "episodes", "ci95", "latency_p50_ms", "parameters",
                "train_seconds", "eval_seconds"):
        assert key in cell
    assert cell["episodes"] == 2 and cell["episode_seeds"] == [100000, 100001]
    assert cell["eval_device"] == "cpu"  # the default: the CPU suites' latencies are CPU figures
    assert cell["eval_threads"] == 1 and cell["eval_workers"] == 1
    assert cell["train_device"] == "cpu"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert len(rows) == 4 and {"method", "task", "seed", "suite", "successes", "episodes"} <= set(rows[0])
    assert "| dap |" in (folder / "results.md").read_text() and (folder / "fig_button.png").stat().st_size > 0
    # fm started from the dap run's trained VAE
    fm_state = json.loads((work / "runs" / "fm" / "button" / "s0" / "state.json").read_text())
    assert fm_state["init_from"].endswith("runs/dap/button/s0/model")


def test_finished_cells_are_never_redone(smoke, capsys):
    folder, work = smoke
    before = {p: p.stat().st_mtime_ns for p in (folder / "cells" / "test").glob("*.json")}
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--work", str(work), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "4 already done" in capsys.readouterr().out
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--dry-run", "--split", "validation"]) == 0
    assert capsys.readouterr().out.count("todo") == 4


def test_a_changed_row_makes_its_runs_cells_stale_and_the_run_refuses(smoke, tmp_path, capsys):
    folder, work = smoke
    copy = tmp_path / "smoke"
    shutil.copytree(folder, copy)
    cell = json.loads((copy / "cells" / "test" / "fm__button__s0__none.json").read_text())
    assert cell["recipe"]["steps"] == "2" and cell["recipe"]["source"]["method"] == "dap"  # the init_from row's
    assert json.loads((work / "runs" / "dap" / "button" / "s0" / bm.RUN_RECIPE_FILE).read_text())["steps"] == "2"
    text = (copy / "suite.toml").read_text()
    (copy / "suite.toml").write_text(text.replace('[methods.dap]\nmethod = "dap"\nconfig = "tiny"\nsteps = "2"',
                                                  '[methods.dap]\nmethod = "dap"\nconfig = "tiny"\nsteps = "3"'))
    args = ["benchmark", str(copy / "suite.toml"), "--work", str(work), "--quiet"]
    assert cli_main(args + ["--dry-run"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["dap__button__s0__none.json"].startswith("stale") and ": steps" in lines["dap__button__s0__none.json"]
    assert "source.steps" in lines["fm__button__s0__light.json"]  # fm starts from dap
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "4 cell(s)" in err and "dap/button/0" in err and "new name" in err
    # before any cell finished, the recipe written into the run folder tells the same
    shutil.rmtree(copy / "cells")
    assert cli_main(args + ["--dry-run", "--only", "dap"]) == 0
    out = capsys.readouterr().out
    assert out.count("stale") == 2 and bm.RUN_RECIPE_FILE in out


def test_one_stale_cell_makes_every_cell_of_its_run_stale(smoke, tmp_path):
    folder, _ = smoke
    # as if that row had been edited since
    copy, _ = copy_with_edited_cell(folder, tmp_path / "smoke", "fm__button__s0__none.json",
                                    lambda r: r["recipe"].update(set=["unet.gated_dynamic_context=true"]))
    suite = bm.load_suite(copy / "suite.toml")
    stale = bm.stale_cells(suite, bm.plan_cells(suite, "test"))
    assert sorted(c.file_name for c in stale) == ["fm__button__s0__light.json", "fm__button__s0__none.json"]
    assert all("fm__button__s0__none.json: set" in why for why in stale.values())


def test_a_pin_of_a_default_that_moved_later_is_no_change(smoke, monkeypatch):
    """A row that restates a former default in `set` after the default moved still owns the cells and runs made
    before the move (its own and, through init_from, its sources'); made after the move, they were built with the
    new default, so the pin is a change."""
    folder, work = smoke
    suite = bm.load_suite(folder / "suite.toml")
    pin = "unet.gated_dynamic_context=false"
    suite.variants["dap"].set = [pin]
    cells = bm.plan_cells(suite, "test")
    assert len(bm.stale_cells(suite, cells, work)) == 4  # no moved default: a change to every cell of both runs
    monkeypatch.setattr(bm, "MOVED_DEFAULTS", {("dap", pin): "2999-01-01T00:00:00"})
    assert bm.stale_cells(suite, cells, work) == {}  # the cells, fm's source and the run recipes predate the move
    monkeypatch.setattr(bm, "MOVED_DEFAULTS", {("fm", pin): "2999-01-01T00:00:00"})
    assert len(bm.stale_cells(suite, cells, work)) == 4  # a moved default of another method is no excuse
    monkeypatch.setattr(bm, "MOVED_DEFAULTS", {("dap", pin): "2000-01-01T00:00:00"})
    stale = bm.stale_cells(suite, cells, work)  # the cells came after the move: built with the new default
    assert len(stale) == 4 and any("source.set" in why for why in stale.values())


def test_a_source_rows_evaluation_settings_do_not_reach_the_rows_that_start_from_it(smoke, tmp_path):
    folder, _ = smoke
    suite = bm.load_suite(folder / "suite.toml")
    suite.variants["dap"].flow_steps = 3  # evaluation only: the fm run, which starts from dap's, is the same
    assert bm.stale_cells(suite, [bm.Cell("fm", "button", 0, "none", "test")]) == {}
    assert bm.stale_cells(suite, [bm.Cell("dap", "button", 0, "none", "test")])


def test_cells_from_before_recipes_are_compared_on_the_fields_they_recorded(smoke):
    folder, _ = smoke
    suite = bm.load_suite(folder / "suite.toml")
    cell = bm.Cell("fm", "button", 0, "none", "test")
    old = {"base_method": "fm", "config": "tiny", "steps": "2", "set": ["obs_encoder=vae"], "init_from": "dap"}
    suite.protocol.augment = False  # those cells trained without augmentation: current only where it stays off
    assert bm.stale_fields(suite, cell, old) == []  # a pinned default in `set` is not a change
    assert bm.stale_fields(suite, cell, {**old, "steps": "5", "init_from": None}) == ["steps", "init_from"]
    suite.protocol.augment = True
    assert bm.stale_fields(suite, cell, old) == ["augment", "source.augment"]


def test_bad_suite_files_are_named(tmp_path):
    bad = tmp_path / "suite.toml"
    bad.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "dpcc"\n')
    with pytest.raises(bm.SuiteError, match="dpcc"):
        bm.load_suite(bad)
    bad.write_text('[tasks.a]\nenv = "pusht"\nepisodez = 3\n[methods.x]\nmethod = "fm"\n')
    with pytest.raises(bm.SuiteError, match="episodez"):
        bm.load_suite(bad)
    bad.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "fm"\ninit_from = "y"\n')
    with pytest.raises(bm.SuiteError, match="init_from 'y'"):
        bm.load_suite(bad)
    with pytest.raises(bm.SuiteError, match="no suite file"):
        bm.load_suite(tmp_path / "nothing.toml")


def test_a_misspelt_config_field_fails_when_the_suite_is_read_not_when_its_cell_trains(tmp_path):
    bad = tmp_path / "suite.toml"
    bad.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "dap"\nset = ["next_obs_mix.nul=1"]\n')
    with pytest.raises(bm.SuiteError, match=r"\[methods.x\] set: .*nul"):
        bm.load_suite(bad)
    bad.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "dap"\nset = ["next_obs_mix.null=2"]\n')
    with pytest.raises(bm.SuiteError, match="sum to 1"):  # the config's own check
        bm.load_suite(bad)


@pytest.mark.parametrize("name", sorted(p.parent.name for p in SMOKE.parents[1].glob("*/suite.toml")))
def test_every_committed_suite_reads_and_plans(name):
    suite = bm.load_suite(SMOKE.parents[1] / name / "suite.toml")  # config fields checked on reading
    cells = bm.plan_cells(suite, "test")
    assert cells and {c.variant for c in cells} <= set(suite.variants)
    if name == "paper":  # GPU scale: every trained row at the paper size
        assert {v.config for v in suite.variants.values()} == {"paper"}
        assert {"dap", "fm", "dp-c", "dp-t", "uva", "pi0"} <= {v.method if v.name == v.method else "" for v in
                                                                 suite.variants.values()}


def test_run_of_evaluates_another_variants_run(smoke, tmp_path):
    folder, work = smoke
    text = (folder / "suite.toml").read_text() + '\n[methods.dap-k1]\nmethod = "dap"\nrun_of = "dap"\nflow_steps = 1\n'
    (folder / "suite.toml").write_text(text)
    suite = bm.load_suite(folder / "suite.toml")
    runner = bm.Runner(suite, work, threads=1, progress=False)
    cell = runner.evaluate_cell(bm.Cell("dap-k1", "button", 0, "none", "validation"))
    assert cell["flow_steps"] == 1 and not (work / "runs" / "dap-k1").exists()
    # its episode records sit beside the dap cells' in the shared run, under its own name
    assert (work / "runs" / "dap" / "button" / "s0" / "eval_benchmark" / "validation_dap-k1_none.json").is_file()
    bad = tmp_path / "suite.toml"
    bad.write_text(text + 'steps = "3"\n')
    with pytest.raises(bm.SuiteError, match="run_of"):
        bm.load_suite(bad)


def test_a_base_run_without_suites_trains_only_when_asked(smoke, tmp_path):
    folder, work = smoke
    text = (folder / "suite.toml").read_text().replace('[methods.dap]\nmethod = "dap"\nconfig = "tiny"\nsteps = "2"',
                                                      '[methods.dap]\nmethod = "dap"\nconfig = "tiny"\nsteps = "2"'
                                                      '\n\n[methods.base]\nmethod = "dap"\nconfig = "tiny"\n'
                                                      'steps = "vae=2,dynamics=2,policy=0"\nsuites = []')
    (folder / "suite2.toml").write_text(text)
    suite = bm.load_suite(folder / "suite2.toml")
    assert not [c for c in bm.plan_cells(suite, "test") if c.variant == "base"]
    assert ("base", "button", 0) in bm.plan_trainings(suite, only=["base"])
    assert cli_main(["benchmark", str(folder / "suite2.toml"), "--work", str(work), "--only", "base",
                     "--train-only", "--quiet", "--threads", "1"]) == 0
    assert bm._finished(work / "runs" / "base" / "button" / "s0")


def test_markdown_puts_in_distribution_first_and_averages_the_ood_suites():
    """Columns follow the protocol (none, then the OOD suites, then extras such as blind); "OOD mean" is the mean
    of a method's per-suite rates over the protocol's OOD suites, only where it has all of them."""
    suite = bm.load_suite(SMOKE)
    suite.protocol.suites = ["none", "light:2", "distractor:2"]

    def cell(method, kind, successes):
        return {"method": method, "task": next(iter(suite.tasks)), "seed": 0, "suite": kind, "successes": successes,
                "episodes": 10, "success_rate": successes / 10, "ci95": [0.0, 1.0], "latency_p50_ms": 5.0}

    cells = [cell("dap", "blind", 1), cell("dap", "distractor:2", 2), cell("dap", "none", 5), cell("dap", "light:2", 4),
             cell("fm", "none", 6), cell("fm", "light:2", 3)]
    table = bm.markdown_table(cells, suite, "test")
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header == "| method | none | light:2 | distractor:2 | blind | OOD mean | p50 ms |"
    dap = next(line for line in table.splitlines() if line.startswith("| dap |"))
    fm = next(line for line in table.splitlines() if line.startswith("| fm |"))
    assert dap.split(" | ")[-2] == "30.0%" and fm.split(" | ")[-2] == "-"
    two_seeds = bm.markdown_table(cells + [{**cell("fm", "none", 8), "seed": 1}], suite, "test")
    fm = next(line for line in two_seeds.splitlines() if line.startswith("| fm |"))
    assert "(60%, 80%; sd 14%; n=20)" in fm  # the seed spread beside the pooled interval
    assert "score" not in fm  # Meta-World-like: the score is the success, not repeated
    scored = [{**c, "mean_score": c["success_rate"] + 0.05} for c in cells]  # e.g. PushT's coverage score
    dap = next(line for line in bm.markdown_table(scored, suite, "test").splitlines() if line.startswith("| dap |"))
    assert "(50%; n=10); score 0.55" in dap
    suite.protocol.suites = ["none", "blind"]  # a probe suite that lists the blind control: still no OOD mean
    header = next(line for line in bm.markdown_table(cells, suite, "test").splitlines() if line.startswith("| method"))
    assert "OOD mean" not in header and "| blind |" in header


def test_charts_plot_the_score_where_it_is_not_the_success(tmp_path, monkeypatch):
    import matplotlib.axes

    (tmp_path / "suite.toml").write_text(SMOKE.read_text())
    suite = bm.load_suite(tmp_path / "suite.toml")  # charts go beside it
    task = next(iter(suite.tasks))
    cells = [{"method": "dap", "task": task, "seed": s, "suite": "none", "successes": 0, "episodes": 10,
              "success_rate": 0.0, "ci95": [0.0, 0.3], "latency_p50_ms": 5.0, "mean_score": score}
             for s, score in ((0, 0.2), (1, 0.4))]
    heights = []
    bar = matplotlib.axes.Axes.bar
    def recording_bar(self, x, h, *args, **kwargs):
        heights.append((list(h), kwargs.get("yerr")))
        return bar(self, x, h, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    [path] = bm.plot_bars(cells, suite, "test")
    assert path.is_file() and heights[0][0] == [pytest.approx(0.3)]
    assert [list(e) for e in heights[0][1]] == [[pytest.approx(0.1)], [pytest.approx(0.1)]]  # the seeds' range
    heights.clear()
    bm.plot_bars([{**c, "mean_score": 0.0} for c in cells], suite, "test")  # score = success: the success rate
    assert heights[0][0] == [0.0]


def test_a_row_retrained_from_a_stage_trains_that_stage_and_every_later_one(smoke):
    """`init_from` + `stage = "dynamics"` (e.g. the no-random-data ablation): the VAE is reused, the dynamics
    model and then the policy are trained; the run is finished, so its cells can be evaluated."""
    folder, work = smoke
    text = (folder / "suite.toml").read_text() + ('\n[methods.dap-redyn]\nmethod = "dap"\nconfig = "tiny"\n'
                                                  'init_from = "dap"\nstage = "dynamics"\n'
                                                  'steps = "dynamics=2,policy=2"\nsuites = []\n')
    (folder / "suite3.toml").write_text(text)
    assert cli_main(["benchmark", str(folder / "suite3.toml"), "--work", str(work), "--only", "dap-redyn",
                     "--train-only", "--quiet", "--threads", "1"]) == 0
    run = work / "runs" / "dap-redyn" / "button" / "s0"
    assert bm._finished(run)
    state = json.loads((run / "state.json").read_text())
    assert state["stages_done"][-2:] == ["dynamics", "policy"]
    assert {"dynamics", "policy"} <= set(state["summaries"]) and "vae" not in state["summaries"]


def test_a_task_may_set_its_own_training_seeds_and_a_row_its_own_over_them(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text('[protocol]\nseeds = [0, 1]\n[tasks.a]\nenv = "pusht"\n'
                    '[tasks.b]\nenv = "pusht"\nseeds = [0, 1, 2, 3]\n'
                    '[methods.x]\nmethod = "fm"\nsuites = ["none"]\n'
                    '[methods.y]\nmethod = "fm"\nsuites = ["none"]\nseeds = [5]\n')
    suite = bm.load_suite(path)
    seeds = {(c.variant, c.task): [] for c in bm.plan_cells(suite, "test")}
    for c in bm.plan_cells(suite, "test"):
        seeds[c.variant, c.task].append(c.seed)
    assert seeds == {("x", "a"): [0, 1], ("x", "b"): [0, 1, 2, 3], ("y", "a"): [5], ("y", "b"): [5]}
    assert ("x", "b", 3) in bm.plan_trainings(suite)
    path.write_text('[tasks.a]\nenv = "pusht"\nseeds = []\n[methods.x]\nmethod = "fm"\n')
    with pytest.raises(bm.SuiteError, match=r"\[tasks.a\] seeds"):
        bm.load_suite(path)


def test_a_row_limited_to_the_validation_split_has_no_test_cells(tmp_path, capsys):
    path = tmp_path / "suite.toml"
    path.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "fm"\nsuites = ["none"]\n'
                    '[methods.candidate]\nmethod = "fm"\nsuites = ["none"]\nsplits = ["validation"]\n')
    suite = bm.load_suite(path)
    assert {c.variant for c in bm.plan_cells(suite, "test")} == {"x"}
    assert {c.variant for c in bm.plan_cells(suite, "validation")} == {"x", "candidate"}
    assert cli_main(["benchmark", str(path), "--only", "candidate", "--dry-run"]) == 1
    assert "no cell of suite" in capsys.readouterr().err
    path.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "fm"\nsplits = ["val"]\n')
    with pytest.raises(bm.SuiteError, match=r"\[methods.x\] splits"):
        bm.load_suite(path)


def test_augmentation_is_part_of_a_runs_recipe_only_when_on(smoke, tmp_path):
    folder, work = smoke
    suite = bm.load_suite(folder / "suite.toml")
    assert suite.protocol.augment and bm.training_recipe(suite, "dap")["augment"] is True
    trained = json.loads((work / "runs" / "dap" / "button" / "s0" / "config.json").read_text())
    assert trained["train"]["augment"] is True  # the benchmark trains as its protocol says
    # a suite trained before augmentation worked keeps it off: its cells (recorded without the field) stay current
    suite.protocol.augment = False
    assert "augment" not in bm.training_recipe(suite, "dap")
    cell = bm.Cell("fm", "button", 0, "none", "test")
    record = json.loads(bm.cell_path(suite, cell).read_text())
    record["recipe"].pop("augment")
    record["recipe"]["source"].pop("augment")
    assert bm.stale_fields(suite, cell, record) == []
    suite.protocol.augment = True  # and turning it on makes such a cell stale
    assert bm.stale_fields(suite, cell, record) == ["augment", "source.augment"]
    suite.variants["fm"].augment = False  # a row may differ from its protocol
    assert "augment" not in bm.variant_recipe(suite, "fm") and bm.variant_recipe(suite, "fm")["source"]["augment"]
    bad = tmp_path / "suite.toml"
    bad.write_text('[protocol]\naugment = "no"\n[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "fm"\n')
    with pytest.raises(bm.SuiteError, match="augment must be true or false"):
        bm.load_suite(bad)
    bad.write_text('[tasks.a]\nenv = "pusht"\n[methods.x]\nmethod = "fm"\naugment = 1\n')
    with pytest.raises(bm.SuiteError, match=r"\[methods.x\] augment must be true or false"):
        bm.load_suite(bad)


def test_an_unfinished_run_is_not_resumed_under_another_augmentation(smoke, tmp_path):
    folder, work = smoke
    suite = bm.load_suite(folder / "suite.toml")
    run = tmp_path / "work" / "runs" / "fm" / "button" / "s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "fm", "train": {"warmup_steps": 5}}))  # no "augment"
    runner = bm.Runner(suite, tmp_path / "work", threads=1, progress=False)
    real = runner.ensure_trained
    source = work / "runs" / "dap" / "button" / "s0"  # fm starts from dap: the finished smoke run
    runner.ensure_trained = lambda variant, task, seed: source if variant == "dap" else real(variant, task, seed)
    runner.ensure_data = lambda task: work / "data" / task  # never collects: the check comes before training
    with pytest.raises(bm.SuiteError, match="started without augmentation, but row 'fm' now trains with it"):
        runner.ensure_trained("fm", "button", 0)
