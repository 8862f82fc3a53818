"""Run metrics: `metrics.jsonl` (one JSON object per line), loss plots, optional TensorBoard / wandb.

metrics.jsonl is the source of truth; plots and the optional sinks are derived from the same records.
Record kinds ("kind" field): "train" (scalars averaged over the log interval, lr, samples_per_s),
"val" (validation loss with EMA weights), "stage_end" (summary of a finished stage).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

#: The package each optional logger needs (`--logger NAME`).
LOGGER_PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: The wandb project when neither `--wandb-project` nor this environment variable names one.
WANDB_PROJECT_ENV = "WANDB_PROJECT"
DEFAULT_WANDB_PROJECT = "dapolicy"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def check_logger(logger: str | None) -> None:
    """Fail before a run writes anything when `logger`'s package is missing, naming the fix (a stored run keeps
    its logger, so a failure after the run folder is written would repeat on every retry)."""
    if logger in (None, "none"):
        return
    if logger not in LOGGER_PACKAGES:
        raise ValueError(f"unknown logger {logger!r}: expected none, tensorboard or wandb")
    package = LOGGER_PACKAGES[logger]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"--logger {logger} needs the {package!r} package, which is not installed: pip install "
                         f"{package}, or pass --logger none (metrics.jsonl and the loss plots are always written)")


class MetricsLog:
    """Appends records to RUN/metrics.jsonl and forwards scalars to an optional logger.

    `close(failed)` ends the optional logger's run (wandb marks it finished or failed); call it at the end of
    training, also on an error, or wandb keeps the run "running" for ever.
    """

    def __init__(self, path: Path, logger: str = "none", run_dir: Path | None = None,
                 run_config: dict[str, Any] | None = None, wandb_project: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink, self._close = _make_sink(logger, run_dir or self.path.parent, run_config or {}, wandb_project)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        if self._sink is not None:
            self._sink(record)

    def close(self, failed: bool = False) -> None:
        """End the optional logger's run (idempotent)."""
        close, self._sink, self._close = self._close, None, None
        if close is not None:
            close(failed)

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, stage_order: tuple[str, ...], stage: str, step: int) -> None:
        """Drop records written after the checkpoint a resume starts from (the interrupted run logged
        steps that will be trained again), so the log reads like one uninterrupted run."""
        if not self.path.exists():
            return
        rank = {s: i for i, s in enumerate(stage_order)}
        keep = []
        for r in read_metrics(self.path):
            r_rank = rank.get(r.get("stage", ""), -1)
            if r_rank > rank[stage] or (r_rank == rank[stage] and (r.get("step", 0) > step
                                                                 or r.get("kind") == "stage_end")):
                continue
            keep.append(r)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)


class NullLog:
    """The metrics log of a process other than rank 0 of a data-parallel job: rank 0 alone writes records."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return []

    def truncate_after(self, stage_order: tuple[str, ...], stage: str, step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(records: list[dict[str, Any]], stage: str, out_path: Path) -> None:
    """Train and validation loss of one stage against the step, log-scale when positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records
             if r.get("stage") == stage and r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    val = [(r["step"], r["val_loss"]) for r in records
           if r.get("stage") == stage and r.get("kind") == "val" and isinstance(r.get("val_loss"), float)]
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (EMA)")
    values = [v for _, v in train + val]
    if values and min(values) > 0:
        from matplotlib.ticker import LogFormatter

        ax.set_yscale("log")  # plain-text tick labels: mathtext layout costs seconds per figure on a busy CPU
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"stage: {stage}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


Sink = Callable[[dict[str, Any]], None]
Closer = Callable[[bool], None]


def _make_sink(logger: str, run_dir: Path, run_config: dict[str, Any],
               wandb_project: str | None = None) -> tuple[Sink | None, Closer | None]:
    """An optional extra destination for scalars and how to end it; the package is imported only when asked for.

    wandb_project: the wandb project (default: $WANDB_PROJECT, else "dapolicy").
    """
    if logger == "none":
        return None, None
    check_logger(logger)
    if logger == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

        def tb(record: dict[str, Any]) -> None:
            prefix = f"{record.get('stage', 'run')}/{record.get('kind', 'train')}"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))
            writer.flush()

        return tb, lambda failed: writer.close()
    if logger == "wandb":
        import wandb

        project = wandb_project or os.environ.get(WANDB_PROJECT_ENV) or DEFAULT_WANDB_PROJECT
        run = wandb.init(project=project, dir=str(run_dir), config=run_config)

        def wb(record: dict[str, Any]) -> None:
            prefix = f"{record.get('stage', 'run')}/{record.get('kind', 'train')}"
            run.log({f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

        return wb, lambda failed: run.finish(exit_code=1 if failed else 0)
    raise ValueError(f"unknown logger {logger!r}")
