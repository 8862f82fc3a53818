"""`dap benchmark SUITE`: methods x tasks x training seeds x evaluation suites, resumable, with committed results.

A suite file (TOML, `benchmarks/<name>/suite.toml`) names the tasks (collected once, shared by every method),
the method variants (a registered method + size + budgets + `--set` fields, optionally starting from another
variant's trained stages), the training seeds and the evaluation suites. Every finished (variant, task, seed,
eval suite, split) is a cell: a small JSON in `benchmarks/<name>/cells/<split>/`, committed to the repository,
never recomputed. Data, runs and checkpoints go to a work folder outside the repository. From the cells the
command writes `results.csv`, `results.md` and bar charts (Fig. 3/4/5 style) next to the suite file.

Protocol (docs/benchmark.md): choices are made on the `validation` split (episode seeds from
`protocol.validation_seed`), reported numbers come from the `test` split (`protocol.test_seed`), identical
for every method.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dapolicy.atomic import atomic_write_bytes, write_json_atomic
from dapolicy.stats import wilson_interval

SPLITS = ("test", "validation")
DEFAULT_BENCHMARKS_DIR = Path("benchmarks")
CSV_COLUMNS = ("method", "task", "seed", "suite", "successes", "episodes", "success_rate", "ci_low", "ci_high",
               "mean_score", "latency_p50_ms", "parameters", "train_seconds", "eval_seconds", "base_method", "split")


class SuiteError(ValueError):
    """A suite file that cannot be run as written (the message names the field)."""


@dataclass
class TaskSpec:
    """A task and how its data is collected (once per suite, shared by every method and seed)."""

    name: str
    env: str
    expert_episodes: int = 50
    random_episodes: int = 50
    image_size: int = 64
    collect: dict[str, Any] = field(default_factory=dict)  # any other `dap collect` option
    max_steps: int | None = None  # evaluation episode limit (None = the task's)
    # training seeds of this task's cells (None = the protocol's), for a task whose spread between trained models
    # needs more of them; a row's own `seeds` still win
    seeds: list[int] | None = None


@dataclass
class VariantSpec:
    """One trained model per (task, seed): a method at a size, with budgets and config fields.

    init_from: another variant whose run (same task, same seed) provides the stages before `stage`.
    stage: with init_from, the first stage trained here; it and every later stage are trained (default: the
        method's last stage alone).
    run_of: evaluate another variant's trained run (no training): for generation settings such as `mode` and
        `flow_steps` (e.g. coupling ablations, K).
    tasks: restrict the variant to these tasks (None = every task); suites: its evaluation suites
        (None = the protocol's).
    mode, flow_steps: generation mode and sampling steps at evaluation (None = the model's defaults).
    augment: random-shift augmentation while training this row (None = the protocol's `augment`).
    splits: the splits this row has cells in (None = test and validation). ["validation"] for a candidate
        setting rejected on validation episodes: a full test run then never trains it.
    """

    name: str
    method: str
    config: str = "small"
    steps: str | None = None
    set: list[str] = field(default_factory=list)
    init_from: str | None = None
    stage: str | None = None
    tasks: list[str] | None = None
    suites: list[str] | None = None
    seeds: list[int] | None = None
    mode: str | None = None
    flow_steps: int | None = None
    run_of: str | None = None
    augment: bool | None = None
    splits: list[str] | None = None


@dataclass
class Protocol:
    """Seeds and episode counts shared by every cell."""

    episodes: int = 50
    test_seed: int = 100_000
    validation_seed: int = 300_000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    suites: list[str] = field(default_factory=lambda: ["none", "light", "distractor", "novel_object"])
    # random-shift augmentation while training (`dap train --augment`); a suite whose cells were trained before
    # augmentation worked (2026-11-27) keeps it off, so that all of its cells follow one recipe
    augment: bool = True

    @property
    def ood_suites(self) -> list[str]:
        """The listed suites that are distribution shifts (`is_ood_suite`), in the protocol's order."""
        return [k for k in self.suites if is_ood_suite(k)]


@dataclass
class Suite:
    name: str
    path: Path
    protocol: Protocol
    tasks: dict[str, TaskSpec]
    variants: dict[str, VariantSpec]
    description: str = ""
    # `[headline]`: row -> label of the rows that stand for the methods in `summary.md` / `fig_summary.png`
    headline: dict[str, str] = field(default_factory=dict)

    @property
    def results_dir(self) -> Path:
        return self.path.parent


def load_suite(name_or_path: str | Path, benchmarks_dir: Path = DEFAULT_BENCHMARKS_DIR) -> Suite:
    """A suite by name (`benchmarks/<name>/suite.toml`) or by path; errors name the field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = benchmarks_dir / str(name_or_path) / "suite.toml"
    if not path.is_file():
        known = sorted(p.parent.name for p in benchmarks_dir.glob("*/suite.toml")) if benchmarks_dir.is_dir() else []
        raise SuiteError(f"no suite file {path}" + (f" (suites here: {', '.join(known)})" if known else ""))
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text())
    except Exception as err:  # tomllib's own error type
        raise SuiteError(f"{path} is not valid TOML: {err}") from err
    return parse_suite(data, path)


def _build(cls: type, data: Any, where: str, **extra: Any) -> Any:
    if not isinstance(data, dict):
        raise SuiteError(f"{where} must be a table")
    known = set(cls.__dataclass_fields__) - set(extra)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data, **extra)
    except TypeError as err:
        raise SuiteError(f"{where}: {err}") from err


def parse_suite(data: dict[str, Any], path: Path) -> Suite:
    from dapolicy.policies.registry import SIZES, method_names

    unknown = sorted(set(data) - {"name", "description", "protocol", "tasks", "methods", "headline"})
    if unknown:
        raise SuiteError(f"{path}: unknown top-level field(s) {unknown}")
    protocol = _build(Protocol, data.get("protocol", {}), f"{path}: [protocol]")
    if not isinstance(protocol.augment, bool):
        raise SuiteError(f"{path}: [protocol] augment must be true or false, got {protocol.augment!r}")
    for name, v in data.get("methods", {}).items():
        if isinstance(v, dict) and "augment" in v and not isinstance(v["augment"], bool):
            raise SuiteError(f"{path}: [methods.{name}] augment must be true or false, got {v['augment']!r}")
    tasks = {k: _build(TaskSpec, v, f"{path}: [tasks.{k}]", name=k) for k, v in data.get("tasks", {}).items()}
    variants = {k: _build(VariantSpec, v, f"{path}: [methods.{k}]", name=k) for k, v in data.get("methods", {}).items()}
    if not tasks or not variants:
        raise SuiteError(f"{path}: needs at least one [tasks.NAME] and one [methods.NAME]")
    for t in tasks.values():
        if t.seeds is not None and (not t.seeds or not all(isinstance(x, int) and x >= 0 for x in t.seeds)):
            raise SuiteError(f"{path}: [tasks.{t.name}] seeds must be a non-empty list of training seeds >= 0, "
                             f"got {t.seeds!r}")
    for v in variants.values():
        if v.method not in method_names():
            raise SuiteError(f"{path}: [methods.{v.name}] method {v.method!r} is not registered "
                             f"({', '.join(method_names())})")
        if v.config not in SIZES:
            raise SuiteError(f"{path}: [methods.{v.name}] config must be one of {SIZES}")
        for ref in ("init_from", "run_of"):
            target = getattr(v, ref)
            if target is not None and target not in variants:
                raise SuiteError(f"{path}: [methods.{v.name}] {ref} {target!r} is not a method of this suite")
        if v.run_of is not None and (v.init_from or v.steps or v.set or v.method != variants[v.run_of].method):
            raise SuiteError(f"{path}: [methods.{v.name}] run_of evaluates {v.run_of!r}'s run: give it the same "
                             f"method and no steps, set or init_from")
        if v.splits is not None and (not v.splits or not set(v.splits) <= set(SPLITS)):
            raise SuiteError(f"{path}: [methods.{v.name}] splits must be a non-empty subset of {list(SPLITS)}, "
                             f"got {v.splits!r}")
        for t in v.tasks or []:
            if t not in tasks:
                raise SuiteError(f"{path}: [methods.{v.name}] task {t!r} is not a task of this suite")
        _check_config_fields(v, path)
    headline = data.get("headline", {})
    if not isinstance(headline, dict) or not all(isinstance(v, str) and v for v in headline.values()):
        raise SuiteError(f"{path}: [headline] must map rows to labels, e.g. dap = \"DAP\"; got {headline!r}")
    for row in headline:
        if row not in variants:
            raise SuiteError(f"{path}: [headline] row {row!r} is not a method of this suite")
    return Suite(str(data.get("name", path.parent.name)), path, protocol, tasks, variants,
                 str(data.get("description", "")), dict(headline))


def _check_config_fields(v: VariantSpec, path: Path) -> None:
    """Build the variant's config with its `set` fields, so a misspelt field or bad value fails when the suite
    is read, not hours later when the cell's training starts (configs are plain dataclasses: cheap to build)."""
    if not v.set:
        return
    from dapolicy.policies.registry import make_config

    try:
        make_config(v.method, v.config, v.set)
    except ValueError as err:  # OverrideError and the config classes' own checks
        raise SuiteError(f"{path}: [methods.{v.name}] set: {err}") from None


# ----------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    variant: str
    task: str
    seed: int
    suite: str
    split: str

    @property
    def file_name(self) -> str:
        return f"{self.variant}__{self.task}__s{self.seed}__{self.suite.replace(':', '@')}.json"


def training_seeds(suite: Suite, variant: VariantSpec, task: str) -> list[int]:
    """The training seeds of a row on a task: the row's own, else the task's, else the protocol's."""
    if variant.seeds is not None:
        return variant.seeds
    own = suite.tasks[task].seeds
    return own if own is not None else suite.protocol.seeds


def plan_cells(suite: Suite, split: str, only: list[str] | None = None, tasks: list[str] | None = None,
               seeds: list[int] | None = None, suites: list[str] | None = None) -> list[Cell]:
    """Every cell of the suite (filtered), grouped by (variant, task, seed) so each model trains once."""
    cells = []
    for v in suite.variants.values():
        if (only and v.name not in only) or (v.splits is not None and split not in v.splits):
            continue
        for task in v.tasks if v.tasks is not None else list(suite.tasks):
            if tasks and task not in tasks:
                continue
            for seed in training_seeds(suite, v, task):
                if seeds and seed not in seeds:
                    continue
                for kind in v.suites if v.suites is not None else suite.protocol.suites:
                    if suites and kind not in suites:
                        continue
                    cells.append(Cell(v.name, task, int(seed), kind, split))
    return cells


def plan_trainings(suite: Suite, only: list[str] | None = None, tasks: list[str] | None = None,
                   seeds: list[int] | None = None) -> list[tuple[str, str, int]]:
    """The (variant, task, seed) runs of the selection, including variants that are never evaluated (a shared
    base run), in suite order."""
    runs = []
    for v in suite.variants.values():
        if (only and v.name not in only) or v.run_of:
            continue
        for task in v.tasks if v.tasks is not None else list(suite.tasks):
            for seed in training_seeds(suite, v, task):
                if (not tasks or task in tasks) and (not seeds or seed in seeds):
                    runs.append((v.name, task, int(seed)))
    return runs


def cell_path(suite: Suite, cell: Cell) -> Path:
    return suite.results_dir / "cells" / cell.split / cell.file_name


#: The suite-row fields a cell's result depends on (its recipe); `tasks`, `suites` and `seeds` only select cells.
RECIPE_FIELDS = ("method", "config", "steps", "set", "init_from", "stage", "mode", "flow_steps", "run_of")
#: The fields a trained run depends on (a row's evaluation settings do not reach the rows that start from it).
TRAINING_FIELDS = ("method", "config", "steps", "set", "init_from", "stage")
#: Written into each run folder the benchmark trains: the training recipe it was trained under.
RUN_RECIPE_FILE = "benchmark_recipe.json"


def utc_timestamp(seconds: float | None = None) -> str:
    """UTC (now, or `seconds` since the epoch) as a cell's "finished" records it; these strings, and
    `MOVED_DEFAULTS`' times, compare in time order on a machine in any time zone. (Every cell before
    2026-11-28 was written on machines whose local time was UTC, so their local times are UTC too.)"""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


#: Defaults that moved, so that rows made before can restate ("pin") the former value in their `set` and keep
#: meaning the model their cells were made with: (method, "field=former value") -> when the default moved (UTC,
#: the format of a cell's "finished"). Such a pin is no change against a cell or run recipe written before
#: then; against one written after, it is (that model was built with the new default).
MOVED_DEFAULTS: dict[tuple[str, str], str] = {
    # DAP's policy attends to its prediction through gates (docs/method.md, "Gated or joint attention")
    ("dap", "unet.gated_dynamic_context=false"): "2026-11-28T00:20:00",
}


def augments(suite: Suite, variant: VariantSpec) -> bool:
    """Whether a row trains with random-shift augmentation: its own `augment`, else the protocol's."""
    return variant.augment if variant.augment is not None else suite.protocol.augment


def training_recipe(suite: Suite, name: str) -> dict[str, Any]:
    """What a variant's trained run depends on: its training fields and, under "source", its init_from row's."""
    v = suite.variants[name]
    recipe: dict[str, Any] = {f: getattr(v, f) for f in TRAINING_FIELDS}
    if augments(suite, v):  # recorded only when on: every cell recorded before the field trained without it
        recipe["augment"] = True
    if v.init_from:
        recipe["source"] = training_recipe(suite, v.init_from)
    return recipe


def variant_recipe(suite: Suite, name: str) -> dict[str, Any]:
    """What a variant's cells depend on: its recipe fields and, under "source", the training recipe of the
    row it starts from (init_from) or evaluates (run_of)."""
    v = suite.variants[name]
    recipe: dict[str, Any] = {f: getattr(v, f) for f in RECIPE_FIELDS}
    if augments(suite, v) and not v.run_of:  # as in `training_recipe`
        recipe["augment"] = True
    source = v.run_of or v.init_from
    if source:
        recipe["source"] = training_recipe(suite, source)
    return recipe


def stale_fields(suite: Suite, cell: Cell, record: dict[str, Any]) -> list[str]:
    """The recipe fields in which a finished cell differs from the suite row as it is now (empty: up to date).

    Cells written before recipes were recorded are compared on method, config, steps and init_from, not on
    `set`: rows pinned their fields explicitly when the `small` defaults changed (e.g. `obs_encoder=vae`), so
    an old cell's shorter list can mean the same model."""
    current = variant_recipe(suite, cell.variant)
    if "recipe" in record:
        return _differences(record["recipe"], without_later_pins(current, record["recipe"], record.get("finished")))
    legacy = {"base_method": current["method"], **{f: current[f] for f in ("config", "steps", "init_from")}}
    fields = [name for name, want in legacy.items() if name in record and record[name] != want]
    # every cell of that time trained without augmentation
    return fields + [name for name, recipe in (("augment", current), ("source.augment", current.get("source") or {}))
                     if recipe.get("augment")]


def without_later_pins(current: dict[str, Any], old: dict[str, Any], written: str | None) -> dict[str, Any]:
    """`current` (a recipe, its sources included) without the pins of defaults that moved after `old` was
    written (`MOVED_DEFAULTS`) and that `old` does not hold itself: what the row meant when `old` was written."""
    out = dict(current)
    if written is not None and isinstance(current.get("set"), list):
        old_set = old.get("set") or []
        out["set"] = [entry for entry in current["set"]
                      if not (MOVED_DEFAULTS.get((current.get("method"), entry), "") > written
                              and entry not in old_set)]
    if isinstance(current.get("source"), dict) and isinstance(old.get("source"), dict):
        out["source"] = without_later_pins(current["source"], old["source"], written)
    return out


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def run_key(suite: Suite, cell: Cell) -> tuple[str, str, int]:
    """The trained run a cell is evaluated on: (training row, task, seed)."""
    v = suite.variants[cell.variant]
    return v.run_of or v.name, cell.task, cell.seed


def run_folder(work: Path, variant: str, task: str, seed: int) -> Path:
    """Where the benchmark trains a row's run for (task, seed) under its work folder."""
    return Path(work) / "runs" / variant / task / f"s{seed}"


def stale_cells(suite: Suite, cells: list[Cell], work: Path | None = None) -> dict[Cell, str]:
    """The cells of the selection whose trained run came from another version of a suite row, with why.

    A run is stale when any finished cell evaluated on it (either split, selected or not) differs from the
    suite as it is now, or when the recipe written into its folder (under `work`) does. Then every cell of
    that run is stale, finished or not: an unfinished one would be evaluated on the old model."""
    reasons: dict[tuple[str, str, int], list[str]] = {}
    wanted = {run_key(suite, c) for c in cells}
    for split in ("test", "validation"):
        for other in plan_cells(suite, split):
            key, path = run_key(suite, other), cell_path(suite, other)
            if key in wanted and path.is_file():
                fields = stale_fields(suite, other, json.loads(path.read_text()))
                if fields:
                    reasons.setdefault(key, []).append(f"{path.name}: {', '.join(fields)}")
    if work is not None:
        for key in wanted:
            recipe_file = run_folder(work, *key) / RUN_RECIPE_FILE
            if recipe_file.is_file():
                old = json.loads(recipe_file.read_text())
                written = utc_timestamp(recipe_file.stat().st_mtime)
                fields = _differences(old, without_later_pins(training_recipe(suite, key[0]), old, written))
                if fields:
                    reasons.setdefault(key, []).append(f"{recipe_file}: {', '.join(fields)}")
    return {c: "; ".join(reasons[run_key(suite, c)]) for c in cells if run_key(suite, c) in reasons}


def check_not_stale(suite: Suite, cells: list[Cell], work: Path | None = None) -> None:
    """Refuse to go on when a cell of the selection belongs to a run made under another version of a suite row:
    its finished cells would count as done, and its run be resumed or evaluated, under a recipe it never had."""
    stale = stale_cells(suite, cells, work)
    if stale:
        lines = sorted({f"{'/'.join(map(str, run_key(suite, c)))} ({why})" for c, why in stale.items()})
        shown = "\n  ".join(lines[:5]) + (f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else "")
        raise SuiteError(f"{len(stale)} cell(s) of suite {suite.name!r} belong to runs made with another version of "
                         f"a row (run, then what changed):\n  {shown}\nGive the changed row a new name (and the "
                         f"rows that start from it or evaluate it, which change with it), keeping the old cells; "
                         f"or delete those runs' cells and their run folders under --work to redo them.")


# ----------------------------------------------------------------------------------------------- running
class Runner:
    """Collects, trains and evaluates the cells of one suite in a work folder; skips what is done."""

    def __init__(self, suite: Suite, work: Path, threads: int | None = None, progress: bool = True,
                 device: str = "cpu", env_factory: Callable[..., Any] | None = None, workers: int = 1,
                 eval_device: str = "cpu") -> None:
        self.suite, self.work, self.threads, self.progress = suite, Path(work), threads, progress
        self.device, self.env_factory, self.workers = device, env_factory, workers
        # The CPU suites' latencies are CPU figures, so evaluation defaults to cpu; a paper-scale model is
        # evaluated on the GPU it trained on (`--eval-device`), recorded in every cell.
        self.eval_device = eval_device

    def data_dir(self, task: str) -> Path:
        return self.work / "data" / task

    def run_dir(self, variant: str, task: str, seed: int) -> Path:
        return run_folder(self.work, variant, task, seed)

    def _say(self, message: str) -> None:
        print(f"[dap benchmark] {message}", flush=True)

    def ensure_data(self, task: str) -> Path:
        from dapolicy.collect import collect

        spec, out = self.suite.tasks[task], self.data_dir(task)
        summary = out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("complete"):
            return out
        self._say(f"collecting {task} ({spec.env}) into {out}")
        collect(spec.env, out, expert_episodes=spec.expert_episodes, random_episodes=spec.random_episodes,
                image_size=spec.image_size, resume=out.exists(), progress=self.progress, **spec.collect)
        return out

    def ensure_trained(self, variant: str, task: str, seed: int) -> Path:
        """Train (or resume) the variant's run for (task, seed); its init_from run first."""
        from dapolicy.train import train
        from dapolicy.training.rundir import RunDir

        v = self.suite.variants[variant]
        if v.run_of:
            return self.ensure_trained(v.run_of, task, seed)
        run = self.run_dir(variant, task, seed)
        if _finished(run):
            return run
        source = self.ensure_trained(v.init_from, task, seed) if v.init_from else None
        data = self.ensure_data(task)
        exists = RunDir(run).read_config() is not None
        if not exists:  # what it is trained under, so an edited row is noticed even before any cell finishes
            write_json_atomic(run / RUN_RECIPE_FILE, training_recipe(self.suite, variant))
        self._say(f"training {variant} on {task}, seed {seed} -> {run}" + (" (resuming)" if exists else ""))
        kwargs: dict[str, Any] = dict(method=v.method, config=v.config, steps=v.steps, seed=seed,
                                      overrides=v.set or None, threads=self.threads, progress=self.progress,
                                      device=self.device, augment=augments(self.suite, v))
        if exists:
            stored = bool(RunDir(run).read_config().get("train", {}).get("augment", False))
            if stored != kwargs["augment"]:  # a run from before the row (or protocol) changed its augmentation
                raise SuiteError(f"{run} was started {'with' if stored else 'without'} augmentation, but row "
                                 f"{variant!r} now trains {'with' if kwargs['augment'] else 'without'} it: give the "
                                 f"changed row a new name, or delete that run folder to retrain it")
            train(data, run, resume=True, **{k: kwargs[k] for k in ("threads", "progress", "device")})
        else:
            # from `stage` on: every later stage is retrained too (it learned from the replaced one's output);
            # no stage given: init_from's default, the last stage alone
            stage = "all" if source is None else (f"{v.stage}+" if v.stage else None)
            train(data, run, init_from=source, stage=stage, **kwargs)
        if not _finished(run):
            raise RuntimeError(f"training {run} stopped before every stage finished")
        return run

    def evaluate_cell(self, cell: Cell) -> dict[str, Any]:
        from dapolicy.evaluate import evaluate
        from dapolicy.training.rundir import RunDir

        path = cell_path(self.suite, cell)
        if path.is_file():
            return json.loads(path.read_text())
        run = self.ensure_trained(cell.variant, cell.task, cell.seed)
        v, p = self.suite.variants[cell.variant], self.suite.protocol
        seed = p.test_seed if cell.split == "test" else p.validation_seed
        self._say(f"evaluating {cell.variant} / {cell.task} / seed {cell.seed} / {cell.suite} ({cell.split}, "
                  f"{p.episodes} episodes from env seed {seed})")
        start = time.perf_counter()
        kwargs = {"env_factory": self.env_factory} if self.env_factory else {}
        result = evaluate(run, episodes=p.episodes, ood=cell.suite, seed=seed, videos=0, mode=v.mode,
                          flow_steps=v.flow_steps, max_steps=self.suite.tasks[cell.task].max_steps,
                          # the variant in the name: evaluation-only variants (run_of) share their run's folder
                          out_dir=run / "eval_benchmark",
                          name=f"{cell.split}_{cell.variant}_{cell.suite.replace(':', '@')}",
                          progress=self.progress, workers=self.workers, device=self.eval_device,
                          threads=self.threads, **kwargs)
        state = json.loads((run / "state.json").read_text())
        train_seconds = sum(float(s.get("seconds") or 0) for s in state.get("summaries", {}).values())
        from dapolicy.evaluate import load_policy

        cellrec = {
            "method": cell.variant, "base_method": v.method, "task": cell.task, "env": self.suite.tasks[cell.task].env,
            "seed": cell.seed, "suite": cell.suite, "split": cell.split, "successes": result["n_success"],
            "episodes": result["n_episodes"], "success_rate": result["success_rate"], "ci95": result["ci95"],
            "mean_score": result["mean_score"], "latency_p50_ms": result["latency_ms"].get("p50"),
            "parameters": load_policy(run).parameter_counts()["total"], "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - start, 1), "episode_seeds": result["settings"]["episode_seeds"],
            # per episode, in seed order: what a paired comparison of two rows needs (`--compare`)
            "episode_successes": [int(bool(e["success"])) for e in result["episodes"]],
            "episode_scores": [round(float(e["score"]), 4) for e in result["episodes"]],
            "mode": result["settings"]["mode"], "flow_steps": result["settings"]["flow_steps"],
            "eval_device": result["settings"].get("device", self.eval_device),
            # where the policy trained (a GPU-trained cell of a CPU suite says so; its success is comparable, its
            # training time is not)
            "train_device": (RunDir(run).read_config() or {}).get("environment", {}).get("device"),
            # latencies are comparable only between cells with the same threads and workers
            "eval_threads": self.threads or _torch_threads(), "eval_workers": self.workers,
            "config": v.config, "steps": v.steps, "set": v.set, "init_from": v.init_from,
            "recipe": variant_recipe(self.suite, cell.variant),
            "dapolicy_commit": _git_commit(), "finished": utc_timestamp(),
        }
        write_json_atomic(path, cellrec)
        return cellrec

    def run(self, cells: list[Cell]) -> None:
        check_not_stale(self.suite, cells, self.work)
        done = sum(cell_path(self.suite, c).is_file() for c in cells)
        self._say(f"suite {self.suite.name!r}: {len(cells)} cells, {done} already done")
        for i, cell in enumerate(cells):
            if cell_path(self.suite, cell).is_file():
                continue
            self.evaluate_cell(cell)
            write_reports(self.suite)
            self._say(f"cell {i + 1}/{len(cells)} done: {cell.file_name}")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _finished(run: Path) -> bool:
    state, config = run / "state.json", run / "config.json"
    if not (state.is_file() and config.is_file()):
        return False
    done = json.loads(state.read_text()).get("stages_done", [])
    return done == json.loads(config.read_text()).get("stages")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------- reports
def read_cells(suite: Suite, split: str) -> list[dict[str, Any]]:
    folder = suite.results_dir / "cells" / split
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def write_reports(suite: Suite) -> dict[str, Path]:
    """results.csv (+ results_validation.csv), results.md and charts from the committed cells; with a
    `[headline]`, also summary.md and fig_summary.png (`benchmark_summary`)."""
    from dapolicy.benchmark_summary import headline_markdown, plot_headline

    written: dict[str, Path] = {}
    for split in SPLITS:
        cells = read_cells(suite, split)
        if not cells:
            continue
        stem = "results" if split == "test" else "results_validation"
        csv_path = suite.results_dir / f"{stem}.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for c in sorted(cells, key=lambda c: (c["task"], c["method"], c["suite"], c["seed"])):
            writer.writerow({**{k: c.get(k) for k in CSV_COLUMNS}, "ci_low": c["ci95"][0], "ci_high": c["ci95"][1]})
        _write_text(csv_path, buffer.getvalue())
        written[stem + ".csv"] = csv_path
        md = suite.results_dir / f"{stem}.md"
        _write_text(md, markdown_table(cells, suite, split))
        written[stem + ".md"] = md
        for path in plot_bars(cells, suite, split):
            written[path.name] = path
        if suite.headline and any(c["method"] in suite.headline for c in cells):
            summary = suite.results_dir / ("summary.md" if split == "test" else "summary_validation.md")
            _write_text(summary, headline_markdown(cells, suite, split))
            written[summary.name] = summary
            figure = plot_headline(cells, suite, split)
            if figure is not None:
                written[figure.name] = figure
    return written


def _write_text(path: Path, text: str) -> None:
    """Atomic (several benchmark processes may rewrite the reports of one suite)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def aggregate(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(method, task, suite) -> mean over seeds, per-seed rates, pooled successes/episodes and interval."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["task"], c["suite"]), []).append(c)
    out = {}
    for key, group in groups.items():
        group = sorted(group, key=lambda c: c["seed"])
        s, n = sum(c["successes"] for c in group), sum(c["episodes"] for c in group)
        out[key] = {"mean": float(np.mean([c["success_rate"] for c in group])), "seeds": group,
                    "successes": s, "episodes": n, "ci95": wilson_interval(s, n),
                    "score": float(np.mean([c.get("mean_score", c["success_rate"]) for c in group])),
                    "latency": float(np.median([c["latency_p50_ms"] for c in group if c.get("latency_p50_ms")] or [0]))}
    return out


def markdown_table(cells: list[dict[str, Any]], suite: Suite, split: str) -> str:
    agg = aggregate(cells)
    methods = [m for m in suite.variants if any(k[0] == m for k in agg)]
    kinds = suite_order(suite, (c["suite"] for c in cells))
    ood = [k for k in suite.protocol.ood_suites if k in kinds]
    lines = [f"# Benchmark `{suite.name}` ({split} split)", "",
             "Success rate, mean over training seeds, with the pooled 95% Wilson interval over all episodes of all "
             "seeds; per-seed rates and their standard deviation (`sd`) in brackets; `n` = episodes per seed x "
             "seeds. The pooled interval counts episode noise only (every seed meets the same episodes): the "
             "spread between training seeds is the `sd`, so compare methods on both. Generated by `dap benchmark "
             f"{suite.name} --report` from the cells in `cells/{split}/`."
             + (f" OOD mean: the mean of a method's per-suite rates over {', '.join(ood)}, for the methods "
                "evaluated on all of them." if ood else "")
             + " On a task whose score is not its success (PushT: coverage / 0.95, clipped at 1), each entry also "
               "gives the mean score over seeds.", ""]
    for task in suite.tasks:
        if not any(k[1] == task for k in agg):
            continue
        columns = kinds + (["OOD mean"] if ood else [])
        scored = scored_task(cells, task)
        lines += [f"## {task} (`{suite.tasks[task].env}`)", "",
                  "| method | " + " | ".join(columns) + " | p50 ms |", "|---|" + "---|" * (len(columns) + 1)]
        for m in methods:
            if not any(k[0] == m and k[1] == task for k in agg):
                continue  # no cell of this method on this task: no row of dashes
            row = [m]
            lat = None
            for kind in kinds:
                a = agg.get((m, task, kind))
                if a is None:
                    row.append("-")
                    continue
                lat = lat or a["latency"]
                per = ", ".join(f"{c['success_rate']:.0%}" for c in a["seeds"])
                if len(a["seeds"]) > 1:  # the spread between training seeds, which the pooled interval omits
                    per += f"; sd {np.std([c['success_rate'] for c in a['seeds']], ddof=1):.0%}"
                score = f"; score {a['score']:.2f}" if scored else ""
                row.append(f"**{a['mean']:.1%}** [{a['ci95'][0]:.0%}, {a['ci95'][1]:.0%}] ({per}; n={a['episodes']})"
                           + score)
            if ood:
                rates = [agg[(m, task, k)]["mean"] for k in ood if (m, task, k) in agg]
                row.append(f"{sum(rates) / len(rates):.1%}" if len(rates) == len(ood) else "-")
            row.append(f"{lat:.0f}" if lat else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def is_ood_suite(kind: str) -> bool:
    """True for a distribution shift ("light:2", "novel_object"); False in distribution and for the controls
    (blind), which never enter an OOD mean or pool, even where a protocol lists them."""
    from dapolicy.envs.perturbations import CONTROL_KINDS

    return kind.split(":")[0] not in ("none", *CONTROL_KINDS)


def suite_order(suite: Suite, kinds: Iterable[str]) -> list[str]:
    """Evaluation suites in the protocol's order (in distribution first), then any others (e.g. blind)."""
    seen = list(dict.fromkeys(kinds))
    return [k for k in suite.protocol.suites if k in seen] + [k for k in seen if k not in suite.protocol.suites]


def scored_task(cells: list[dict[str, Any]], task: str) -> bool:
    """True when a task's score is not its success (PushT's coverage score), so tables and charts show it."""
    return any(abs(c.get("mean_score", c["success_rate"]) - c["success_rate"]) > 1e-9
               for c in cells if c["task"] == task)


def whisker(center: float, bounds: tuple[float, float]) -> tuple[float, float, float]:
    """(bar height, error below, error above) of a bar at `center` whose whisker spans `bounds` (an interval, or
    the range of the seeds' scores), as matplotlib's `yerr` takes them."""
    return center, max(0.0, center - bounds[0]), max(0.0, bounds[1] - center)


def plot_bars(cells: list[dict[str, Any]], suite: Suite, split: str) -> list[Path]:
    """One PNG per task: grouped bars (methods x evaluation suites) with Wilson whiskers; on a task whose score
    is not its success (PushT), the mean score with whiskers spanning the training seeds' scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(cells)
    paths = []
    for task in suite.tasks:
        keys = [k for k in agg if k[1] == task]
        if not keys:
            continue
        methods = [m for m in suite.variants if any(k[0] == m for k in keys)]
        kinds = suite_order(suite, (k[2] for k in keys))
        scored = scored_task(cells, task)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(methods) * max(1, len(kinds)) / 2), 3.6))
        width = 0.8 / len(kinds)
        for j, kind in enumerate(kinds):
            xs, ys, lo, hi = [], [], [], []
            for i, m in enumerate(methods):
                a = agg.get((m, task, kind))
                if a is None:
                    continue
                xs.append(i + (j - (len(kinds) - 1) / 2) * width)
                if scored:
                    seeds = [c.get("mean_score", c["success_rate"]) for c in a["seeds"]]
                    y, below, above = whisker(a["score"], (min(seeds), max(seeds)))
                else:
                    y, below, above = whisker(a["mean"], a["ci95"])
                ys.append(y)
                lo.append(below)
                hi.append(above)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=kind)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean score (whiskers: seed range)" if scored else "success rate")
        ax.set_title(f"{suite.name}: {task} ({split})")
        ax.legend(fontsize=7, ncol=min(4, len(kinds)))
        fig.tight_layout()
        path = suite.results_dir / f"{'fig' if split == 'test' else 'fig_validation'}_{task}.png"
        atomic_write_bytes(path, lambda f: fig.savefig(f, dpi=110, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite name (benchmarks/NAME/suite.toml) or path to a suite TOML file")
    p.add_argument("--work", default=None, help="folder for data, runs and checkpoints (default runs/benchmarks/NAME)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test (reported numbers) or validation (for choosing budgets, checkpoints, settings)")
    p.add_argument("--only", default=None, help="comma list of the suite's methods to run")
    p.add_argument("--tasks", default=None, help="comma list of the suite's tasks to run")
    p.add_argument("--seeds", default=None, help="comma list of training seeds to run")
    p.add_argument("--suites", default=None, help="comma list of evaluation suites to run")
    p.add_argument("--report", action="store_true", help="only rewrite results.csv/.md and the charts")
    p.add_argument("--train-only", action="store_true",
                   help="train (or resume) the selected runs without evaluating, e.g. a shared base run")
    p.add_argument("--dry-run", action="store_true", help="list the cells and whether each is done")
    p.add_argument("--compare", default=None, metavar="A,B",
                   help="paired comparison of two rows on their finished cells (same seeds and episodes): the "
                        "difference with a bootstrap interval over seeds and episodes, and McNemar's test "
                        "(--tasks and --seeds limit it)")
    p.add_argument("--metric", choices=("success", "score"), default="success",
                   help="with --compare: compare the episodes' successes (McNemar's test) or their task scores "
                        "(PushT's coverage score, where every success rate is 0 at a short budget; sign test)")
    p.add_argument("--scoreboard", default=None, metavar="A",
                   help="where row A wins, ties and loses: its paired difference against each row of --against "
                        "(default: the suite's [headline] rows), per task, in distribution and OOD pooled, with a "
                        "verdict from the interval (none under 3 shared training seeds); --tasks and --seeds limit it")
    p.add_argument("--against", default=None, metavar="B,C",
                   help="with --scoreboard: the rows to compare A against")
    p.add_argument("--out", default=None,
                   help="with --compare or --scoreboard: also write the result to this JSON file (--scoreboard: "
                        "and its table beside it, as .md)")
    from dapolicy.cli_options import add_device, add_quiet, add_threads, add_workers

    add_threads(p, None, "training's auto rule, the cores the load average leaves free")
    add_device(p, "training runs")
    p.add_argument("--eval-device", default="cpu",
                   help="where evaluation runs: cpu (default: the CPU suites' latencies are CPU figures), cuda, "
                        "cuda:N or auto (the paper suite on a GPU machine); recorded in every cell")
    add_workers(p)
    add_quiet(p)


def _csv_list(text: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else None


def _seed_list(text: str | None) -> list[int] | None:
    """`--seeds`: a comma list of integers, with an error that names the flag."""
    try:
        return _csv_list(text, int)
    except ValueError:
        raise SuiteError(f"--seeds takes a comma list of integer training seeds, e.g. 0,1,2; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    if args.report:
        for path in write_reports(suite).values():
            print(f"wrote {path}")
        return 0
    only, tasks, seeds = _csv_list(args.only), _csv_list(args.tasks), _seed_list(args.seeds)
    cells = plan_cells(suite, args.split, only, tasks, seeds, _csv_list(args.suites))
    work = Path(args.work) if args.work else Path("runs") / "benchmarks" / suite.name
    if args.compare and args.scoreboard:
        raise SuiteError("--compare and --scoreboard are two different reports: give one of them")
    if args.against and not args.scoreboard:
        raise SuiteError("--against goes with --scoreboard A")
    if args.compare:
        return _run_compare(args, suite, work, tasks, seeds)
    if args.scoreboard:
        return _run_scoreboard(args, suite, work, tasks, seeds)
    if not cells and not args.train_only:
        print(f"dap benchmark: no cell of suite {suite.name!r} on the {args.split} split matches this selection "
              f"(the rows' tasks, seeds, suites and splits in {suite.path} limit it)", file=sys.stderr)
        return 1
    if args.dry_run:
        stale = stale_cells(suite, cells, work)
        for c in cells:
            status = "stale" if c in stale else "done " if cell_path(suite, c).is_file() else "todo "
            print(f"{status} {c.file_name} ({c.split})" + (f": {stale[c]}" if c in stale else ""))
        return 0
    runner = Runner(suite, work, threads=args.threads, progress=not args.quiet, device=args.device,
                    workers=args.workers, eval_device=args.eval_device)
    try:
        if args.train_only:
            for variant, task, seed in plan_trainings(suite, only, tasks, seeds):
                print(f"trained: {runner.ensure_trained(variant, task, seed)}")
            return 0
        runner.run(cells)
    except KeyboardInterrupt:
        print(f"\ndap benchmark: interrupted; finished cells are kept in {suite.results_dir / 'cells'}; rerun the "
              f"same command to continue", file=sys.stderr)
        return 130
    written = write_reports(suite)
    stem = "results" if args.split == "test" else "results_validation"
    print(f"results: {written.get(stem + '.md', suite.results_dir / (stem + '.md'))}")
    return 0


def _run_compare(args: argparse.Namespace, suite: Suite, work: Path, tasks: list[str] | None,
                 seeds: list[int] | None) -> int:
    from dapolicy.compare import compare, markdown

    names = _csv_list(args.compare) or []
    if len(names) != 2:
        raise SuiteError(f"--compare takes two rows, A,B; got {args.compare!r}")
    report = compare(suite, names[0], names[1], args.split, tasks, work, args.metric, seeds)
    print(markdown(report))
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0


def _run_scoreboard(args: argparse.Namespace, suite: Suite, work: Path, tasks: list[str] | None,
                    seeds: list[int] | None) -> int:
    from dapolicy.scoreboard import markdown, scoreboard

    board = scoreboard(suite, args.scoreboard.strip(), _csv_list(args.against), args.split, tasks, work,
                       seeds=seeds)
    table = markdown(board)
    print(table)
    if args.out:  # the JSON, and the table beside it (same name, .md) for the docs to link
        write_json_atomic(args.out, board)
        _write_text(Path(args.out).with_suffix(".md"), table)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0
