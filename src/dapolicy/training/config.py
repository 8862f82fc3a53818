"""`TrainConfig`: the optimisation knobs of `dap train` that are not part of a method.

Per-stage budgets (steps, peak learning rate, batch size) belong to the method: its config carries a
`StagePreset` per stage (`config.training.<stage>`). The `steps` / `lr` / `stage_batch_size` entries here are
a run's overrides of those presets (`--steps policy=3000`), stored with the run so `--resume` uses them.
Budgets are in optimizer steps, not wall-clock time: on a shared CPU the same step count gives the same
model whatever the load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass
class TrainConfig:
    """How `dap train` optimises each stage of a policy.

    steps: optimizer steps per stage name, overriding the method's preset for the stages it lists.
    stage_batch_size: batch size per stage name (windows, or single frames for the VAE), overriding the preset.
    lr: peak learning rate per stage name, overriding the preset.
    weight_decay, betas: AdamW; Diffusion Policy's betas (0.95, 0.999).
    warmup_steps: linear warm-up from 0, then cosine decay to `min_lr_ratio * lr` at the stage's last step.
    grad_clip: max global gradient norm (0 disables clipping).
    ema_power, ema_max_decay, ema_min_decay, ema_inv_gamma: Diffusion-Policy EMA. The decay at update n is
        1 - (1 + n / inv_gamma) ** -power, clamped to [min_decay, max_decay]: it starts near 0 (the EMA
        follows the raw weights while they move fast) and approaches max_decay (0.9999) as training goes on.
        With power 0.75 it reaches 0.999 after ~10k steps. `ema_power = 0` disables EMA (decay 0).
    log_interval: steps between metrics records (train scalars averaged over the interval).
    ckpt_interval: steps between `checkpoints/last.pt` writes (also written at the end of every stage).
    val_interval: steps between validation-loss evaluations (0: only at the end of each stage).
    val_fraction: share of episodes held out of every stage's training for the validation loss that picks
        `checkpoints/best.pt` (at least one episode when there are two or more; 0 disables validation).
    val_batches: batches (of `batch_size`) drawn from the held-out episodes per evaluation, always the same.
    use_best: load the best-validation EMA weights (instead of the last ones) into the saved model.
    threads: torch CPU threads; 0 = auto, resolved once when a run starts (then stored, so a resume uses
        the same count: results are bit-exact only at the same count). Auto takes the cores the load average
        leaves free, at least 1: on a shared CPU, more threads than free cores makes every parallel op wait
        for a descheduled thread (measured: a small-config policy step 0.65 s with 1 thread, 14 s with 2 on
        a 2-core machine running another training job).
    amp: bfloat16 autocast on CUDA (ignored on CPU).
    augment: apply the method's random-shift augmentation (`image_shift` / `latent_shift` of its config) while a
        stage trains. A run stored without this field trained without augmentation (before 2026-11-27 it was
        never applied, whatever the config said), so such a run resumes without it.
    compile: run the policy's `compute_loss` through `torch.compile` (faster steps on GPUs after a compile of
        a minute or so; results are not bit-identical to eager mode).
    micro_batches: how many contiguous micro-batches the global batch of a step is cut into, over all
        processes (processes x `--grad-accum`); 0 = resolved when a run starts, then stored. Each micro-batch
        draws its noise from its own seed, so a run depends on this number, not on how the micro-batches are
        shared between processes and accumulation rounds: a resume on another number of processes keeps it
        (and accumulates accordingly). 1 is the plain single-process step.
    lean_data: load images as a memory-mapped uncompressed frame cache (`EpisodeStore.load(lazy=True)`) instead
        of into RAM: for stores larger than memory, and so that the processes of one machine share one copy
        through the page cache. Batches are the same bytes either way.
    latent_batch: frames per `encode_latents` call when the latent cache is built.
    logger: "none", "tensorboard" or "wandb" (extra sinks besides metrics.jsonl; must be installed).
    wandb_project: the wandb project of the run (None: $WANDB_PROJECT, else "dapolicy").
    progress: show a tqdm bar per stage.
    """

    steps: dict[str, int] = field(default_factory=dict)
    stage_batch_size: dict[str, int] = field(default_factory=dict)
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    ema_min_decay: float = 0.0
    ema_inv_gamma: float = 1.0
    log_interval: int = 50
    ckpt_interval: int = 500
    val_interval: int = 500
    val_fraction: float = 0.05
    val_batches: int = 4
    use_best: bool = False
    threads: int = 0
    amp: bool = False
    augment: bool = True
    compile: bool = False
    micro_batches: int = 0
    lean_data: bool = False
    latent_batch: int = 256
    logger: str = "none"
    wandb_project: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON round trips give lists
        for name in ("log_interval", "ckpt_interval", "val_batches", "latent_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_interval", "threads", "micro_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for stage, n in self.steps.items():
            if int(n) < 0:
                raise ValueError(f"steps for stage {stage!r} must be >= 0, got {n}")
        for stage, n in self.stage_batch_size.items():
            if int(n) < 1:
                raise ValueError(f"batch size for stage {stage!r} must be >= 1, got {n}")
        for stage, v in self.lr.items():
            if not float(v) > 0:
                raise ValueError(f"learning rate for stage {stage!r} must be > 0, got {v}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.ema_min_decay <= self.ema_max_decay < 1.0:
            raise ValueError("EMA decays must satisfy 0 <= ema_min_decay <= ema_max_decay < 1")
        if self.logger not in ("none", "tensorboard", "wandb"):
            raise ValueError(f"logger must be none, tensorboard or wandb, got {self.logger!r}")

    @classmethod
    def preset(cls, size: str = "small", **overrides: Any) -> "TrainConfig":
        """The defaults that go with a named size ("tiny" logs, validates and checkpoints every few steps)."""
        base: dict[str, Any] = {}
        if size == "tiny":
            base.update(warmup_steps=5, log_interval=5, ckpt_interval=10, val_interval=10, val_batches=1,
                        latent_batch=64)
        base.update(overrides)
        return cls(**base)

    def budget(self, stage: str, preset: Any) -> tuple[int, float, int]:
        """(steps, peak lr, batch size) of `stage`: this run's overrides over the method's `StagePreset`."""
        return (int(self.steps.get(stage, preset.steps)), float(self.lr.get(stage, preset.lr)),
                int(self.stage_batch_size.get(stage, preset.batch_size)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("augment", False)  # stored before the field existed: trained without augmentation
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """A copy with the non-None overrides applied (None means "keep")."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def auto_threads(processes: int = 1) -> int:
    """CPU threads per process that do not oversubscribe the machine: the cores the 1-minute load leaves free,
    shared by the `processes` training processes of this machine (>= 1)."""
    import os

    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - platforms without a load average
        return max(1, cores // processes)
    return max(1, min(cores, int(cores - load + 0.5)) // processes)


def parse_steps(text: str | int | dict[str, int] | None, stages: tuple[str, ...],
                what: str = "--steps", known: tuple[str, ...] | None = None) -> dict[str, int]:
    """Parse `--steps` (or `--batch-size`): "N" (every stage in `stages`) or "vae=900,policy=2200".

    `known`: the stage names a "name=N" entry may use (default `stages`). Returns only the stages it names;
    the caller merges the result over the presets.
    """
    known = known or stages
    if text is None:
        return {}
    if isinstance(text, dict):
        bad = [k for k in text if k not in known]
        if bad:
            raise ValueError(f"{what}: unknown stage(s) {bad} (stages: {', '.join(known)})")
        return {str(k): int(v) for k, v in text.items()}
    if isinstance(text, int):
        return {s: text for s in stages}
    text = text.strip()
    if "=" not in text:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{what} expects N or stage=N,... ; got {text!r}") from None
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")
        return {s: value for s in stages}
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in known:
            raise ValueError(f"{what}: unknown stage {name!r} (stages: {', '.join(known)})")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not stage=N") from None
        if out[name] < 0:
            raise ValueError(f"{what}: {part!r} must be >= 0")
    return out
