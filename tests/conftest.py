"""Test-wide settings: headless rendering, deterministic torch, small thread count."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DAP_TEST_THREADS", "1")))
torch.set_flush_denormal(True)
