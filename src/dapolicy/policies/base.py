"""The policy contract every method implements (DAP, FM and the baselines), as code.

A method is one module with a config dataclass (holding its per-stage training presets) and a `Policy`
subclass; the registry (`policies/registry.py`) maps its name to both. Workflows (train, eval, diagnose,
bench, serve) only use what is declared here, so they work for every method without knowing its name:

* training: `stages` (ordered `StageSpec`s: which module is optimised, on which episodes, with which batch
  layout), `stage_module`, `compute_loss`, `fit_normalizer`, and the hooks `encode_latents` (the trainer
  caches a frozen codec's latents for stages that ask for them) and `after_stage` (e.g. calibrating the
  VAE's latent scale);
* inference: `predict_chunk` -> `ChunkPrediction`, `select_action` / `reset` (receding horizon);
* capabilities: `Capabilities` says what a method can do (predict next frames, coupling modes), so a
  workflow can refuse clearly instead of failing deep inside;
* persistence: `save_pretrained` / `Policy.from_pretrained` (config.json names the method).

Units: actions and proprio are normalised to [-1, 1] inside the policy (min-max statistics saved with it);
images arrive as uint8 [..., S, S, 3].
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from dapolicy import __version__
from dapolicy.nn.encoders import random_shift
from dapolicy.policies.normalizer import MinMaxNormalizer, check_finite
from dapolicy.receding import RecedingHorizon, env_frame
from dapolicy.spec import EnvSpec

BatchLayout = Literal["frames", "windows"]
SOURCES_ALL: None = None


@dataclass
class StagePreset:
    """Default training budget of one stage (a method's config carries one per stage).

    steps: optimizer steps. lr: peak learning rate (warm-up, then cosine decay). batch_size: windows per
    step, or single frames for a stage with the "frames" layout (e.g. the VAE).
    """

    steps: int
    lr: float
    batch_size: int

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class StageSpec:
    """One training stage as the trainer sees it.

    name: the stage's name (what `--stage` and `--steps name=N` refer to).
    sources: episode sources it trains on ("expert", "random", "noisy_expert"); None = every episode.
    success_only: drop failed episodes (a policy learns from successful demonstrations only).
    layout: "frames" (batch {"images": uint8 [B, C, S, S, 3]}, single frames) or "windows" (the sampler's
        windows: T_o observation frames, H actions, the observation k steps later).
    inputs: per-frame arrays the windows need besides proprio and action: "images" (raw uint8) and/or
        "latents" (the frozen codec's cached latents, see `Policy.encode_latents`).
    changes_latents: training this stage changes what `encode_latents` returns (the trainer drops its
        latent cache afterwards).
    """

    name: str
    sources: tuple[str, ...] | None = SOURCES_ALL
    success_only: bool = False
    layout: BatchLayout = "windows"
    inputs: tuple[str, ...] = ()
    changes_latents: bool = False

    def __post_init__(self) -> None:
        if self.layout not in ("frames", "windows"):
            raise ValueError(f"stage {self.name!r}: layout must be 'frames' or 'windows', got {self.layout!r}")
        unknown = set(self.inputs) - {"images", "latents"}
        if unknown:
            raise ValueError(f"stage {self.name!r}: unknown inputs {sorted(unknown)} (images, latents)")


@dataclass(frozen=True)
class Capabilities:
    """What a method can do beyond predicting actions.

    predicts_next_obs: `predict_chunk(return_next=True)` returns predicted next frames (DAP, UVA-style).
    modes: the generation modes `predict_chunk(mode=...)` accepts (first = default); () = none.
    has_trace: `predict_chunk(return_trace=True)` returns the per-step extrapolations (Fig. 2 diagnostics).
    """

    predicts_next_obs: bool = False
    modes: tuple[str, ...] = ()
    has_trace: bool = False


@dataclass
class ChunkPrediction:
    """The result of `predict_chunk`.

    actions: float32 [B, H, A] in env units.
    next_frames: uint8 [B, C, S, S, 3] predicted observation k steps ahead (with return_next, when the
        method predicts frames; None otherwise).
    trace: per-step extrapolations for diagnostics (with return_trace): {"tau": [K], "a_hat": [K, B, H, A]
        (normalised units), "z_hat": [K, B, C, c, h, w] latents or None}.
    """

    actions: np.ndarray
    next_frames: np.ndarray | None = None
    trace: dict[str, Any] | None = None


class UnsupportedByMethod(ValueError):
    """A workflow asked a method for something it does not do (e.g. predicted frames from FM)."""


class Policy(nn.Module, ABC):
    """Base class of every method: normalisers, observation checks, receding horizon, save/load.

    Subclasses set `method` (the registry name), `config_class`, `capabilities`, and implement `stages`,
    `stage_module`, `compute_loss` and `_predict` (sampling on validated, batched tensors).
    """

    method: ClassVar[str]
    config_class: ClassVar[type]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: Any, spec: EnvSpec) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.spec = spec
        self.action_normalizer = MinMaxNormalizer(spec.action_dim)
        self.proprio_normalizer = MinMaxNormalizer(spec.proprio_dim)
        self.record_predictions = False  # keep decoded predicted frames in select_action (videos, UIs)
        self.reset()

    # ------------------------------------------------------------------ training contract
    @property
    @abstractmethod
    def stages(self) -> tuple[StageSpec, ...]:
        """The training stages, in order."""

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage_spec(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ValueError(f"{self.method}: no stage {name!r}; its stages are {', '.join(self.stage_names)}")

    @abstractmethod
    def stage_module(self, stage: str) -> nn.Module:
        """The parameters `stage` optimises (the trainer keeps an EMA of exactly these)."""

    def stage_preset(self, stage: str) -> StagePreset:
        """The config's default budget for `stage` (config.training.<stage>)."""
        self.stage_spec(stage)
        return getattr(self.config.training, stage)

    @abstractmethod
    def compute_loss(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        """{"loss": scalar, ...other scalars to log} for one batch of `stage`."""

    def normalizers_by_stage(self) -> dict[str, tuple[MinMaxNormalizer, MinMaxNormalizer]]:
        """(action, proprio) normalisers of each model, keyed by the stage that trains it: each model's are fitted
        on the data that model trains on. Default: the policy's, fitted on the last stage's (the one that learns
        actions, e.g. successful expert episodes). DAP adds its dynamics model's (every episode)."""
        return {self.stage_names[-1]: (self.action_normalizer, self.proprio_normalizer)}

    def fit_normalizers(self, data_of: Any) -> None:
        """Fit every model's statistics on its own stage's data: `data_of(stage)` -> anything with `.action`
        and `.proprio` (e.g. EpisodeData)."""
        for stage, (action, proprio) in self.normalizers_by_stage().items():
            data = data_of(stage)
            action.fit(data.action, f"{stage} action")
            proprio.fit(data.proprio, f"{stage} proprio")

    def fit_normalizer(self, data: Any) -> None:
        """Fit every normaliser on the same data (tests, tools with a single dataset)."""
        self.fit_normalizers(lambda stage: data)

    def encode_latents(self, images: np.ndarray | Tensor, batch_size: int = 256) -> Tensor:
        """Latents of a frozen image codec, for stages whose `inputs` include "latents"."""
        raise UnsupportedByMethod(f"method {self.method!r} has no latent codec")

    def after_stage(self, stage: str, images: np.ndarray) -> dict[str, Any]:
        """Called when `stage` finished, with a seeded sample of its frames (uint8 [N, C, S, S, 3]).

        Returns scalars to log. Default: nothing to do.
        """
        return {}

    # ------------------------------------------------------------------ inference contract
    @torch.no_grad()
    def predict_chunk(self, obs: Mapping[str, Any], return_next: bool = False, mode: str | None = None,
                      steps: int | None = None, return_trace: bool = False,
                      generator: torch.Generator | None = None) -> ChunkPrediction:
        """One action chunk for a batch of observation histories.

        obs: {"images": uint8 [B, T_o, C, S, S, 3], "proprio": [B, T_o, P]} (numpy or torch).
        return_next: also return the predicted next frames (methods with `predicts_next_obs`).
        mode: generation mode, one of `capabilities.modes` (None = the config's default).
        steps: sampling steps K (None = the config's). return_trace: per-step extrapolations.
        """
        caps = self.capabilities
        if mode is not None and mode not in caps.modes:
            offered = ", ".join(caps.modes) or "none"
            raise UnsupportedByMethod(f"method {self.method!r} has no generation mode {mode!r} (modes: {offered})")
        if return_trace and not caps.has_trace:
            raise UnsupportedByMethod(f"method {self.method!r} records no sampling trace")
        check_flow_steps(steps)
        self.ensure_eval()
        batch = self.validate_obs(obs)
        pred = self._predict(batch, return_next=return_next and caps.predicts_next_obs, mode=mode, steps=steps,
                             return_trace=return_trace, generator=generator)
        if not np.isfinite(pred.actions).all():  # never hand a robot NaN: the weights or an encoder diverged
            raise FloatingPointError(f"method {self.method!r} produced NaN or inf actions from a finite "
                                     "observation: the model's weights (or the encoders' outputs) are not finite")
        return pred

    #: Whether training losses apply the config's random-shift augmentation; the training loop sets it from
    #: `TrainConfig.augment` for each stage it runs.
    augment_in_training: bool = True

    def augmenting(self, module: nn.Module) -> bool:
        """Whether a loss augments the images `module` reads: only while that network trains (the training loop
        keeps the policy itself, and every frozen part, in eval mode) and augmentation is on."""
        return self.augment_in_training and module.training

    def shifted(self, frames: Tensor, module: nn.Module, pad: int) -> Tensor:
        """Frames [B, T, C, ...] randomly shifted by up to `pad` pixels while `module` trains (`augmenting`);
        otherwise, or with pad 0, unchanged."""
        if pad <= 0 or not self.augmenting(module):
            return frames
        return random_shift(frames.flatten(0, 2), pad).view_as(frames)

    def image_shift_pad(self) -> int:
        """The config's `image_shift` (pixels at 64 px) scaled to this policy's image size; 0 = off."""
        shift = self.config.image_shift
        return max(1, round(shift * self.spec.image_size / 64)) if shift > 0 else 0

    def ensure_eval(self) -> None:
        """Eval mode for inference, cheaply: `eval()` walks every submodule (~1-2 ms for `small`, a few % of a
        chunk), so it runs only when the policy or one of its models (a direct child: training switches
        one stage's model at a time) is in training mode."""
        if self.training or any(m.training for m in self.children()):
            self.eval()

    @abstractmethod
    def _predict(self, batch: dict[str, Tensor], return_next: bool, mode: str | None, steps: int | None,
                 return_trace: bool, generator: torch.Generator | None) -> ChunkPrediction:
        """Sampling on a validated batch (images uint8, proprio float, on the policy's device)."""

    @property
    def n_obs_steps(self) -> int:
        return int(self.config.n_obs_steps)

    @property
    def horizon(self) -> int:
        return int(self.config.horizon)

    @property
    def n_action_steps(self) -> int:
        return int(self.config.n_action_steps)

    @property
    def next_obs_offset(self) -> int:
        """k: how many steps ahead a predicted next observation lies (T_a by default)."""
        return int(getattr(self.config, "next_obs_offset", None) or self.n_action_steps)

    def validate_obs(self, obs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Check a batched observation's keys, shapes and values; errors name the key and expected shape."""
        t, c, s = self.n_obs_steps, len(self.spec.cameras), self.spec.image_size
        expected = {"images": (t, c, s, s, 3), "proprio": (t, self.spec.proprio_dim)}
        out = {}
        for key, shape in expected.items():
            if key not in obs:
                dims = ", ".join(map(str, shape))
                raise ValueError(f"observation is missing key {key!r} (expected shape [B, {dims}])")
            value = obs[key] if isinstance(obs[key], Tensor) else torch.as_tensor(np.asarray(obs[key]))
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape:
                raise ValueError(f"observation {key!r} has shape {tuple(value.shape)}, "
                                 f"expected [B, {', '.join(map(str, shape))}]")
            if key == "proprio":
                value = value.float()
                check_finite(key, value)
            elif value.dtype != torch.uint8:
                raise ValueError(f"observation 'images' must be uint8, got {value.dtype}")
            out[key] = value.to(self.device)
        return out

    # ------------------------------------------------------------------ closed loop
    def reset(self) -> None:
        """Forget the observation history and queued actions (call at every episode start)."""
        self._loop = RecedingHorizon(self.n_obs_steps, self.n_action_steps)
        self.last_next_frames: np.ndarray | None = None

    def select_action(self, env_obs: Mapping[str, Any]) -> np.ndarray:
        """Receding-horizon control: predict a chunk of H when the queue is empty, execute T_a of it.

        With `record_predictions = True` (and a method that predicts frames) the decoded predicted next
        frames of the last chunk are kept in `last_next_frames` ([C, S, S, 3] uint8).
        """
        self._loop.observe(env_frame(env_obs, self.spec))
        if self._loop.needs_chunk:
            want_next = self.record_predictions and self.capabilities.predicts_next_obs
            pred = self.predict_chunk(self._loop.batch(), return_next=want_next)
            if want_next and pred.next_frames is not None:
                self.last_next_frames = pred.next_frames[0]
            self._loop.enqueue(pred.actions[0])
        return self._loop.pop()

    # ------------------------------------------------------------------ persistence
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, directory: str | Path) -> Path:
        """A model folder: config.json (format version, method, config, task spec) + model.safetensors."""
        from dapolicy.configuration import to_dict
        from dapolicy.policies import pretrained

        header = {"method": self.method, "class": type(self).__name__, "dapolicy_version": __version__,
                  "config": to_dict(self.config), "spec": self.spec.to_dict()}
        return pretrained.save_folder(self, directory, header)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "Policy":
        """Load a model folder of this class (any method: use `dapolicy.policies.load_pretrained`)."""
        from dapolicy.configuration import from_dict
        from dapolicy.policies import pretrained

        header = pretrained.read_header(directory)
        if header.get("method") != cls.method:
            raise ValueError(f"{directory} holds a {header.get('method')!r} model, not {cls.method!r} "
                             f"(load any method with dapolicy.policies.load_pretrained)")
        config = from_dict(cls.config_class, header["config"], f"{directory}/config.json: config")
        policy = cls(config, EnvSpec.from_dict(header["spec"]))
        pretrained.load_weights(policy, directory)
        return policy.to(map_location)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per stage module, and in total (a module shared by stages counts once)."""
        counts: dict[str, int] = {}
        seen: set[int] = set()
        for stage in self.stage_names:
            params = [p for p in self.stage_module(stage).parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            counts[stage] = sum(p.numel() for p in params)
        counts["total"] = sum(counts.values())
        return counts


_VALIDATED = contextvars.ContextVar("dapolicy_inputs_validated", default=False)


@contextlib.contextmanager
def validated_inputs() -> Iterator[None]:
    """Inside this block `require` skips its NaN / inf check: for sampling, whose batch `validate_obs` already
    checked. On a GPU that check reads a value back to the host (a sync), which stalls the call and which a
    CUDA graph cannot capture."""
    token = _VALIDATED.set(True)
    try:
        yield
    finally:
        _VALIDATED.reset(token)


def require(batch: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    """A batch entry, checked for presence, rank and finiteness (errors name the key; finiteness not inside
    `validated_inputs`)."""
    if key not in batch:
        raise ValueError(f"batch is missing key {key!r} (have {sorted(batch)})")
    value = batch[key]
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    if value.dim() != ndim:
        raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, expected {ndim} dimensions")
    if value.is_floating_point() and not _VALIDATED.get():
        check_finite(key, value)
    return value


def images_to_float(images: Tensor) -> Tensor:
    """uint8 [..., S, S, 3] -> float [..., 3, S, S] in [-1, 1]."""
    return images.movedim(-1, -3).float().div(127.5).sub(1.0)


def float_to_images(x: Tensor) -> Tensor:
    """float [..., 3, S, S] in [-1, 1] -> uint8 [..., S, S, 3]."""
    return x.clamp(-1, 1).add(1.0).mul(127.5).round().to(torch.uint8).movedim(-3, -1)


@dataclass
class TrainingPresets:
    """Marker base for a method's per-stage presets: one `StagePreset` field per stage name."""


def preset_field(steps: int, lr: float, batch_size: int) -> Any:
    """A dataclass field whose default is a fresh `StagePreset`."""
    return field(default_factory=lambda: StagePreset(steps, lr, batch_size))


def check_flow_steps(steps: int | None) -> int | None:
    """`steps` (None = the config's) if it is a valid number of flow steps: below 1 is an error, not the default."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps
