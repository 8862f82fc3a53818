"""Paired comparison of two benchmark rows: the same test episodes, so compare them episode by episode.

Two methods of a suite meet the same episodes (start states and OOD draws follow from the episode seed) and
train with the same seeds, so their difference is best measured on pairs: per (training seed, episode seed),
did A succeed, did B? Pooled Wilson intervals of each method's own rate ignore that pairing and overstate
the noise of the difference. Reported per task and suite, and pooled over the OOD suites:

* the difference of success rates (A - B) with a 95% interval from a two-level bootstrap (training seeds,
  then episodes within each drawn seed), so seed-to-seed variation counts, not only episode noise;
* the discordant pairs (A alone succeeded, B alone) and the exact McNemar p-value on them (episode noise
  only, given the trained models).

When the rows share cells on more than one task, rows headed "all tasks" pool each suite (and the OOD pool)
over the tasks: every (task, training seed) run is one unit, and the bootstrap draws seeds within each task
(stratified), so a task's weight stays its number of episodes.

`--metric score` compares the per-episode task score instead (PushT's coverage / 0.95, clipped at 1, the
Diffusion-Policy score; Meta-World's is the success): where a budget leaves every success rate at 0, the
score still orders the methods. The counts are then the pairs in which A scored higher, and B, and the
p-value is the exact sign test on them (McNemar's test is that test on 0/1 outcomes).

    dap benchmark SUITE --compare A,B [--metric success|score] [--tasks T] [--split test] [--work W] [--out F.json]

Episode outcomes come from the cells (`episode_successes`, `episode_scores`) or, for cells written before they
were recorded, from the run folders' evaluation records under --work, which must then agree with the cell's
count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dapolicy.benchmark import Cell, Suite, SuiteError, cell_path, is_ood_suite, plan_cells, run_folder, run_key

OOD_POOL = "OOD (pooled)"
ALL_TASKS = "all tasks"
METRICS = ("success", "score")
_CELL_FIELD = {"success": "episode_successes", "score": "episode_scores"}


def _require_metric(metric: str) -> None:
    if metric not in METRICS:
        raise SuiteError(f"unknown metric {metric!r} (metrics: {', '.join(METRICS)})")


def require_rows(suite: Suite, *names: str) -> None:
    """A SuiteError naming the first of `names` that is not a row of the suite, with the rows it has."""
    for name in names:
        if name not in suite.variants:
            raise SuiteError(f"suite {suite.name!r} has no row {name!r} (rows: {', '.join(suite.variants)})")


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs are Binomial(n, 1/2) under 'no difference'."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(pairs: dict[Any, np.ndarray], resamples: int = 4000, seed: int = 0,
                      strata: dict[Any, str] | None = None) -> dict[str, Any]:
    """pairs: training seed (or any key of one trained pair of runs) -> array [episodes, 2] of A's and B's
    outcome on the same episodes (success as bool or 0/1, or a score in [0, 1]). strata: key -> group (a task)
    within which the bootstrap draws keys, so each group keeps its number of runs; None: one group.

    Returns the means ("rate_a", "rate_b"), their difference, its 95% two-level bootstrap interval, the pairs
    in which A did better ("a_only") and B did, and the exact test on those counts ("mcnemar_p": McNemar's
    test for successes, the sign test for scores)."""
    if not pairs:
        raise ValueError("no paired episodes to compare")
    seeds = sorted(pairs)
    stacked = np.concatenate([pairs[s] for s in seeds]).astype(float)
    a, b = stacked[:, 0], stacked[:, 1]
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    per_seed = [pairs[s][:, 0].astype(float) - pairs[s][:, 1].astype(float) for s in seeds]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(seeds):
        groups.setdefault(strata[s] if strata else "", []).append(i)
    for i in range(resamples):
        drawn = np.concatenate([np.asarray(members)[rng.integers(0, len(members), len(members))]
                                for members in groups.values()])
        diffs[i] = np.mean(np.concatenate([per_seed[j][rng.integers(0, len(per_seed[j]), len(per_seed[j]))]
                                           for j in drawn]))
    a_only, b_only = int(np.sum(a > b)), int(np.sum(a < b))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"n": int(len(a)), "seeds": seeds, "rate_a": float(a.mean()), "rate_b": float(b.mean()),
            "difference": float(a.mean() - b.mean()), "ci95": [float(low), float(high)],
            "a_only": a_only, "b_only": b_only, "mcnemar_p": mcnemar_exact_p(a_only, b_only)}


def episode_outcomes(suite: Suite, cell: Cell, work: Path | None, metric: str = "success") -> dict[int, float]:
    """Episode seed -> success (0/1) or score of one finished cell (from the cell, else its run folder's
    records)."""
    _require_metric(metric)
    path = cell_path(suite, cell)
    if not path.is_file():
        raise SuiteError(f"cell {cell.file_name} ({cell.split}) is not finished: run the benchmark first")
    record = json.loads(path.read_text())
    if _CELL_FIELD[metric] in record:
        first = record["episode_seeds"][0]
        return {first + i: float(s) for i, s in enumerate(record[_CELL_FIELD[metric]])}
    if work is None:
        raise SuiteError(f"cell {cell.file_name} predates per-episode records: pass --work with its run folders")
    run = run_folder(work, *run_key(suite, cell)) / "eval_benchmark"
    if not run.is_dir():
        raise SuiteError(f"cell {cell.file_name} ({cell.split}) records no per-episode {metric}, and {run} does not "
                         f"exist: pass the --work folder that holds its run")
    kind = cell.suite.replace(":", "@")
    for candidate in (run / f"{cell.split}_{cell.variant}_{kind}.json", run / f"{cell.split}_{kind}.json"):
        if not candidate.is_file():
            continue
        episodes = json.loads(candidate.read_text())
        # an older layout shared one file per run and suite between rows: use it only if it is this cell's
        same = (episodes["n_success"] == record["successes"] and episodes["n_episodes"] == record["episodes"]
                and episodes["settings"].get("mode") == record.get("mode")
                and episodes["settings"].get("flow_steps") == record.get("flow_steps"))
        if same:
            return {int(e["seed"]): float(e["success"] if metric == "success" else e["score"])
                    for e in episodes["episodes"]}
    raise SuiteError(f"no episode records of cell {cell.file_name} ({cell.split}) under {run} that match it (an "
                     f"older run folder kept one file per suite, which another row may have overwritten); "
                     f"re-evaluate the cell to compare it")


def compare(suite: Suite, a: str, b: str, split: str = "test", tasks: list[str] | None = None,
            work: Path | None = None, metric: str = "success", seeds: list[int] | None = None) -> dict[str, Any]:
    """Paired comparison of rows `a` and `b` per task and suite (the cells both have, same seeds), on the
    episodes' successes or scores (`metric`); `seeds` limits it to those training seeds (None: all)."""
    _require_metric(metric)
    require_rows(suite, a, b)
    cells_a = {(c.task, c.seed, c.suite): c for c in plan_cells(suite, split, [a], tasks, seeds)}
    cells_b = {(c.task, c.seed, c.suite): c for c in plan_cells(suite, split, [b], tasks, seeds)}
    shared = sorted(k for k in set(cells_a) & set(cells_b)
                    if cell_path(suite, cells_a[k]).is_file() and cell_path(suite, cells_b[k]).is_file())
    if not shared:
        raise SuiteError(f"rows {a!r} and {b!r} have no finished cells in common ({split} split)")
    rows: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    skipped = []
    for task, seed, kind in shared:
        try:
            sa = episode_outcomes(suite, cells_a[(task, seed, kind)], work, metric)
            sb = episode_outcomes(suite, cells_b[(task, seed, kind)], work, metric)
        except SuiteError as err:
            skipped.append(str(err))
            continue
        common = sorted(set(sa) & set(sb))
        pairs = np.array([[sa[e], sb[e]] for e in common], dtype=float)
        rows.setdefault((task, kind), {})[seed] = pairs
        if is_ood_suite(kind):
            pooled = rows.setdefault((task, OOD_POOL), {})
            pooled[seed] = pairs if seed not in pooled else np.concatenate([pooled[seed], pairs])
    order = {k: i for i, k in enumerate(suite.protocol.suites)}
    results = [{"task": task, "suite": kind, **paired_difference(pairs)}
               for (task, kind), pairs in sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99)))]
    for kind, (pairs, strata) in sorted(pooled_over_tasks(rows).items(), key=lambda kv: order.get(kv[0], 99)):
        results.append({"task": ALL_TASKS, "suite": kind, **paired_difference(pairs, strata=strata)})
    return {"suite": suite.name, "split": split, "metric": metric, "a": a, "b": b,
            "seeds": sorted({seed for _, seed, _ in shared}), "results": results, "skipped": skipped}


def pooled_over_tasks(rows: dict[tuple[str, str], dict[int, np.ndarray]]
                      ) -> dict[str, tuple[dict[str, np.ndarray], dict[str, str]]]:
    """Per suite that two or more tasks share: its pairs over all of them, keyed "task:seed", and each key's
    task (the bootstrap's strata)."""
    out: dict[str, tuple[dict[str, np.ndarray], dict[str, str]]] = {}
    for kind in {k for _, k in rows}:
        tasks = sorted(t for t, k in rows if k == kind)
        if len(tasks) < 2:
            continue
        keyed = {(t, s): p for t in tasks for s, p in rows[(t, kind)].items()}
        out[kind] = ({f"{t}:{s}": p for (t, s), p in keyed.items()}, {f"{t}:{s}": t for t, s in keyed})
    return out


def markdown(report: dict[str, Any]) -> str:
    a, b = report["a"], report["b"]
    score = report.get("metric") == "score"
    what, counts, test = (("mean score", "A higher / B higher", "sign test p") if score
                          else ("success", "A only / B only", "McNemar p"))
    lines = [f"Paired comparison ({what}, in points of 100), {report['suite']} suite, {report['split']} split: "
             f"{a} (A) against {b} (B)", "",
             f"| task | suite | n (seeds) | A | B | A - B [95% CI, bootstrap over seeds and episodes] | "
             f"{counts} | {test} |", "|---|---|---|---|---|---|---|---|"]
    unit = "" if score else "%"
    for r in report["results"]:
        lo, hi = r["ci95"]
        lines.append(f"| {r['task']} | {r['suite']} | {r['n']} ({len(r['seeds'])}) | "
                     f"{100 * r['rate_a']:.1f}{unit} | {100 * r['rate_b']:.1f}{unit} | "
                     f"{100 * r['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                     f"{r['a_only']} / {r['b_only']} | {r['mcnemar_p']:.3g} |")
    for reason in report["skipped"]:
        lines.append(f"\nskipped: {reason}")
    return "\n".join(lines)
