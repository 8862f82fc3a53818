"""The optimisation loop of one stage: AdamW on `policy.stage_module(stage)`, warm-up + cosine rate, gradient
clipping, EMA, periodic validation and checkpoints, and a hard stop on a non-finite loss.

Exactness: everything random in step n (batch indices, noise, tau, dropout inside `compute_loss`) is drawn
after seeding from (seed, stage, n), and the rate is a function of n. Together with model, EMA and optimizer
state in the checkpoint, a run resumed from any checkpoint reproduces the uninterrupted run bit for bit
(same device, same thread count, same number of processes).

Data parallelism and gradient accumulation (`training/distributed.py`): the global batch of a step is cut into
`micro_batches` contiguous pieces, each seeded from (seed, stage, n, piece); every process computes its block of
pieces, weights each piece's loss by its share of the global batch, accumulates, and the gradients are summed
over the processes. With one piece (the default of a single process) the step is exactly the plain one.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from dapolicy.training.batches import StageBatches
from dapolicy.training.checkpoint import save_checkpoint, set_rng_state
from dapolicy.training.config import TrainConfig
from dapolicy.training.distributed import (
    DistEnv,
    all_reduce_gradients,
    barrier,
    gather_objects,
    my_pieces,
    piece_seed,
    split_batch,
    sum_floats,
    val_piece_seed,
)
from dapolicy.training.ema import EMA
from dapolicy.training.metrics import MetricsLog
from dapolicy.training.rundir import RunDir
from dapolicy.training.schedule import set_lr, warmup_cosine

CHECKPOINT_FORMAT = 1
_RESERVED = {"kind", "stage", "step", "lr", "samples_per_s", "grad_norm", "time"}


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is left untouched."""


@dataclass
class StepBudget:
    """Optimizer steps this call may still take (None: unlimited). Lets a job stop cleanly at a step
    boundary (`stop_after`) and continue later with `resume`."""

    remaining: int | None = None

    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def consume(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1


@dataclass
class StageResult:
    stage: str
    step: int
    total: int
    completed: bool
    samples_per_s: float = 0.0
    seconds: float = 0.0
    last_loss: float = float("nan")
    best_val: float = float("inf")
    best_step: int = -1
    ema_shadow: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.step, "samples_per_s": round(self.samples_per_s, 2),
                "seconds": round(self.seconds, 2), "last_loss": self.last_loss,
                "best_val": self.best_val if math.isfinite(self.best_val) else None, "best_step": self.best_step}


class _Window:
    """Running means of the scalars between two log records."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.samples, self.seconds = 0, 0, 0.0

    def add(self, scalars: dict[str, float], samples: int, seconds: float) -> None:
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}

    def merged(self) -> "_Window":
        """The window over all processes: each holds the weighted sums of its own micro-batches, so the sums
        add up; the gradient norm (and the step count and time) are the same everywhere, rank 0's are kept."""
        parts = gather_objects(self.sums)
        if len(parts) == 1:
            return self
        out = _Window()
        out.steps, out.samples, out.seconds = self.steps, self.samples, self.seconds
        for part in parts:
            for k, v in part.items():
                out.sums[k] = out.sums.get(k, 0.0) + v
        if "grad_norm" in self.sums:
            out.sums["grad_norm"] = self.sums["grad_norm"]
        return out


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    res = {}
    for k, v in out.items():
        if torch.is_tensor(v) and v.numel() == 1:
            res[k] = float(v.detach())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            res[k] = float(v)
    return {(f"loss_{k}" if k in _RESERVED else k): v for k, v in res.items()}


def _compiled(fn: Any) -> Any:
    """`torch.compile(fn)`, drawing random numbers through eager torch's generator (inductor's own would give
    other noise), so a compiled run follows the eager run up to float rounding and resumes exactly."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return torch.compile(fn)


class StageRunner:
    """Trains one stage of `policy` from step 0 or from a checkpoint."""

    def __init__(self, policy: Any, stage: str, batches: StageBatches, cfg: TrainConfig, run: RunDir,
                 log: MetricsLog, seed: int, device: torch.device, extra_state: dict[str, Any],
                 env: DistEnv | None = None) -> None:
        self.policy, self.stage, self.batches, self.cfg = policy, stage, batches, cfg
        self.run, self.log, self.seed, self.device = run, log, seed, device
        self.extra_state = extra_state  # stored in checkpoints (e.g. the resolved run configuration)
        self.total, self.peak_lr, self.batch_size = cfg.budget(stage, policy.stage_preset(stage))
        self.env = env or DistEnv()
        self.pieces = cfg.micro_batches or self.env.world_size  # micro-batches per step, over all processes
        self.mine = my_pieces(self.pieces, self.env)
        self.bounds = split_batch(self.batch_size, self.pieces)
        self.loss_fn = _compiled(policy.compute_loss) if cfg.compile else policy.compute_loss
        self.module = policy.stage_module(stage)
        policy.requires_grad_(False)
        self.module.requires_grad_(True)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"stage {stage!r}: stage_module has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=self.peak_lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.ema = EMA(self.module, power=cfg.ema_power, max_decay=cfg.ema_max_decay,
                       min_decay=cfg.ema_min_decay, inv_gamma=cfg.ema_inv_gamma)
        self.step = 0
        self.best_val, self.best_step = float("inf"), -1
        self.samples, self.seconds = 0, 0.0
        self.last_good_step = 0
        self.last_loss = float("nan")

    # ---- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.step, "total_steps": self.total,
            "seed": self.seed, "model": self.policy.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "peak_lr": self.peak_lr,
                          "warmup_steps": cfg.warmup_steps, "total_steps": self.total,
                          "min_lr_ratio": cfg.min_lr_ratio},
            "best_val": self.best_val, "best_step": self.best_step,
            "samples": self.samples, "seconds": self.seconds, "micro_batches": self.pieces,
            "world_size": self.env.world_size, **self.extra_state,
        }

    def save_last(self) -> None:
        """Write `checkpoints/last.pt` (rank 0 only: every process holds the same weights and optimizer state)."""
        if self.env.is_main:
            save_checkpoint(self.run.last, self._state())
        self.last_good_step = self.step

    def _save_best(self) -> None:
        if self.env.is_main:
            save_checkpoint(self.run.best, self._state())

    def load(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("stage") != self.stage:
            raise ValueError(f"checkpoint is for stage {ckpt.get('stage')!r}, not {self.stage!r}")
        self.policy.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.ema.load_state_dict(ckpt["ema"])
        self.step = int(ckpt["step"])
        self.best_val, self.best_step = float(ckpt["best_val"]), int(ckpt["best_step"])
        self.samples, self.seconds = int(ckpt["samples"]), float(ckpt["seconds"])
        self.last_good_step = self.step
        set_rng_state(ckpt["rng"])

    # ---- validation --------------------------------------------------------------------------------
    def _val_pieces(self) -> list[tuple[int, int, float, dict[str, torch.Tensor]]]:
        """(batch number, piece, weight, tensors) of the validation micro-batches this process computes: every
        fixed validation batch is cut into the same pieces as a training batch and shared out the same way."""
        out = []
        for i, ids in enumerate(self.batches.val_indices(self.cfg.val_batches)):
            for m in self.mine:
                lo, hi = split_batch(len(ids), self.pieces)[m]
                if hi > lo:
                    out.append((i, m, (hi - lo) / len(ids), self.batches.load(ids[lo:hi])))
        return out

    @torch.no_grad()
    def validate(self, pieces: list[tuple[int, int, float, dict[str, torch.Tensor]]]) -> float:
        """Mean loss of the fixed validation batches with EMA weights (what the saved model will carry). Every
        process computes its pieces; the per-batch losses are summed over the processes, so all get the value
        one process computing every piece would get."""
        self.module.eval()
        per_batch = [0.0] * self.cfg.val_batches
        try:
            with self.ema.swapped_in():
                for i, m, weight, batch in pieces:
                    torch.manual_seed(val_piece_seed(self.seed, self.stage, i, m, self.pieces))
                    with self._autocast():
                        loss = float(self.policy.compute_loss(batch, self.stage)["loss"])
                    per_batch[i] = loss if self.pieces == 1 else per_batch[i] + weight * loss
        finally:
            self.module.train()
        per_batch = sum_floats(per_batch)
        return sum(per_batch) / len(per_batch)

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ---- the loop ----------------------------------------------------------------------------------
    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        where = (f"{self.run.last} (stage {self.stage!r}, step {self.last_good_step})"
                 if self.run.last.exists() else "none was written yet")
        return TrainingDiverged(
            f"stage {self.stage!r} diverged at step {self.step}: {what} = {value}. Training stopped; "
            f"the last good checkpoint is {where}. Lower the learning rate or check the data, then "
            f"resume with --resume.")

    def _step(self) -> tuple[float, dict[str, float], float]:
        """Forward and backward passes of this process's micro-batches of the current step, then the gradient
        sum over the processes; returns (global-batch loss, this process's weighted scalars, gradient norm)."""
        stage, single = self.stage, self.pieces == 1
        self.optimizer.zero_grad(set_to_none=True)
        ids = self.batches.train_indices(self.step)
        loss_sum, scalars = 0.0, {}
        for m in self.mine:
            lo, hi = self.bounds[m]
            if hi == lo:  # a batch smaller than the micro-batch count
                continue
            batch = self.batches.load(ids[lo:hi])
            torch.manual_seed(piece_seed(self.seed, stage, self.step, m, self.pieces))
            with self._autocast():
                out = self.loss_fn(batch, stage)
            loss = out["loss"]
            value = float(loss.detach())
            if not self.env.enabled and not math.isfinite(value):
                raise self._diverged("loss", value)
            weight = (hi - lo) / self.batch_size
            if single:
                loss.backward()
                loss_sum, scalars = value, _scalars(out)
            else:
                (loss * weight).backward()  # the weighted pieces add up to the global-batch mean
                loss_sum += weight * value
                for k, v in _scalars(out).items():
                    scalars[k] = scalars.get(k, 0.0) + weight * v
        if self.env.enabled:
            loss_sum = all_reduce_gradients(self.params, [loss_sum])[0]
            if not math.isfinite(loss_sum):  # every process sees the same sum: all stop together
                raise self._diverged("loss", loss_sum)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            raise self._diverged("gradient norm", grad_norm)
        return loss_sum, scalars, grad_norm

    def train(self, budget: StepBudget) -> StageResult:
        from tqdm.auto import tqdm

        cfg, stage = self.cfg, self.stage
        self.policy.eval()  # frozen parts (e.g. the VAE, the dynamics model) stay in eval mode
        self.module.train()
        self.policy.augment_in_training = cfg.augment
        use_val = len(self.batches.val_ids) > 0
        val_pieces = self._val_pieces() if use_val else []
        window = _Window()
        bar = tqdm(total=self.total, initial=self.step, desc=f"train {stage}",
                   disable=not (cfg.progress and self.env.is_main), dynamic_ncols=True)
        in_update = False
        try:
            while self.step < self.total:
                if budget.exhausted():
                    self.save_last()
                    return self._result(completed=False)
                t0 = time.perf_counter()
                lr = warmup_cosine(self.step, self.total, self.peak_lr, cfg.warmup_steps, cfg.min_lr_ratio)
                set_lr(self.optimizer, lr)
                loss_value, scalars, grad_norm = self._step()
                in_update = True
                self.optimizer.step()
                self.ema.update()
                self.step += 1
                in_update = False
                budget.consume()
                dt = time.perf_counter() - t0
                self.samples += self.batch_size
                self.seconds += dt
                self.last_loss = loss_value
                window.add({**scalars, "grad_norm": grad_norm}, self.batch_size, dt)
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == self.total:
                    window = window.merged()
                    rate = window.samples / max(window.seconds, 1e-9)
                    self.log.write({"kind": "train", "stage": stage, "step": self.step, "lr": lr,
                                    "samples_per_s": rate, "time": time.time(), **window.means()})
                    bar.set_postfix(loss=f"{window.means().get('loss', loss_value):.4g}",
                                    samples_s=f"{rate:.0f}")
                    window = _Window()
                val_due = (cfg.val_interval > 0 and self.step % cfg.val_interval == 0) or self.step == self.total
                if use_val and val_due:
                    val = self.validate(val_pieces)
                    self.log.write({"kind": "val", "stage": stage, "step": self.step, "val_loss": val})
                    if math.isfinite(val) and val < self.best_val:
                        self.best_val, self.best_step = val, self.step
                        self._save_best()
                if self.step % cfg.ckpt_interval == 0 or self.step == self.total:
                    self.save_last()
        except KeyboardInterrupt:
            if not in_update and self.step > self.last_good_step:  # weights are consistent: keep the progress
                self.save_last()
            raise
        finally:
            bar.close()
        return self._result(completed=True)

    def _result(self, completed: bool) -> StageResult:
        return StageResult(stage=self.stage, step=self.step, total=self.total, completed=completed,
                           samples_per_s=self.samples / max(self.seconds, 1e-9), seconds=self.seconds,
                           last_loss=self.last_loss, best_val=self.best_val, best_step=self.best_step)

    def finalize_weights(self) -> None:
        """Load the weights the saved model carries: the last EMA, or the best-validation EMA (`use_best`)."""
        barrier()  # rank 0 may still be writing checkpoints/best.pt
        if self.cfg.use_best and self.run.best.exists():
            from dapolicy.training.checkpoint import load_checkpoint

            best = load_checkpoint(self.run.best)
            if best.get("stage") == self.stage:
                self.module.load_state_dict(best["ema"]["shadow"])
                return
        self.ema.copy_to()
