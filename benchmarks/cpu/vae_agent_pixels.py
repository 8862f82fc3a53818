"""Does a DAP run's image VAE keep PushT's agent, the blue disc that the action moves?

The dynamics model predicts in the VAE's latent space; what the VAE cannot reconstruct, no action can change in
a prediction. PushT's agent covers about 11 of the 4,096 pixels of a 64 px frame, so a pixel-MSE VAE can
drop it and lose almost nothing. This script reconstructs held-out frames and counts the agent's pixels
(clearly blue: b > 0.6, b - r > 0.25, b - g > 0.15) in the real frames and in their reconstructions.

    python benchmarks/cpu/vae_agent_pixels.py RUN [--frames 64] [--png strip.png] [--json out.json]

RUN is a finished DAP run (or model folder) trained on PushT data; the frames come from its validation
episodes (as `dap diagnose` chooses them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dapolicy.atomic import write_json_atomic
from dapolicy.diagnose import to_numpy, validation_episodes
from dapolicy.evaluate import load_policy


def agent_mask(images: np.ndarray) -> np.ndarray:
    """Pixels of PushT's agent in RGB images in [0, 1] (..., 3) -> bool (...)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    return (b > 0.6) & (b - r > 0.25) & (b - g > 0.15)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 frames (the episode store's and `decode_latents`' format) -> float32 in [0, 1]."""
    return np.asarray(images, dtype=np.float32) / 255.0


def measure(run: str, frames: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    policy = load_policy(run, "cpu")
    if not (hasattr(policy, "encode_latents") and hasattr(policy, "decode_latents")):
        raise SystemExit(f"{run}: method {policy.method!r} has no image VAE")
    data, val_ids, _ = validation_episodes(run, None, None)
    images = data.arrays()["images"]  # the validation episodes' frames only
    idx = np.sort(np.random.default_rng(seed).choice(len(images), min(frames, len(images)), replace=False))
    real_raw = np.asarray(images[idx])  # [N, cameras, S, S, 3]
    with torch.no_grad():
        recon = to_unit(to_numpy(policy.decode_latents(policy.encode_latents(real_raw))))
    real = to_unit(real_raw)
    mask = agent_mask(real)
    in_real = mask.sum(axis=(1, 2, 3))
    in_recon = agent_mask(recon).sum(axis=(1, 2, 3))
    with_agent = in_real > 0
    result = {
        "run": str(run), "frames": int(len(idx)), "validation_episodes": [int(e) for e in val_ids],
        "agent_pixels_real_mean": float(in_real.mean()),
        "agent_pixels_recon_mean": float(in_recon.mean()),
        "frames_agent_kept": int((in_recon[with_agent] >= 0.5 * in_real[with_agent]).sum()),
        "frames_with_agent": int(with_agent.sum()),
        "mse_on_agent_pixels": float(((recon - real) ** 2).mean(-1)[mask].mean()) if mask.any() else None,
        "mse_all_pixels": float(((recon - real) ** 2).mean()),
    }
    return result, real, recon


def save_strip(real: np.ndarray, recon: np.ndarray, path: Path, columns: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, len(real) // columns)
    fig, axes = plt.subplots(2, columns, figsize=(2 * columns, 4), squeeze=False)
    for j in range(columns):
        for row, images in enumerate((real, recon)):
            axes[row, j].imshow(np.clip(images[min(j * step, len(images) - 1), 0], 0, 1))
            axes[row, j].axis("off")
    axes[0, 0].set_title("real")
    axes[1, 0].set_title("VAE reconstruction")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="finished DAP run (or model folder) trained on PushT")
    parser.add_argument("--frames", type=int, default=64, help="held-out frames to reconstruct (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frame choice (default 0)")
    parser.add_argument("--png", type=Path, help="write real frames over their reconstructions here")
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be at least 1, got {args.frames}")
    torch.set_num_threads(1)
    try:
        result, real, recon = measure(args.run, args.frames, args.seed)
    except (FileNotFoundError, ValueError) as exc:  # a wrong run folder, or data it cannot read
        parser.exit(2, f"vae_agent_pixels.py: {exc}\n")
    print(f"agent pixels per frame: real {result['agent_pixels_real_mean']:.1f}, reconstructed "
          f"{result['agent_pixels_recon_mean']:.1f}; agent kept (>= half its pixels) in "
          f"{result['frames_agent_kept']}/{result['frames_with_agent']} frames; pixel MSE on the agent "
          f"{result['mse_on_agent_pixels']:.4f}, everywhere {result['mse_all_pixels']:.4f}")
    if args.png:
        save_strip(real, recon, args.png)
    if args.json:
        write_json_atomic(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
