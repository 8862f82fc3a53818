"""The flags every `dap` command shares, defined once so they read and behave the same everywhere.

    --device   where the model runs: auto (a GPU if visible, else cpu), cpu, cuda, cuda:N
    --threads  torch CPU threads (evaluation-type commands default to 1: OpenMP threads stall on a shared CPU)
    --workers  evaluation episodes in N processes at once (eval, robustness, benchmark, quickstart)
    --quiet    no progress bars
    --seed     the seed of what the command draws (each command says what)
    --out      where the command writes (each command says what)
    --sampler  the fast sampler's options for FM and DAP, e.g. parallel=off (bench, serve)
    --matmul-precision  float32 matmul precision: high = TF32 on NVIDIA GPUs (bench, serve)

Commands call these from their `configure_parser`; the values are checked when the command runs (a bad one is
a one-line error, see `dapolicy.cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

DEVICE_HELP = "auto (default: a GPU if visible, else cpu), cpu, cuda or cuda:N"


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (a bad value is a usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_device(p: argparse.ArgumentParser | Any, what: str = "the model runs") -> None:
    """--device, default auto everywhere: a newcomer with a GPU uses it, one without is not told to pass cpu."""
    p.add_argument("--device", default="auto", help=f"where {what}: {DEVICE_HELP}")


def add_threads(p: argparse.ArgumentParser | Any, default: int | None, what: str) -> None:
    """--threads with the command's default, stated in the help (`what` says what the default means)."""
    p.add_argument("--threads", type=positive_int, default=default, metavar="N",
                   help=f"torch CPU threads (default: {what})")


#: The --threads default of evaluation-type commands (eval, diagnose, robustness, serve): torch's OpenMP threads
#: stall badly when another job loads the cores, and one thread per process is what their numbers were made with.
EVAL_THREADS = 1
EVAL_THREADS_HELP = "1; torch's OpenMP threads stall on a shared machine, so raise it only on an idle one"


def add_workers(p: argparse.ArgumentParser | Any) -> None:
    """--workers: evaluation episodes side by side in that many processes (the simulator runs on one core)."""
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="run episodes in N processes at once, each with --threads torch threads; the same results "
                        "as one process, faster where the simulator is the bottleneck (default 1)")


def add_quiet(p: argparse.ArgumentParser | Any, *aliases: str) -> None:
    """--quiet (dest `quiet`); `aliases` are older spellings kept working but hidden from --help."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for alias in aliases:
        p.add_argument(alias, dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_seed(p: argparse.ArgumentParser | Any, default: int | None, what: str, *aliases: str) -> None:
    """--seed; `what` says what it seeds and what the default is; `aliases`: older spellings, hidden."""
    p.add_argument("--seed", type=int, default=default, help=what)
    for alias in aliases:
        p.add_argument(alias, dest="seed", type=int, help=argparse.SUPPRESS)


def add_out(p: argparse.ArgumentParser | Any, what: str, *aliases: str, required: bool = False,
            default: str | None = None, dest: str = "out") -> None:
    """--out (plus older spellings in `aliases`); `what` says what is written there and the default."""
    p.add_argument("--out", *aliases, dest=dest, required=required, default=default, metavar="PATH", help=what)


def sampler_settings(text: str) -> dict[str, Any]:
    """argparse type: `trace=on,parallel=off,threads=1` -> the fast sampler's option changes (checked by
    `SamplerOptions`, so a bad key or value is a usage error naming it)."""
    from dapolicy.policies.fast_sampler import SamplerOptions

    fields = {f.name for f in dataclasses.fields(SamplerOptions)}
    changes: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in fields:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {sorted(fields)}, "
                                             f"got {item!r}")
        value = value.strip()
        changes[key.strip()] = int(value) if value.isdigit() else value
    try:
        SamplerOptions(**changes)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return changes


def add_sampler(p: argparse.ArgumentParser | Any) -> None:
    """--sampler KEY=VALUE[,...]: the fast sampler's options for every FM / DAP model of the command."""
    p.add_argument("--sampler", type=sampler_settings, default={}, metavar="KEY=VALUE[,...]",
                   help="fast-sampler options for DAP and FM, e.g. parallel=off or trace=off (see "
                        "policies/fast_sampler.py::SamplerOptions; default: its auto rules)")


def apply_sampler(settings: dict[str, Any]) -> None:
    """Make `--sampler`'s changes the default of every policy this process samples from."""
    if settings:
        from dapolicy.policies.fast_sampler import set_options

        set_options(None, **settings)


MATMUL_PRECISIONS = ("highest", "high", "medium")


def add_matmul_precision(p: argparse.ArgumentParser | Any) -> None:
    """--matmul-precision: TF32 on a GPU is opt-in, since it moves the actions (by ~4e-4 of their spread at the
    paper size on an H200) while it takes coupled DAP from 37 to 29 ms per chunk there."""
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default=None,
                   help="torch.set_float32_matmul_precision for the run: high = TF32 matmuls on NVIDIA GPUs, "
                        "faster and not bit-equal to fp32 (default: torch's, highest; no effect on a CPU)")


def apply_matmul_precision(precision: str | None) -> None:
    """Set `--matmul-precision` for the whole process (None leaves torch's setting alone)."""
    if precision:
        import torch

        torch.set_float32_matmul_precision(precision)


def resolve_device(device: str | None) -> str:
    """'auto' (or None) -> 'cuda' when a GPU is visible, else 'cpu'; a CUDA device without a GPU is an error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use {DEVICE_HELP}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch (use --device cpu, or auto)")
    return device
