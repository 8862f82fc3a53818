"""`dap info`: a configuration's components and their trainable parameter counts."""

from __future__ import annotations

import argparse

from dapolicy.spec import EnvSpec
from dapolicy.policies import DAPPolicy, get_config


def default_spec(image_size: int = 64, cameras: int = 2, action_dim: int = 4, proprio_dim: int = 4) -> EnvSpec:
    """A Meta-World-shaped task (two 64-px cameras, 4-D actions), for counting parameters without data."""
    return EnvSpec(name="info", cameras=tuple(f"cam{i}" for i in range(cameras)), image_size=image_size,
                   action_dim=action_dim, proprio_dim=proprio_dim, max_steps=1)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="small", help="named configuration: tiny | small | paper")
    p.add_argument("--method", default="dap", choices=["dap", "fm"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--action-dim", type=int, default=4)


def run(args: argparse.Namespace) -> int:
    cfg = get_config(args.config, method=args.method)
    spec = default_spec(args.image_size, args.cameras, args.action_dim)
    counts = DAPPolicy(cfg, spec).parameter_counts()
    print(f"config {args.config!r} method {args.method!r} ({args.cameras} cameras x {args.image_size} px, "
          f"action dim {args.action_dim}, H={cfg.horizon}, T_o={cfg.n_obs_steps}, K={cfg.flow.steps})")
    for name, n in counts.items():
        print(f"  {name:<10} {n:>14,d} trainable parameters ({n / 1e6:.1f}M)")
    return 0
