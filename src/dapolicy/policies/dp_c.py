"""DP-C: Diffusion Policy, CNN variant (Chi et al. 2023), reimplemented at this project's scale.

Per camera, a ResNet-GroupNorm feature map -> SpatialSoftmax keypoints -> a linear (robomimic's VisualCore,
as in Diffusion Policy), trained end to end on raw images with random-shift augmentation. The features of
the T_o frames and the normalised proprio, concatenated, are the global FiLM condition of a 1-D U-Net with no
cross-attention that predicts the noise of a 100-step squared-cosine DDPM; sampling is DDIM (default, 10
steps) or full DDPM ancestral sampling (`policies/diffusion.py`). EMA is the trainer's.

This module also holds what DP-T (`policies/dp_t.py`) shares with it: the common config fields
(`DiffusionPolicyConfig`), the image encoder (`KeypointEncoders`) and the policy base (`DiffusionPolicyBase`:
the stage, the epsilon loss, the samplers); a variant only builds its denoiser.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapolicy.nn.encoders import ResNetGN, ResNetGNConfig, SpatialSoftmax
from dapolicy.nn.unet1d import CrossAttnUNet1D, UNet1DConfig
from dapolicy.policies.base import (
    Capabilities,
    ChunkPrediction,
    Policy,
    StagePreset,
    StageSpec,
    TrainingPresets,
    images_to_float,
    preset_field,
    require,
)
from dapolicy.policies.diffusion import DIFFUSION_MODES, DiffusionConfig, NoiseScheduler
from dapolicy.policies.fm import sized_training
from dapolicy.spec import EnvSpec

if TYPE_CHECKING:
    from dapolicy.policies.registry import Method


# ---------------------------------------------------------------------------------------------- shared config
@dataclass
class DiffusionPolicyConfig:
    """The fields DP-C and DP-T share (the task's shapes come from the EnvSpec).

    n_obs_steps: T_o, observation frames given to the policy.
    horizon: H, actions per predicted chunk. n_action_steps: T_a, actions executed before re-planning.
    image_shift: random-shift augmentation in pixels at 64 px (scaled with the image size); 0 = off.
    num_keypoints: SpatialSoftmax keypoints per camera (Diffusion Policy: 32).
    feature_dim: width of the linear after the keypoints, per camera and frame (Diffusion Policy: 64).
    resnet: the per-camera ResNet-GroupNorm; only its feature map is read (its out_dim and pos_embed are unused).
    diffusion: DDPM training steps, default sampler and its steps.
    """

    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    image_shift: int = 4
    num_keypoints: int = 32
    feature_dim: int = 64
    resnet: ResNetGNConfig = field(default_factory=ResNetGNConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}")
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if self.image_shift < 0:
            raise ValueError(f"image_shift must be >= 0, got {self.image_shift}")
        if self.num_keypoints < 1 or self.feature_dim < 1:
            raise ValueError(f"num_keypoints and feature_dim must be >= 1, got {self.num_keypoints}, "
                             f"{self.feature_dim}")


# ---------------------------------------------------------------------------------------------- image encoder
class KeypointEncoders(nn.Module):
    """Per camera: ResNet-GN feature map -> SpatialSoftmax keypoints -> linear (Diffusion Policy's encoder).

    images float [B, T, C, 3, S, S] in [-1, 1] -> features [B, T, C, feature_dim]. One encoder per camera,
    as in Diffusion Policy (no weight sharing).
    """

    def __init__(self, n_cameras: int, image_size: int, resnet: ResNetGNConfig, num_keypoints: int,
                 feature_dim: int) -> None:
        super().__init__()
        backbones = [ResNetGN(replace(resnet, image_size=image_size)) for _ in range(n_cameras)]
        for backbone in backbones:  # ResNetGN always builds a token head; only its feature map is used here
            del backbone.proj, backbone.pos
        self.backbones = nn.ModuleList(backbones)
        self.keypoints = nn.ModuleList(SpatialSoftmax(resnet.feature_channels, num_keypoints) for _ in backbones)
        self.linears = nn.ModuleList(nn.Linear(2 * num_keypoints, feature_dim) for _ in backbones)
        self.feature_dim = feature_dim

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 6 or images.shape[2] != len(self.backbones):
            raise ValueError(f"images must be [B, T, {len(self.backbones)}, 3, S, S], got {tuple(images.shape)}")
        b, t = images.shape[:2]
        feats = [lin(kp(net.feature_map(images[:, :, i].flatten(0, 1))))
                 for i, (net, kp, lin) in enumerate(zip(self.backbones, self.keypoints, self.linears))]
        return torch.stack(feats, dim=1).view(b, t, len(feats), self.feature_dim)


class DiffusionPolicyNet(nn.Module):
    """Everything the one training stage optimises (and the trainer averages): image encoders + denoiser."""

    def __init__(self, obs_encoder: KeypointEncoders, denoiser: nn.Module) -> None:
        super().__init__()
        self.obs_encoder = obs_encoder
        self.denoiser = denoiser


# ---------------------------------------------------------------------------------------------- policy base
class DiffusionPolicyBase(Policy):
    """Diffusion Policy's training and sampling around a variant's denoiser.

    Subclasses implement `build_denoiser`, `condition` (observation features -> what the denoiser reads,
    computed once per chunk) and `predict_noise`. The denoiser's time input is t / T in [0, 1).
    """

    capabilities = Capabilities(predicts_next_obs=False, modes=DIFFUSION_MODES, has_trace=False)

    def __init__(self, config: DiffusionPolicyConfig, spec: EnvSpec) -> None:
        super().__init__(config, spec)
        self.scheduler = NoiseScheduler(config.diffusion)
        encoder = KeypointEncoders(len(spec.cameras), spec.image_size, config.resnet, config.num_keypoints,
                                   config.feature_dim)
        self.net = DiffusionPolicyNet(encoder, self.build_denoiser())

    @abstractmethod
    def build_denoiser(self) -> nn.Module:
        """The noise-prediction network (called once, in __init__, after the normalisers exist)."""

    @abstractmethod
    def condition(self, features: Tensor, proprio: Tensor) -> Any:
        """Image features [B, T_o, C, F] + normalised proprio [B, T_o, P] -> the denoiser's condition."""

    @abstractmethod
    def predict_noise(self, x: Tensor, time: Tensor, cond: Any) -> Tensor:
        """Predicted noise [B, H, A] of the noisy normalised chunk x at diffusion time t / T ([B] float)."""

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return (StageSpec("policy", sources=("expert",), success_only=True, inputs=("images",)),)

    def stage_module(self, stage: str) -> nn.Module:
        self.stage_spec(stage)
        return self.net

    # ------------------------------------------------------------------ observation
    def observation_condition(self, batch: Mapping[str, Tensor], augment: bool) -> Any:
        """Encode a window's raw images (random shift while training) and proprio into the condition."""
        images, proprio = require(batch, "images", 6), require(batch, "proprio", 3)
        t, c, s = self.n_obs_steps, len(self.spec.cameras), self.spec.image_size
        if tuple(images.shape[1:]) != (t, c, s, s, 3):
            raise ValueError(f"batch['images'] has shape {tuple(images.shape)}, expected [B, {t}, {c}, {s}, {s}, 3]")
        if tuple(proprio.shape[1:]) != (t, self.spec.proprio_dim):
            raise ValueError(f"batch['proprio'] has shape {tuple(proprio.shape)}, "
                             f"expected [B, {t}, {self.spec.proprio_dim}]")
        x = images_to_float(images)
        if augment:
            x = self.shifted(x, self.net, self.image_shift_pad())
        return self.condition(self.net.obs_encoder(x), self.proprio_normalizer.normalize(proprio.float()))

    def diffusion_time(self, t: Tensor) -> Tensor:
        return t.float() / self.scheduler.train_steps

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        """Epsilon-prediction MSE at a uniform random step (padded actions count, as in Diffusion Policy)."""
        self.stage_spec(stage)
        action = self.action_normalizer.normalize(require(batch, "action", 3))
        if tuple(action.shape[1:]) != (self.horizon, self.spec.action_dim):
            raise ValueError(f"batch['action'] has shape {tuple(action.shape)}, "
                             f"expected [B, {self.horizon}, {self.spec.action_dim}]")
        cond = self.observation_condition(batch, augment=True)
        noise = torch.randn_like(action)
        t = self.scheduler.sample_timesteps(action.shape[0], device=action.device)
        eps = self.predict_noise(self.scheduler.add_noise(action, noise, t), self.diffusion_time(t), cond)
        return {"loss": F.mse_loss(eps, noise)}

    # ------------------------------------------------------------------ inference
    def _predict(self, batch: dict[str, Tensor], return_next: bool, mode: str | None, steps: int | None,
                 return_trace: bool, generator: torch.Generator | None) -> ChunkPrediction:
        """DDIM (default: config.diffusion.inference_steps) or DDPM (default: all T steps) from pure noise."""
        cond = self.observation_condition(batch, augment=False)
        b = batch["proprio"].shape[0]
        x = torch.randn((b, self.horizon, self.spec.action_dim), generator=generator, device=self.device)

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.predict_noise(x_t, self.diffusion_time(t), cond)

        a = self.scheduler.sample(eps_fn, x, steps=steps, mode=mode, generator=generator)
        return ChunkPrediction(self.action_normalizer.unnormalize(a).cpu().numpy())


# ---------------------------------------------------------------------------------------------- DP-C
@dataclass
class DPCTraining(TrainingPresets):
    """One stage: encoders + U-Net on successful expert windows (FM's policy budget, for a fair comparison)."""

    policy: StagePreset = preset_field(2200, 3e-4, 64)


@dataclass
class DPCConfig(DiffusionPolicyConfig):
    """Diffusion Policy, CNN (see `DiffusionPolicyConfig` for the shared fields).

    unet: the FiLM-conditioned 1-D U-Net; `cross_attention` must stay False (observations enter by FiLM).
    training: the stage's budget (steps, lr, batch size).
    """

    unet: UNet1DConfig = field(default_factory=lambda: UNet1DConfig(cross_attention=False))
    training: DPCTraining = field(default_factory=DPCTraining)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unet.cross_attention:
            raise ValueError("dp-c conditions its U-Net by FiLM only: unet.cross_attention must be False")
        if self.horizon % self.unet.horizon_multiple:
            raise ValueError(f"horizon {self.horizon} must be a multiple of {self.unet.horizon_multiple} "
                             f"(the U-Net halves the chunk {len(self.unet.down_dims) - 1} times)")


class DPCPolicy(DiffusionPolicyBase):
    """DP-C: keypoint image features + proprio of the T_o frames as the global FiLM condition of a 1-D U-Net."""

    method = "dp-c"
    config_class = DPCConfig

    def build_denoiser(self) -> nn.Module:
        per_frame = len(self.spec.cameras) * self.config.feature_dim + self.spec.proprio_dim
        return CrossAttnUNet1D(self.config.unet, self.spec.action_dim, context_dim=0,
                               global_cond_dim=self.n_obs_steps * per_frame)

    def condition(self, features: Tensor, proprio: Tensor) -> Tensor:
        """[B, T_o * (C * F + P)]: every frame's camera features and proprio, concatenated."""
        return torch.cat([features.flatten(2), proprio], dim=-1).flatten(1)

    def predict_noise(self, x: Tensor, time: Tensor, cond: Tensor) -> Tensor:
        return self.net.denoiser(x, time, global_cond=cond)


# ---------------------------------------------------------------------------------------------- named sizes
def _dpc_tiny() -> DPCConfig:
    return DPCConfig(num_keypoints=8, feature_dim=16, resnet=ResNetGNConfig(width=8, blocks=(1, 1, 1), n_groups=4),
                     unet=UNet1DConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, tau_embed_dim=16,
                                       cross_attention=False),
                     training=sized_training(DPCTraining(), "tiny"))


def _dpc_small() -> DPCConfig:
    """The CPU default, near DAP's small in trainable parameters."""
    return DPCConfig(resnet=ResNetGNConfig(width=32, blocks=(1, 1, 1, 1)),
                     unet=UNet1DConfig(down_dims=(48, 96, 192), kernel_size=5, n_groups=8, tau_embed_dim=96,
                                       cross_attention=False))


def _dpc_paper() -> DPCConfig:
    """Diffusion Policy's image CNN: ResNet18-like encoders, U-Net (512, 1024, 2048), 100k steps."""
    return DPCConfig(resnet=ResNetGNConfig(width=64, blocks=(2, 2, 2, 2)),
                     unet=UNet1DConfig(down_dims=(512, 1024, 2048), kernel_size=5, n_groups=8, tau_embed_dim=128,
                                       cross_attention=False),
                     training=sized_training(DPCTraining(), "paper"))


DPC_CONFIGS = {"tiny": _dpc_tiny, "small": _dpc_small, "paper": _dpc_paper}


def _method() -> Method:
    from dapolicy.policies.registry import Method

    return Method("dp-c", "Diffusion Policy, CNN: keypoint image features as FiLM condition of a 1-D U-Net, "
                  "DDPM training, DDIM/DDPM sampling", DPCConfig, DPCPolicy, DPC_CONFIGS)


METHOD = _method()
