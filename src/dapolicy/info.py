"""`dap info`: the registered methods, a configuration's components and trainable parameter counts, and
(with --fields) every config field that `--set` can change."""

from __future__ import annotations

import argparse

from dapolicy.spec import EnvSpec


def default_spec(image_size: int = 64, cameras: int = 2, action_dim: int = 4, proprio_dim: int = 4) -> EnvSpec:
    """A Meta-World-shaped task (two 64-px cameras, 4-D actions), for counting parameters without data."""
    return EnvSpec(name="info", cameras=tuple(f"cam{i}" for i in range(cameras)), image_size=image_size,
                   action_dim=action_dim, proprio_dim=proprio_dim, max_steps=1)


def parameter_table(methods: list[str], sizes: list[str], spec: EnvSpec) -> list[dict]:
    """One row per (method, size): trainable parameters per stage and in total."""
    import torch

    from dapolicy.policies.registry import get_method, make_policy

    rows = []
    for method in methods:
        entry = get_method(method)
        for size in sizes:
            with torch.device("meta"):  # shapes only: a paper-size model is counted without allocating it
                counts = make_policy(method, spec, size=size).parameter_counts()
            rows.append({"method": method, "size": size, "stand_in": entry.stand_in, **counts})
    return rows


def configure_parser(p: argparse.ArgumentParser) -> None:
    from dapolicy.cli_options import positive_int
    from dapolicy.policies.registry import SIZES, method_names

    p.add_argument("--method", default=None, choices=method_names(), help="one method (default: every method)")
    p.add_argument("--config", default=None, choices=SIZES, help="one size (default: every size)")
    p.add_argument("--fields", action="store_true",
                   help="list every config field of --method/--config (default dap/small) with its value")
    p.add_argument("--image-size", type=positive_int, default=64, help="image side of the task (default 64)")
    p.add_argument("--cameras", type=positive_int, default=2, help="number of cameras (default 2)")
    p.add_argument("--action-dim", type=positive_int, default=4, help="action dimension (default 4)")
    p.add_argument("--proprio-dim", type=positive_int, default=4, help="proprioception dimension (default 4)")


def run(args: argparse.Namespace) -> int:
    from dapolicy.configuration import to_dict
    from dapolicy.overrides import flatten
    from dapolicy.policies.registry import SIZES, get_method, method_names

    if args.fields:
        method, size = args.method or "dap", args.config or "small"
        for name, value in flatten(to_dict(get_method(method).config(size))).items():
            print(f"{name} = {value!r}")
        return 0
    spec = default_spec(args.image_size, args.cameras, args.action_dim, args.proprio_dim)
    methods = [args.method] if args.method else list(method_names())
    sizes = [args.config] if args.config else list(SIZES)
    print(f"task shape: {args.cameras} cameras x {args.image_size} px, action dim {args.action_dim}, "
          f"proprio dim {args.proprio_dim}")
    for method in methods:
        entry = get_method(method)
        print(f"\n{method}{' (stand-in)' if entry.stand_in else ''}: {entry.summary}")
        for row in parameter_table([method], sizes, spec):
            parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in row.items()
                              if k not in ("method", "size", "stand_in", "total"))
            print(f"  {row['size']:<6} {row['total']:>13,d} trainable parameters ({row['total'] / 1e6:.1f}M): {parts}")
    return 0
