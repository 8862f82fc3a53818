"""FM: the flow-matching policy alone, the "no dynamics" ablation DAP is measured against.

The network is DAP's policy (observation tokenisers + cross-attention 1-D U-Net, `policies/policy_net.py`)
without the next-observation tokens; with the default "vae" observation encoder it also trains the VAE whose
latent patches it reads. Sampling is plain Euler integration of its velocity field (`policies/coupling.py`,
mode "off").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from dapolicy.flow import FlowConfig, flow_loss, sample_tau, training_pair
from dapolicy.nn.encoders import ResNetGNConfig
from dapolicy.nn.unet1d import UNet1DConfig
from dapolicy.nn.vae import VAE, VAEConfig, foreground_weights
from dapolicy.policies.base import (
    Capabilities,
    ChunkPrediction,
    Policy,
    StagePreset,
    StageSpec,
    TrainingPresets,
    float_to_images,
    images_to_float,
    preset_field,
    require,
)
from dapolicy.policies.policy_net import PolicyNet, policy_init_seed
from dapolicy.spec import EnvSpec

OBS_ENCODERS: tuple[str, ...] = ("vae", "resnet")
#: The VAE stage's default budget (steps, lr, batch of frames), shared by every method that trains this VAE.
#: lr 5e-4 reached 25.2 dB PSNR on held-out push-v3 frames in 1000 steps; 1e-4 reached 24.1 dB in 1500.
VAE_PRESET = (1000, 5e-4, 32)


@dataclass
class FMTraining(TrainingPresets):
    """Per-stage defaults: the VAE (single frames, all episodes) and the policy (expert windows)."""

    vae: StagePreset = preset_field(*VAE_PRESET)
    policy: StagePreset = preset_field(2200, 3e-4, 64)


@dataclass
class FMConfig:
    """The flow policy without a dynamics model (the task's shapes come from the EnvSpec).

    n_obs_steps: T_o, observation frames given to the policy.
    horizon: H, actions per predicted chunk. n_action_steps: T_a, actions executed before re-planning.
    obs_encoder: how the policy tokenises current images: "vae" (frozen VAE latent patches, cheap) or
        "resnet" (a ResNet-GroupNorm per camera, trained end to end). The `small` size uses "resnet": it
        lifted push-v3 from 5/50 to 46/50 (DAP) and 7/50 to 49/50 (FM) on validation episodes, and DAP on the
        quickstart task from 13/30 to 27/30 test episodes (docs/results.md).
    token_dim: width of all observation tokens the policy cross-attends to.
    register_tokens: learned tokens appended to the observation tokens, the same for every input (0 = none).
        Why: they give the cross-attention somewhere to put weight that no observation token should get, as
        DAP's null next-observation tokens do. DAP's network trained on the null prediction alone beat FM on
        peg-insert-side (+10.7 points, 3 seeds) and FM with 32 registers did not, but from the same initial
        weights the two train identically: the gap was the draw of initial weights (docs/results.md). Off by
        default. In DAP they come on top of the next-observation (or null) tokens.
    paired_init: draw the policy network from generators of its own, seeded from the training seed
        (`torch.initial_seed()` when the policy is built), instead of from wherever the global generator stands
        after the method built its other parts (DAP builds a VAE first; FM with the ResNet encoder none). Then an
        `fm` and a `dap` run of one seed start from the same encoders, embeddings and U-Net, and differ only in
        DAP's next-observation tokens: a paired comparison of the two no longer carries two draws of initial
        weights, which on peg-insert-side moved one method from 28% to 62%. Off by default, so that a run
        recorded before it existed trains as it did.
    image_shift: random-shift augmentation in pixels at 64 px (scaled with the image size) for "resnet";
        latent_shift: the same on cached latents (in latent pixels) for "vae"; 0 = off.
    flow: training-time tau schedule and the number of sampling steps K.
    vae, unet, resnet: network sizes. training: per-stage budgets (steps, lr, batch size).
    """

    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    obs_encoder: str = "vae"
    token_dim: int = 128
    register_tokens: int = 0
    paired_init: bool = False
    image_shift: int = 4
    latent_shift: int = 0
    flow: FlowConfig = field(default_factory=FlowConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNet1DConfig = field(default_factory=UNet1DConfig)
    resnet: ResNetGNConfig = field(default_factory=ResNetGNConfig)
    training: FMTraining = field(default_factory=FMTraining)

    def __post_init__(self) -> None:
        if self.obs_encoder not in OBS_ENCODERS:
            raise ValueError(f"obs_encoder must be one of {OBS_ENCODERS}, got {self.obs_encoder!r}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}")
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if self.register_tokens < 0:
            raise ValueError(f"register_tokens must be >= 0, got {self.register_tokens}")
        if self.image_shift < 0 or self.latent_shift < 0:
            raise ValueError("image_shift and latent_shift must be >= 0")


# ---------------------------------------------------------------------------------------------- named sizes
def tiny_parts() -> dict[str, Any]:
    """Network sizes of the `tiny` configuration (tests: seconds on a CPU)."""
    return dict(token_dim=32, vae=VAEConfig(base_channels=8, channel_mults=(1, 2, 2, 2), groups=4),
                unet=UNet1DConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, tau_embed_dim=16, attn_heads=2),
                resnet=ResNetGNConfig(width=8, blocks=(1, 1, 1, 1), n_groups=4), flow=FlowConfig(steps=4))


def small_parts() -> dict[str, Any]:
    """The CPU default. No VAE residual blocks at 64 and 32 px: full-resolution convolutions dominate.

    The current images go through a 16-wide ResNet-GN trained end to end (the VAE still encodes the frames
    the dynamics model predicts): the frozen latents lose what control needs (see FMConfig.obs_encoder).
    """
    return dict(token_dim=96, obs_encoder="resnet",
                vae=VAEConfig(base_channels=8, channel_mults=(1, 2, 4, 8), blocks_per_level=(0, 0, 1, 1)),
                unet=UNet1DConfig(down_dims=(48, 96, 192), kernel_size=5, n_groups=8, tau_embed_dim=96, attn_heads=4),
                resnet=ResNetGNConfig(width=16, blocks=(1, 1, 1, 1)))


def paper_parts() -> dict[str, Any]:
    """Paper scale (GPU): the policy alone is ~156M trainable parameters."""
    return dict(token_dim=512, vae=VAEConfig(base_channels=128, channel_mults=(1, 2, 4, 4)),
                unet=UNet1DConfig(down_dims=(384, 768, 1536), kernel_size=5, n_groups=8, tau_embed_dim=256,
                                  attn_heads=8),
                resnet=ResNetGNConfig(width=64, blocks=(2, 2, 2, 2)))


TINY_TRAINING = dict(steps=20, batch_size=8)
PAPER_STEPS = {"vae": 20_000, "dynamics": 100_000, "policy": 100_000}


def sized_training(training: TrainingPresets, size: str) -> TrainingPresets:
    """The presets of a named size: tiny = 20 steps at batch 8; paper = long GPU budgets."""
    for stage, preset in vars(training).items():
        if size == "tiny":
            preset.steps, preset.batch_size = TINY_TRAINING["steps"], TINY_TRAINING["batch_size"]
        elif size == "paper":
            preset.steps = PAPER_STEPS.get(stage, preset.steps)
    return training


FM_CONFIGS = {
    "tiny": lambda: FMConfig(**tiny_parts(), training=sized_training(FMTraining(), "tiny")),
    "small": lambda: FMConfig(**small_parts()),
    "paper": lambda: FMConfig(**paper_parts(), training=sized_training(FMTraining(), "paper")),
}


# ---------------------------------------------------------------------------------------------- policy
class FMPolicy(Policy):
    """The flow policy: VAE (for the "vae" encoder) + PolicyNet; Euler sampling."""

    method = "fm"
    config_class = FMConfig
    capabilities = Capabilities(predicts_next_obs=False, modes=(), has_trace=True)
    with_next_obs = False  # DAP's policy network also reads the predicted next observation

    def __init__(self, config: FMConfig, spec: EnvSpec) -> None:
        super().__init__(config, spec)
        if config.unet.gated_dynamic_context and not self.with_next_obs:
            raise ValueError(f"unet.gated_dynamic_context gates the predicted next observation's attention; method "
                             f"{self.method!r} reads no prediction, so its gates would never be used")
        down = config.vae.downsample_factor
        if spec.image_size % (2 * down):
            raise ValueError(f"image_size {spec.image_size} must be divisible by {2 * down} "
                             f"(VAE down-sampling x{down}, then 2x2 patches)")
        self.latent_channels = config.vae.latent_channels
        self.latent_size = spec.image_size // down
        self.vae = VAE(config.vae) if self.uses_vae else None
        self.policy_net = PolicyNet(spec, obs_encoder=config.obs_encoder, token_dim=config.token_dim,
                                    n_obs_steps=config.n_obs_steps, unet=config.unet, resnet=config.resnet,
                                    latent_channels=self.latent_channels, latent_size=self.latent_size,
                                    with_next_obs=self.with_next_obs,
                                    next_obs_reader=getattr(config, "next_obs_reader", "latent"),
                                    register_tokens=config.register_tokens,
                                    init_seed=policy_init_seed() if config.paired_init else None)

    @property
    def uses_vae(self) -> bool:
        return self.config.obs_encoder == "vae"

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> tuple[StageSpec, ...]:
        stages = [self._vae_stage()] if self.uses_vae else []
        return (*stages, self._policy_stage())

    def _vae_stage(self) -> StageSpec:
        return StageSpec("vae", sources=None, layout="frames", changes_latents=True)

    def _policy_stage(self) -> StageSpec:
        inputs = ("latents",) if self.config.obs_encoder == "vae" else ("images",)
        return StageSpec("policy", sources=("expert",), success_only=True, inputs=inputs)

    def stage_module(self, stage: str) -> nn.Module:
        self.stage_spec(stage)
        return self.vae if stage == "vae" else self.policy_net

    def after_stage(self, stage: str, images: np.ndarray) -> dict[str, Any]:
        """After the VAE: scale its latents to unit variance on a sample of the training frames."""
        if stage != "vae":
            return {}
        x = torch.as_tensor(images)
        x = images_to_float(x.reshape(-1, *x.shape[-3:]).to(self.device))
        return {"latent_scale": self.vae.fit_latent_scale(x)}

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode_latents(self, images: np.ndarray | Tensor, batch_size: int = 256) -> Tensor:
        """Frozen-VAE latents of uint8 images [..., S, S, 3] -> [..., c, h, w] (scaled, deterministic)."""
        if self.vae is None:
            return super().encode_latents(images, batch_size)
        images = torch.as_tensor(images)
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        out = [self.vae.to_latent(images_to_float(flat[i:i + batch_size].to(self.device)))
               for i in range(0, flat.shape[0], batch_size)]
        z = torch.cat(out) if out else torch.empty(0)
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents [..., c, h, w] -> uint8 frames [..., S, S, 3]."""
        lead = latents.shape[:-3]
        frames = float_to_images(self.vae.from_latent(latents.reshape(-1, *latents.shape[-3:]).to(self.device)))
        return frames.reshape(*lead, *frames.shape[1:])

    # ------------------------------------------------------------------ losses
    def compute_loss(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        self.stage_spec(stage)
        if stage == "vae":
            frames = images_to_float(require(batch, "images", 5))  # [B, cameras, 3, S, S]
            cfg = self.config.vae
            weight = (foreground_weights(frames, cfg.foreground_weight, cfg.foreground_threshold).flatten(0, 1)
                      if cfg.foreground_weight > 0 else None)
            return dict(self.vae.loss(frames.flatten(0, 1), weight))
        return self._policy_loss(batch)

    def _policy_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        action = self.action_normalizer.normalize(require(batch, "action", 3))
        tokens = self.observation_tokens(batch, augment=True)
        tau = sample_tau(action.shape[0], self.config.flow, device=action.device)
        a_tau, target = training_pair(action, tau)
        v = self.policy_net.unet(a_tau, tau, static_tokens=tokens)
        return {"loss": flow_loss(v, target)}

    def observation_tokens(self, batch: Mapping[str, Tensor], augment: bool,
                           image_keep: Tensor | None = None) -> Tensor:
        """Current-observation tokens from cached latents ("vae") or raw images ("resnet").

        image_keep: [B] mask of the samples whose current images the policy may see (see `PolicyNet`).
        """
        proprio = self.proprio_normalizer.normalize(require(batch, "proprio", 3))
        if self.config.obs_encoder == "vae":
            latents = require(batch, "latents", 6)
            if augment:
                latents = self.shifted(latents, self.policy_net, self.config.latent_shift)
            return self.policy_net.observation_tokens(proprio, latents=latents, image_keep=image_keep)
        images = images_to_float(require(batch, "images", 6))
        if augment:
            images = self.shifted(images, self.policy_net, self.image_shift_pad())
        return self.policy_net.observation_tokens(proprio, images=images, image_keep=image_keep)

    # ------------------------------------------------------------------ inference
    def encode_observation(self, batch: dict[str, Tensor], need_latents: bool) -> dict[str, Tensor]:
        """Add the current latents to a validated batch when the encoder (or the caller) needs them (public: the
        attention and diagnosis scripts read the tokens of the same encoded batch that sampling uses)."""
        if need_latents or self.config.obs_encoder == "vae":
            batch["latents"] = self.encode_latents(batch["images"])
        return batch

    def _predict(self, batch: dict[str, Tensor], return_next: bool, mode: str | None, steps: int | None,
                 return_trace: bool, generator: torch.Generator | None) -> ChunkPrediction:
        # Euler sampling (coupling.sample_policy) on the fast sampler: per-call constants computed once.
        from dapolicy.policies import fast_sampler

        a, _, trace = fast_sampler.predict(self, batch, False, "off", steps or self.config.flow.steps, return_trace,
                                           generator)
        return ChunkPrediction(self.action_normalizer.unnormalize(a).cpu().numpy(), trace=trace)


def _method():  # -> registry.Method (imported late: the registry imports this module)
    from dapolicy.policies.registry import Method

    return Method("fm", "the flow-matching policy alone (DAP's policy network, no dynamics model)", FMConfig,
                  FMPolicy, FM_CONFIGS)


METHOD = _method()
