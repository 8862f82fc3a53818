"""The `dap` command line. Each sub-command lives in its own module, imported only when used, which
exposes `configure_parser(parser)` and `run(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dapolicy.info", "print a configuration's components and trainable parameter counts"),
    "collect": ("dapolicy.collect", "generate expert and random episodes into an episode store"),
    "render-ood": ("dapolicy.render_ood", "write a PNG grid of the out-of-distribution perturbations"),
    "train": ("dapolicy.train", "train a policy (for DAP: VAE, dynamics model, then policy)"),
    "eval": ("dapolicy.evaluate", "seeded closed-loop evaluation, in distribution or OOD"),
    "diagnose": ("dapolicy.diagnose", "Fig. 2 of the paper: quality of the extrapolated estimates vs tau"),
    "bench": ("dapolicy.bench", "per-chunk inference latency of each coupling mode, as ratios to the plain policy"),
    "benchmark": ("dapolicy.benchmark", "methods x tasks x seeds x evaluation suites, resumable, results in benchmarks/"),
    "quickstart": ("dapolicy.quickstart", "collect, train, evaluate and diagnose on the default task"),
    "import": ("dapolicy.dataset_io", "import a LeRobot v3 or Diffusion-Policy dataset into an episode store"),
    "export": ("dapolicy.dataset_io", "export an episode store as a LeRobotDataset v3 folder"),
    "serve": ("dapolicy.serve", "serve a policy over WebSocket for a robot (--check: simulated robot loop)"),
}


def _headless_defaults() -> None:
    """Simulators render off-screen; set before mujoco / pygame are imported."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def main(argv: list[str] | None = None) -> int:
    _headless_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dap", description="DAP: Dynamics-Aligned Flow Matching Policy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv[:1] == [name]:  # only the chosen command's module is imported
            importlib.import_module(module).configure_parser(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    code = importlib.import_module(args._module).run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
