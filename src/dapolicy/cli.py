"""The `dap` command line. Each sub-command lives in its own module, imported only when used, which
exposes `configure_parser(parser)` and `run(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dapolicy.info", "print a configuration's components and trainable parameter counts"),
    "collect": ("dapolicy.collect", "generate expert and random episodes into an episode store"),
    "render-ood": ("dapolicy.render_ood", "write a PNG grid of the out-of-distribution perturbations"),
    "train": ("dapolicy.train", "train a policy (for DAP: VAE, dynamics model, then policy)"),
    "eval": ("dapolicy.evaluate", "seeded closed-loop evaluation, in distribution or OOD"),
    "robustness": ("dapolicy.robustness", "success vs OOD perturbation strength, one line per run (PNG + JSON)"),
    "diagnose": ("dapolicy.diagnose", "Fig. 2 of the paper: quality of the extrapolated estimates vs tau"),
    "bench": ("dapolicy.bench", "per-chunk inference latency of each coupling mode, as ratios to the plain policy"),
    "benchmark": ("dapolicy.benchmark", "methods x tasks x seeds x evaluation suites, resumable, committed results"),
    "quickstart": ("dapolicy.quickstart", "collect, train, evaluate and diagnose on the default task"),
    "import": ("dapolicy.dataset_io", "import a LeRobot v3 or Diffusion-Policy dataset into an episode store"),
    "export": ("dapolicy.dataset_io", "export an episode store as a LeRobotDataset v3 folder"),
    "serve": ("dapolicy.serve", "serve a policy over WebSocket for a robot (--check: simulated robot loop)"),
}


def _headless_defaults() -> None:
    """Simulators render off-screen; set before mujoco / pygame are imported."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


#: Commands that keep nothing of an interrupted run: their Ctrl-C message promises no resume.
NOT_RESUMABLE = frozenset({"info", "render-ood", "diagnose", "bench", "serve"})

#: Set to show the full traceback of an error (also `dap --debug COMMAND ...`).
DEBUG_ENV = "DAP_DEBUG"

# Errors a user can cause and fix (a wrong path, a bad value, a corrupt file): one line, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError, KeyError)


def _missing_extra(err: ModuleNotFoundError) -> str:
    """What to install for a missing optional module."""
    name = (err.name or "").split(".")[0]
    extras = {"metaworld": "sim", "gym_pusht": "sim", "pymunk": "sim", "mujoco": "sim", "pygame": "sim",
              "pyarrow": "lerobot", "av": "lerobot", "tensorboard": None, "wandb": None}
    if name in extras and extras[name]:
        return f"the {name!r} package is missing: install the extra with  pip install 'dapolicy[{extras[name]}]'"
    return f"the {name!r} package is missing: pip install {name}"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the flag and the fix: the usage block that argparse
    prints first buries the problem for a newcomer (`--help` still shows everything)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(configure: str | None = None, every: bool = False) -> argparse.ArgumentParser:
    """The `dap` parser; the options of `configure` (or of every command with `every`, for tests and docs) are
    added. Only those commands' modules are imported, so a missing optional package fails only its command."""
    parser = OneLineParser(prog="dap", description="DAP: Dynamics-Aligned Flow Matching Policy",
                           epilog=f"Errors print one line; `dap --debug COMMAND ...` (or {DEBUG_ENV}=1) "
                                  "shows the traceback.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="`dap COMMAND --help` lists its options")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if every or name == configure:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `dap` command; returns the exit code (2: a user error, printed as one line; 130: Ctrl-C)."""
    _headless_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get(DEBUG_ENV))
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(chosen)
    except ModuleNotFoundError as err:
        if debug:
            raise
        print(f"dap {chosen}: error: {_missing_extra(err)}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed): a code, not an exit
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        kept = "" if args.command in NOT_RESUMABLE else " (finished work is kept; rerun the same command to continue)"
        print(f"\ndap {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if debug:
            raise
        print(f"dap {args.command}: error: {_missing_extra(err)}", file=sys.stderr)
        return 2
    except _USER_ERRORS as err:
        if debug:
            raise
        print(f"dap {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return int(code or 0)


def _one_line(err: BaseException) -> str:
    """The message of a user error on one line (a KeyError's bare key says nothing on its own)."""
    message = f"missing key {err}" if isinstance(err, KeyError) else str(err)
    return " ".join(message.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
