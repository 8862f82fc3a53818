"""Where one row wins, ties and loses: its paired differences against every other row, task by task.

`dap benchmark SUITE --scoreboard A [--against B,C]` runs `--compare A,B` (`compare.py`) for each B on each task
and keeps two lines per task: in distribution and pooled over the OOD suites. Each entry is the difference A - B
with its 95% bootstrap interval over training seeds and episodes, and a verdict read off that interval:

* **win**: the interval lies above zero; **loss**: below zero; **tie**: it holds zero;
* **too few seeds**: the two rows share fewer than `min_seeds` training seeds (the protocol's 3): no claim,
  whatever the interval says.

A task whose score is not its success (PushT) is compared on the score, the others on success. Without
`--against`, B runs over the suite's `[headline]` rows. The verdicts only restate the intervals: a tie is not
evidence of equality, and rows that do not start from the same weights (`paired_init`) differ by that draw too.
"""

from __future__ import annotations

from typing import Any

from dapolicy.benchmark import Suite, SuiteError, read_cells, scored_task
from dapolicy.compare import OOD_POOL, compare, require_rows

IN_DISTRIBUTION = "none"
VERDICTS = ("win", "tie", "loss", "too few seeds")


def verdict(ci95: tuple[float, float] | list[float], seeds: int, min_seeds: int = 3) -> str:
    """What a difference's interval says: win (above 0), loss (below 0), tie, or too few training seeds."""
    if seeds < min_seeds:
        return "too few seeds"
    low, high = ci95
    return "win" if low > 0 else "loss" if high < 0 else "tie"


def scoreboard(suite: Suite, row: str, against: list[str] | None = None, split: str = "test",
               tasks: list[str] | None = None, work: Any = None, min_seeds: int = 3,
               seeds: list[int] | None = None) -> dict[str, Any]:
    """`row` against each row of `against` (default: the suite's headline rows but `row`), per task (`tasks`:
    only those), in distribution and OOD pooled, on their shared training seeds (`seeds`: only those). Entries
    where the two rows share no finished cell are left out."""
    require_rows(suite, row)
    others = [b for b in (against if against is not None else list(suite.headline)) if b != row]
    if not others:
        raise SuiteError("--scoreboard needs rows to compare against: pass --against B,C (the suite has no "
                         "[headline] rows besides this one)")
    require_rows(suite, *others)  # up front: a missing row must not pass for "no shared cells" below
    unknown = sorted(set(tasks or []) - set(suite.tasks))
    if unknown:
        raise SuiteError(f"suite {suite.name!r} has no task {', '.join(map(repr, unknown))} "
                         f"(tasks: {', '.join(suite.tasks)})")
    cells = read_cells(suite, split)
    entries: list[dict[str, Any]] = []
    skipped: list[str] = []  # cells with no per-episode records: their seeds drop out of the pair
    for task in [t for t in suite.tasks if tasks is None or t in tasks]:
        metric = "score" if scored_task(cells, task) else "success"
        for b in others:
            try:
                report = compare(suite, row, b, split, [task], work, metric, seeds)
            except SuiteError:  # no finished cells in common on this task
                continue
            skipped += [why for why in report["skipped"] if why not in skipped]
            for r in report["results"]:
                if r["suite"] not in (IN_DISTRIBUTION, OOD_POOL):
                    continue
                entries.append({"task": task, "suite": r["suite"], "against": b, "metric": metric,
                                "seeds": len(r["seeds"]), "n": r["n"], "rate_a": r["rate_a"], "rate_b": r["rate_b"],
                                "difference": r["difference"], "ci95": r["ci95"], "p": r["mcnemar_p"],
                                "verdict": verdict(r["ci95"], len(r["seeds"]), min_seeds)})
    if not entries:
        raise SuiteError(f"row {row!r} shares no finished cell with {', '.join(others)} ({split} split)")
    tally = {b: {v: sum(e["against"] == b and e["verdict"] == v for e in entries) for v in VERDICTS}
             for b in others}
    return {"suite": suite.name, "split": split, "row": row, "against": others, "min_seeds": min_seeds,
            "entries": entries, "tally": tally, "skipped": skipped}


def markdown(board: dict[str, Any]) -> str:
    """One table: a line per (task, in distribution / OOD pooled), a column per row compared against."""
    row, others = board["row"], [b for b in board["against"] if any(e["against"] == b for e in board["entries"])]
    lines = [f"Scoreboard of `{row}` ({board['suite']} suite, {board['split']} split): {row} - B in points of 100, "
             f"95% bootstrap interval over training seeds and episodes, shared training seeds in brackets; win / "
             f"loss when the interval excludes zero, tie when it holds it, no verdict under {board['min_seeds']} "
             f"seeds. Scored tasks (PushT) compare the score, the others success.", "",
             "| task | suite | " + " | ".join(f"vs `{b}`" for b in others) + " |", "|---|---|" + "---|" * len(others)]
    keys = list(dict.fromkeys((e["task"], e["suite"]) for e in board["entries"]))
    by = {(e["task"], e["suite"], e["against"]): e for e in board["entries"]}
    scored = {e["task"]: e["metric"] == "score" for e in board["entries"]}
    for task, kind in keys:
        cells = []
        for b in others:
            e = by.get((task, kind, b))
            if e is None:
                cells.append("-")
                continue
            lo, hi = e["ci95"]
            mark = {"win": "**win**", "loss": "**loss**"}.get(e["verdict"], e["verdict"])
            cells.append(f"{100 * e['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {mark} ({e['seeds']})")
        label = "in distribution" if kind == IN_DISTRIBUTION else "OOD pooled"
        lines.append(f"| {task}{' (score)' if scored[task] else ''} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| against | " + " | ".join(VERDICTS) + " |", "|---|" + "---|" * len(VERDICTS)]
    for b in others:
        lines.append(f"| `{b}` | " + " | ".join(str(board["tally"][b][v]) for v in VERDICTS) + " |")
    if board.get("skipped"):
        lines += ["", f"{len(board['skipped'])} cells left out (their seeds drop out of those pairs):"]
        lines += [f"- {why}" for why in board["skipped"]]
    return "\n".join(lines) + "\n"
