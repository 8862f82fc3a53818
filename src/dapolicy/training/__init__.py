"""Training machinery behind `dap train` (see `dapolicy.train` for the entry points).

config      TrainConfig and per-preset step budgets
schedule    warm-up + cosine learning rate as a pure function of the step
ema         Diffusion-Policy EMA of a stage's weights
checkpoint  atomic checkpoints, RNG state, per-step seeds (exact resume)
batches     episode selection, validation split, step-indexed batches
latents     the frozen-VAE latent cache
metrics     metrics.jsonl, loss plots, optional TensorBoard / wandb
loop        one stage's optimisation loop (micro-batches, gradient accumulation)
distributed data-parallel processes: process group, batch split, gradient all-reduce
trainer     runs the stages into a run folder
rundir      the run folder layout
"""

from dapolicy.training.config import TrainConfig, parse_steps
from dapolicy.training.loop import TrainingDiverged

__all__ = ["TrainConfig", "TrainingDiverged", "parse_steps"]
