"""DP-T: Diffusion Policy, transformer variant (Chi et al. 2023), reimplemented at this project's scale.

A time-series denoising transformer (Diffusion Policy's `TransformerForDiffusion` with observations as
condition): the H noisy action tokens (+ learned positions) run through a pre-norm transformer decoder with
causal self-attention among themselves and cross-attention to a condition sequence = [diffusion-time token,
observation tokens]. The observation tokens are one per (frame, camera) from DP-C's keypoint image encoder and
one proprio token per frame, with learned positions; the condition is encoded by an MLP (Diffusion Policy's
`n_cond_layers = 0`) or a small transformer encoder. Every action token sees the whole condition: our chunk
starts at the latest observed frame, so no observation lies in an action's future (Diffusion Policy's memory
mask only hides frames later than the action). Encoder, DDPM training and DDIM/DDPM sampling are DP-C's
(`DiffusionPolicyBase` in `policies/dp_c.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dapolicy.nn.attention import TimestepEmbedding
from dapolicy.nn.encoders import ResNetGNConfig
from dapolicy.policies.base import StagePreset, TrainingPresets, preset_field
from dapolicy.policies.dp_c import DiffusionPolicyBase, DiffusionPolicyConfig
from dapolicy.policies.fm import sized_training

if TYPE_CHECKING:
    from dapolicy.policies.registry import Method


@dataclass
class DPTTraining(TrainingPresets):
    """One stage: encoders + transformer on successful expert windows (FM's policy budget)."""

    policy: StagePreset = preset_field(2200, 3e-4, 64)


@dataclass
class DPTConfig(DiffusionPolicyConfig):
    """Diffusion Policy, transformer (see `DiffusionPolicyConfig` for the shared fields).

    embed_dim: token width (Diffusion Policy: 256). heads: attention heads (must divide embed_dim).
    layers: decoder layers over the action tokens (Diffusion Policy: 8).
    cond_layers: transformer-encoder layers over the condition tokens; 0 = a per-token MLP (Diffusion Policy's
        default for image tasks).
    dropout: in attention, feed-forward and residuals (Diffusion Policy's p_drop_attn: 0.3 for images).
    embed_dropout: on the action-token embeddings (Diffusion Policy's p_drop_emb: 0.0).
    training: the stage's budget (steps, lr, batch size).
    """

    embed_dim: int = 256
    heads: int = 4
    layers: int = 8
    cond_layers: int = 0
    dropout: float = 0.3
    embed_dropout: float = 0.0
    training: DPTTraining = field(default_factory=DPTTraining)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embed_dim < 1 or self.heads < 1 or self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be positive and divisible by heads {self.heads}")
        if self.layers < 1 or self.cond_layers < 0:
            raise ValueError(f"need layers >= 1 and cond_layers >= 0, got {self.layers}, {self.cond_layers}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.embed_dropout < 1.0):
            raise ValueError(f"dropout and embed_dropout must be in [0, 1), got {self.dropout}, {self.embed_dropout}")


class DenoisingTransformer(nn.Module):
    """eps(x_t, t | observation tokens): causal decoder over action tokens, cross-attending to [time, obs]."""

    def __init__(self, cfg: DPTConfig, action_dim: int, proprio_dim: int, n_cameras: int) -> None:
        super().__init__()
        d = cfg.embed_dim
        n_obs_tokens = cfg.n_obs_steps * (n_cameras + 1)
        self.image_in = nn.Linear(cfg.feature_dim, d)
        self.proprio_in = nn.Linear(proprio_dim, d)
        self.time_embed = TimestepEmbedding(d)
        self.cond_pos = nn.Parameter(torch.randn(1, 1 + n_obs_tokens, d) * 0.02)
        if cfg.cond_layers:
            layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.cond_encoder: nn.Module = nn.TransformerEncoder(layer, cfg.cond_layers, enable_nested_tensor=False)
        else:
            self.cond_encoder = nn.Sequential(nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d))
        self.action_in = nn.Linear(action_dim, d)
        self.action_pos = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        layer = nn.TransformerDecoderLayer(d, cfg.heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.layers)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, action_dim)

    def observation_tokens(self, features: Tensor, proprio: Tensor) -> Tensor:
        """[B, T, C, F] image features + [B, T, P] proprio -> [B, T * (C + 1), D], per frame: cameras, proprio."""
        tokens = torch.cat([self.image_in(features), self.proprio_in(proprio)[:, :, None]], dim=2)
        return tokens.flatten(1, 2)

    def forward(self, x: Tensor, time: Tensor, obs_tokens: Tensor) -> Tensor:
        """x [B, H, A] at diffusion time [B] (t / T) -> predicted noise [B, H, A]."""
        b, h, _ = x.shape
        if h != self.action_pos.shape[1]:
            raise ValueError(f"x has {h} action steps; the transformer is built for horizon "
                             f"{self.action_pos.shape[1]}")
        if obs_tokens.shape[1] + 1 != self.cond_pos.shape[1]:
            raise ValueError(f"got {obs_tokens.shape[1]} observation tokens, expected {self.cond_pos.shape[1] - 1}")
        cond = torch.cat([self.time_embed(time)[:, None], obs_tokens.expand(b, -1, -1)], dim=1)
        memory = self.cond_encoder(cond + self.cond_pos)
        tokens = self.embed_drop(self.action_in(x) + self.action_pos)
        mask = nn.Transformer.generate_square_subsequent_mask(h, device=x.device, dtype=tokens.dtype)
        out = self.decoder(tokens, memory, tgt_mask=mask, tgt_is_causal=True)
        return self.head(self.norm(out))


class DPTPolicy(DiffusionPolicyBase):
    """DP-T: DP-C's encoder and diffusion, with a causal denoising transformer instead of the U-Net."""

    method = "dp-t"
    config_class = DPTConfig

    def build_denoiser(self) -> nn.Module:
        return DenoisingTransformer(self.config, self.spec.action_dim, self.spec.proprio_dim, len(self.spec.cameras))

    def condition(self, features: Tensor, proprio: Tensor) -> Tensor:
        """Observation tokens [B, T_o * (C + 1), D], embedded once per chunk."""
        return self.net.denoiser.observation_tokens(features, proprio)

    def predict_noise(self, x: Tensor, time: Tensor, cond: Tensor) -> Tensor:
        return self.net.denoiser(x, time, cond)


# ---------------------------------------------------------------------------------------------- named sizes
def _dpt_tiny() -> DPTConfig:
    return DPTConfig(num_keypoints=8, feature_dim=16, resnet=ResNetGNConfig(width=8, blocks=(1, 1, 1), n_groups=4),
                     embed_dim=32, heads=2, layers=1, dropout=0.0, training=sized_training(DPTTraining(), "tiny"))


def _dpt_small() -> DPTConfig:
    """The CPU default, near DAP's small in trainable parameters (dropout lowered for the short budget)."""
    return DPTConfig(resnet=ResNetGNConfig(width=32, blocks=(1, 1, 1, 1)), embed_dim=128, heads=4, layers=6,
                     dropout=0.1)


def _dpt_paper() -> DPTConfig:
    """Paper scale (GPU): ResNet18-like encoders and a wide decoder, ~300M trainable parameters."""
    return DPTConfig(resnet=ResNetGNConfig(width=64, blocks=(2, 2, 2, 2)), embed_dim=1024, heads=16, layers=16,
                     training=sized_training(DPTTraining(), "paper"))


DPT_CONFIGS = {"tiny": _dpt_tiny, "small": _dpt_small, "paper": _dpt_paper}


def _method() -> Method:
    from dapolicy.policies.registry import Method

    return Method("dp-t", "Diffusion Policy, transformer: causal denoising transformer cross-attending to "
                  "time and observation tokens, DDPM training, DDIM/DDPM sampling", DPTConfig, DPTPolicy,
                  DPT_CONFIGS)


METHOD = _method()
