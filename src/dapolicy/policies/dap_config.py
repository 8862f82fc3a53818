"""DAPConfig: the flow policy's config (`FMConfig`) plus the dynamics model and how the two are coupled.

Shapes that come from the task (cameras, image size, action and proprio dims) are not here: they come from
the EnvSpec the policy is built with, so one config serves every task. Named sizes: `tiny` (tests),
`small` (CPU default), `paper` (~360M trainable parameters, like the paper's 369M).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from dapolicy.nn.dit import DiTConfig
from dapolicy.nn.unet1d import UNet1DConfig
from dapolicy.policies.base import StagePreset, TrainingPresets, preset_field
from dapolicy.policies.coupling import COUPLING_MODES
from dapolicy.policies.fm import VAE_PRESET, FMConfig, paper_parts, sized_training, small_parts, tiny_parts

EPISODE_SOURCES: tuple[str, ...] = ("expert", "random", "noisy_expert")


NEXT_OBS_SOURCES: tuple[str, ...] = ("ground_truth", "dynamics", "rollout", "null")

NEXT_OBS_READERS: tuple[str, ...] = ("latent", "image")


@dataclass
class NextObsMix:
    """What the policy sees as the next observation during training; shares sum to 1 (see docs/method.md).

    ground_truth: the real next latents o_{t+k}.
    dynamics: the frozen dynamics model's extrapolated estimate at a random tau' (no gradient), conditioned
        on the demonstrated action (what the policy would see if its own action estimate were perfect).
    rollout: the estimate the policy sees at inference: a no-gradient coupled rollout (the config's coupling
        mode, the live policy network and the frozen dynamics model) from the same action noise, and the
        next-observation estimate that rollout hands the policy at the step of the training tau (null at the
        first step of Jacobi sampling). Costs K extra no-grad calls of both networks per batch share.
    null: the learned null tokens, so the policy also works with no prediction.
    """

    # Default chosen on validation seeds (docs/results.md, section 1): the dynamics estimate, no ground truth.
    ground_truth: float = 0.0
    dynamics: float = 0.9
    rollout: float = 0.0
    null: float = 0.1

    def __post_init__(self) -> None:
        shares = self.shares
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"next_obs_mix shares ({', '.join(NEXT_OBS_SOURCES)}) must be >= 0 and sum to 1, "
                             f"got {shares}")

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, name)) for name in NEXT_OBS_SOURCES)


@dataclass
class DAPTraining(TrainingPresets):
    """Per-stage defaults: VAE (single frames), dynamics model (all episodes), policy (expert windows)."""

    vae: StagePreset = preset_field(*VAE_PRESET)
    # lr 3e-4: the predictions depend twice as much on the action as with 1e-4 at 1,500 steps (docs/results.md)
    dynamics: StagePreset = preset_field(1500, 3e-4, 64)
    policy: StagePreset = preset_field(2200, 3e-4, 64)


@dataclass
class DAPConfig(FMConfig):
    """Everything that defines a DAP policy, apart from the task's shapes (see `FMConfig` for the rest).

    next_obs_offset: k, the predicted observation is o_{t+k}; None = n_action_steps (the frame seen at the
        next re-plan).
    coupling: default generation mode (Algorithm 1): jacobi | gauss_seidel | predict_then_act | off.
    action_dropout: probability of replacing the dynamics model's action condition by the null token.
    action_contrast: weight of the dynamics stage's action-contrast term (0 = off): with the same noisy next
        latents, the model given the window's own action chunk must fit the flow target better, by at least
        `action_contrast_margin` (per-sample mean squared velocity error), than given another window's chunk.
        Why: on demonstrations the future is predictable from the scene alone, so the plain flow loss is met
        by a model that ignores the action (`dap diagnose`: action sensitivity 0.01-0.03), and a prediction
        that ignores the action cannot correct it. Costs a second forward pass per dynamics step.
    current_image_dropout: probability, per policy-training sample, of hiding the current images from the
        policy (their tokens keep only position embeddings; proprio stays) so that it must read the scene
        from the next-observation estimate; such samples never draw the null next observation. Why: with the
        current images in view the policy scores the same with the real, another or no prediction
        (`dap diagnose`), i.e. it ignores the dynamics model. 0 = off.
    next_obs_reader: how the policy reads the predicted next observation: "latent" (VAE latent patches through
        a linear tokenizer) or "image" (decoded by the frozen VAE and read by the policy's own ResNet-GN, the
        encoder of its current images; needs obs_encoder "resnet"). Why: a policy cannot find the scene in the
        latent patches (with its current images hidden it does no better given the real next frame than given
        another window's, docs/results.md), and FM reading its current images as latents also fails. Costs a
        VAE decode and a ResNet pass per flow step.
    next_obs_mix: the policy's training sources for the next observation.
    unet: the policy's U-Net; for DAP `unet.gated_dynamic_context` is on by default (every named size), so the
        prediction's tokens never dilute the current observation's attention (`gated_attention_unet`).
    dynamics_sources: episode sources the dynamics model trains on; None = all (expert + random + noisy).
    dynamics: size of the latent DiT.
    """

    next_obs_offset: int | None = None
    coupling: str = "jacobi"
    action_dropout: float = 0.1
    action_contrast: float = 0.0
    action_contrast_margin: float = 0.05
    current_image_dropout: float = 0.0
    next_obs_reader: str = "latent"
    next_obs_mix: NextObsMix = field(default_factory=NextObsMix)
    dynamics_sources: tuple[str, ...] | None = None
    dynamics: DiTConfig = field(default_factory=DiTConfig)
    unet: UNet1DConfig = field(default_factory=lambda: UNet1DConfig(gated_dynamic_context=True))
    training: DAPTraining = field(default_factory=DAPTraining)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coupling not in COUPLING_MODES:
            raise ValueError(f"coupling must be one of {COUPLING_MODES}, got {self.coupling!r}")
        if not 0.0 <= self.action_dropout < 1.0:
            raise ValueError(f"action_dropout must be in [0, 1), got {self.action_dropout}")
        if self.action_contrast < 0 or self.action_contrast_margin < 0:
            raise ValueError("action_contrast and action_contrast_margin must be >= 0")
        if self.next_obs_reader not in NEXT_OBS_READERS:
            raise ValueError(f"next_obs_reader must be one of {NEXT_OBS_READERS}, got {self.next_obs_reader!r}")
        if self.next_obs_reader == "image" and self.obs_encoder != "resnet":
            raise ValueError("next_obs_reader 'image' reads the prediction with the policy's ResNet: it needs "
                             f"obs_encoder 'resnet', got {self.obs_encoder!r}")
        if not 0.0 <= self.current_image_dropout < 1.0:
            raise ValueError(f"current_image_dropout must be in [0, 1), got {self.current_image_dropout}")
        if self.current_image_dropout > 0 and self.next_obs_mix.null >= 1.0:
            raise ValueError("current_image_dropout needs a next-observation source other than null in next_obs_mix")
        if self.next_obs_offset is not None and self.next_obs_offset < 1:
            raise ValueError(f"next_obs_offset must be >= 1, got {self.next_obs_offset}")
        if self.dynamics_sources is not None:
            self.dynamics_sources = tuple(self.dynamics_sources)
            bad = [s for s in self.dynamics_sources if s not in EPISODE_SOURCES]
            if bad or not self.dynamics_sources:
                raise ValueError(f"dynamics_sources must be a non-empty subset of {EPISODE_SOURCES}, got "
                                 f"{self.dynamics_sources}")

    @property
    def next_offset(self) -> int:
        return self.next_obs_offset or self.n_action_steps


def gated_attention_unet(parts: dict[str, Any]) -> dict[str, Any]:
    """A named size's parts with DAP's U-Net default: the next-observation tokens in their own softmax behind
    per-layer gates (`UNet1DConfig.gated_dynamic_context`). Chosen on validation episodes and confirmed on test
    episodes of peg-insert-side (2026-11-28, docs/results.md): with the prediction's tokens in the current
    observation's softmax DAP trailed FM out of distribution; behind the gates it does not."""
    return {**parts, "unet": replace(parts["unet"], gated_dynamic_context=True)}


DAP_CONFIGS = {
    "tiny": lambda: DAPConfig(**gated_attention_unet(tiny_parts()),
                              dynamics=DiTConfig(hidden_dim=32, depth=1, heads=2),
                              training=sized_training(DAPTraining(), "tiny")),
    "small": lambda: DAPConfig(**gated_attention_unet(small_parts()),
                               dynamics=DiTConfig(hidden_dim=128, depth=3, heads=4)),
    "paper": lambda: DAPConfig(**gated_attention_unet(paper_parts()),
                               dynamics=DiTConfig(hidden_dim=768, depth=12, heads=12),
                               training=sized_training(DAPTraining(), "paper")),
}
