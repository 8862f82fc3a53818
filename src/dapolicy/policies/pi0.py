"""pi0 stand-in: a flow-matching action expert over a prefix of observation tokens, without the pretrained VLM.

Stands in for pi0 (Black et al. 2024). One transformer, two sets of weights ("experts", as in pi0): the prefix
expert reads the observation tokens (image patches of every camera and frame from a small conv stem trained
end to end on raw images, + one proprio token), the action expert reads the noisy action tokens, with the flow
time mixed into every action token by an MLP (pi0's action/time token). Both attend in shared attention
layers under pi0's block mask: prefix tokens attend bidirectionally among themselves only, action tokens
attend to the whole prefix and to each other. So the prefix does not depend on the noisy actions, and
inference encodes it once per chunk, keeps its keys/values per layer, and runs only the action expert at each
of the K Euler steps. Training uses the Beta tau schedule of pi0 by default.

Missing from the published model: the pretrained PaliGemma VLM (SigLIP vision tower + Gemma language model;
here a small ResNet-GroupNorm stem and a transformer trained from scratch), language instructions, RoPE and
Gemma's RMSNorm/GeGLU layers, a narrower action expert, and the cross-embodiment pre-training mixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapolicy.flow import FlowConfig, flow_loss, sample_tau, training_pair
from dapolicy.nn.attention import KV, sinusoidal_embedding, split_heads
from dapolicy.nn.encoders import ResNetGN, ResNetGNConfig
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
from dapolicy.policies.coupling import CouplingTrace, sample_policy
from dapolicy.policies.fm import sized_training
from dapolicy.spec import EnvSpec

if TYPE_CHECKING:
    from dapolicy.policies.registry import Method


@dataclass
class Pi0Training(TrainingPresets):
    """Per-stage defaults: one stage, the whole network (stem included) on expert windows of raw images."""

    policy: StagePreset = preset_field(2200, 3e-4, 64)


@dataclass
class Pi0TransformerConfig:
    """Size of the prefix/action transformer.

    width: token width D of both experts (they share attention, so their query/key/value widths must agree);
        divisible by heads and by 4 (2-D position embedding of the image tokens).
    depth: layers; every layer has a prefix-expert and an action-expert half.
    heads: attention heads.
    mlp_ratio: hidden width of the prefix expert's MLP relative to D; action_mlp_ratio: the same for the
        action expert (pi0's action expert is the smaller one).
    """

    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    action_mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width < 4 or self.depth < 1 or self.heads < 1:
            raise ValueError("width >= 4, depth >= 1 and heads >= 1 are required")
        if self.width % self.heads or self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads} and by 4")
        if self.mlp_ratio <= 0 or self.action_mlp_ratio <= 0:
            raise ValueError("mlp_ratio and action_mlp_ratio must be > 0")


@dataclass
class Pi0Config:
    """The pi0-style policy (the task's shapes come from the EnvSpec).

    n_obs_steps: T_o, observation frames in the prefix (pi0 itself uses 1; 2 matches DAP/FM's inputs).
    horizon: H, actions per chunk (one action token each). n_action_steps: T_a, actions executed per re-plan.
    image_shift: random-shift augmentation in pixels at 64 px (scaled with the image size); 0 = off.
    flow: training tau schedule ("beta" as in pi0) and the number of sampling steps K (10 as in pi0).
    stem: the conv stem that turns each image into patch tokens (one stem shared by all cameras, as pi0 shares
        its vision tower; its out_dim and image_size are set from `transformer.width` and the task).
    transformer: the two experts' size. training: the stage's budget (steps, lr, batch size).
    """

    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    image_shift: int = 4
    flow: FlowConfig = field(default_factory=lambda: FlowConfig(tau_schedule="beta"))
    stem: ResNetGNConfig = field(default_factory=ResNetGNConfig)
    transformer: Pi0TransformerConfig = field(default_factory=Pi0TransformerConfig)
    training: Pi0Training = field(default_factory=Pi0Training)

    def __post_init__(self) -> None:
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}")
        if self.image_shift < 0:
            raise ValueError(f"image_shift must be >= 0, got {self.image_shift}")


PI0_CONFIGS = {
    "tiny": lambda: Pi0Config(flow=FlowConfig(steps=4, tau_schedule="beta"),
                              stem=ResNetGNConfig(width=8, blocks=(1, 1, 1), n_groups=4),
                              transformer=Pi0TransformerConfig(width=32, depth=2, heads=2),
                              training=sized_training(Pi0Training(), "tiny")),
    "small": lambda: Pi0Config(stem=ResNetGNConfig(width=8, blocks=(1, 1, 1, 1), n_groups=4),
                               transformer=Pi0TransformerConfig(width=160, depth=6, heads=5)),
    "paper": lambda: Pi0Config(stem=ResNetGNConfig(width=64, blocks=(2, 2, 2, 2)),
                               transformer=Pi0TransformerConfig(width=1024, depth=12, heads=16),
                               training=sized_training(Pi0Training(), "paper")),
}


# ---------------------------------------------------------------------------------------------- network
def prefix_suffix_mask(n_prefix: int, n_suffix: int, device: torch.device | str | None = None) -> Tensor:
    """pi0's block attention mask, bool [N, N] (True = may attend): prefix rows see the prefix only; suffix
    rows see everything."""
    n = n_prefix + n_suffix
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[:n_prefix, n_prefix:] = False
    return mask


class ExpertLayer(nn.Module):
    """One expert's half of a layer: pre-norm, its own query/key/value/output projections, pre-norm MLP.

    The attention itself is shared with the other expert (`PrefixActionTransformer`), so this module only
    projects into it (`project`) and back out of it (`finish`). kv_only: the prefix expert's last layer, whose
    outputs nothing reads, only projects keys and values (no dead weights).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, kv_only: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_only = heads, kv_only
        self.norm1 = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, (2 if kv_only else 3) * dim)
        if not kv_only:
            self.proj_out = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            hidden = max(1, int(dim * mlp_ratio))
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def project(self, x: Tensor) -> list[Tensor]:
        """Per-head [queries,] keys, values [B, heads, N, D / heads] of tokens x [B, N, D]."""
        parts = self.proj_in(self.norm1(x)).chunk(2 if self.kv_only else 3, dim=-1)
        return [split_heads(t, self.heads) for t in parts]

    def finish(self, x: Tensor, attended: Tensor) -> Tensor:
        """Residual output projection of the attention result [B, heads, N, D / heads], then the MLP."""
        if self.kv_only:
            raise ValueError("a kv_only layer has no outputs")
        x = x + self.proj_out(attended.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))


class PrefixActionTransformer(nn.Module):
    """Observation prefix + noisy-action suffix, two experts sharing masked attention, velocity of the actions.

    `forward` runs the whole sequence under `prefix_suffix_mask` (training); `prefix_cache` + `velocity`
    compute the same thing in two parts (inference: the prefix's keys/values once, the suffix per flow step).
    """

    def __init__(self, cfg: Pi0TransformerConfig, stem: ResNetGNConfig, n_cameras: int, n_obs_steps: int,
                 image_size: int, proprio_dim: int, action_dim: int, horizon: int) -> None:
        super().__init__()
        d = cfg.width
        self.cfg = cfg
        self.n_cameras, self.n_obs_steps, self.image_size = n_cameras, n_obs_steps, image_size
        self.proprio_dim, self.action_dim, self.horizon = proprio_dim, action_dim, horizon
        self.stem = ResNetGN(replace(stem, out_dim=d, image_size=image_size))
        self.camera_embed = nn.Parameter(torch.randn(n_cameras, d) * 0.02)
        self.frame_embed = nn.Parameter(torch.randn(n_obs_steps, d) * 0.02)
        self.proprio_in = nn.Linear(n_obs_steps * proprio_dim, d)
        self.action_in = nn.Linear(action_dim, d)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.step_embed = nn.Parameter(torch.randn(horizon, d) * 0.02)
        self.prefix_layers = nn.ModuleList(ExpertLayer(d, cfg.heads, cfg.mlp_ratio, kv_only=i == cfg.depth - 1)
                                           for i in range(cfg.depth))
        self.action_layers = nn.ModuleList(ExpertLayer(d, cfg.heads, cfg.action_mlp_ratio) for _ in range(cfg.depth))
        self.action_norm = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, action_dim)

    # ---------------------------------------------------------------- tokens
    def prefix_tokens(self, images: Tensor, proprio: Tensor) -> Tensor:
        """images float [B, T_o, C, 3, S, S] in [-1, 1], proprio [B, T_o, P] -> [B, T_o * C * N + 1, D]."""
        b = images.shape[0]
        want = (b, self.n_obs_steps, self.n_cameras, 3, self.image_size, self.image_size)
        if tuple(images.shape) != want:
            raise ValueError(f"images must be [{', '.join(map(str, want))}] float, got {tuple(images.shape)}")
        if tuple(proprio.shape) != (b, self.n_obs_steps, self.proprio_dim):
            raise ValueError(f"proprio must be [{b}, {self.n_obs_steps}, {self.proprio_dim}], "
                             f"got {tuple(proprio.shape)}")
        tok = self.stem(images.flatten(0, 2))  # one stem for every camera and frame
        tok = tok.view(b, self.n_obs_steps, self.n_cameras, -1, tok.shape[-1])
        tok = tok + self.camera_embed[None, None, :, None] + self.frame_embed[None, :, None, None]
        return torch.cat([tok.flatten(1, 3), self.proprio_in(proprio.flatten(1))[:, None]], dim=1)

    def suffix_tokens(self, noisy_action: Tensor, tau: Tensor) -> Tensor:
        """pi0's action tokens: MLP([W a_tau ; sinusoid(tau)]) per step, + step embedding. [B, H, D]."""
        b = noisy_action.shape[0]
        if tuple(noisy_action.shape) != (b, self.horizon, self.action_dim):
            raise ValueError(f"noisy actions must be [B, {self.horizon}, {self.action_dim}], "
                             f"got {tuple(noisy_action.shape)}")
        if tuple(tau.shape) != (b,):
            raise ValueError(f"tau must be [B={b}], got {tuple(tau.shape)}")
        a = self.action_in(noisy_action)
        t = sinusoidal_embedding(tau, a.shape[-1]).to(a.dtype)[:, None].expand_as(a)
        return self.action_time_mlp(torch.cat([a, t], dim=-1)) + self.step_embed

    # ---------------------------------------------------------------- the two ways to run it
    def forward(self, prefix: Tensor, suffix: Tensor) -> tuple[Tensor, Tensor]:
        """The full sequence under the block mask -> (prefix outputs [B, N_p, D], action velocity [B, H, A]).

        The prefix outputs are those the prefix expert's last (keys/values only) layer reads.
        """
        n_prefix = prefix.shape[1]
        mask = prefix_suffix_mask(n_prefix, suffix.shape[1], prefix.device)
        for prefix_layer, action_layer in zip(self.prefix_layers, self.action_layers):
            *qp, kp, vp = prefix_layer.project(prefix)
            qs, ks, vs = action_layer.project(suffix)
            rows = slice(n_prefix if prefix_layer.kv_only else 0, None)  # the last layer: only suffix queries
            o = F.scaled_dot_product_attention(torch.cat([*qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2),
                                               attn_mask=mask[rows])
            if not prefix_layer.kv_only:
                prefix = prefix_layer.finish(prefix, o[:, :, :n_prefix])
            suffix = action_layer.finish(suffix, o[:, :, -suffix.shape[1]:])
        return prefix, self.action_out(self.action_norm(suffix))

    def prefix_cache(self, prefix: Tensor) -> list[KV]:
        """Keys/values of the prefix at every layer (the prefix attends to itself only, so they are final)."""
        cache = []
        for layer in self.prefix_layers:
            *q, k, v = layer.project(prefix)
            cache.append((k, v))
            if not layer.kv_only:
                prefix = layer.finish(prefix, F.scaled_dot_product_attention(q[0], k, v))
        return cache

    def velocity(self, suffix: Tensor, cache: list[KV]) -> Tensor:
        """Action velocity [B, H, A] of suffix tokens attending to the cached prefix and to each other."""
        for layer, (kp, vp) in zip(self.action_layers, cache):
            q, k, v = layer.project(suffix)
            suffix = layer.finish(suffix, F.scaled_dot_product_attention(q, torch.cat([kp, k], 2),
                                                                         torch.cat([vp, v], 2)))
        return self.action_out(self.action_norm(suffix))


# ---------------------------------------------------------------------------------------------- policy
class Pi0Policy(Policy):
    """Conv stem + prefix/action transformer, trained end to end on raw images; Euler sampling with a cached
    prefix."""

    method = "pi0"
    config_class = Pi0Config
    capabilities = Capabilities(predicts_next_obs=False, modes=(), has_trace=True)

    def __init__(self, config: Pi0Config, spec: EnvSpec) -> None:
        super().__init__(config, spec)
        down = 2 ** len(config.stem.blocks)
        if spec.image_size % down:
            raise ValueError(f"image_size {spec.image_size} must be divisible by the stem's down-sampling {down}")
        self.net = PrefixActionTransformer(config.transformer, config.stem, len(spec.cameras), config.n_obs_steps,
                                           spec.image_size, spec.proprio_dim, spec.action_dim, config.horizon)

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return (StageSpec("policy", sources=("expert",), success_only=True, inputs=("images",)),)

    def stage_module(self, stage: str) -> nn.Module:
        self.stage_spec(stage)
        return self.net

    def prefix(self, batch: Mapping[str, Tensor], augment: bool) -> Tensor:
        """Prefix tokens of a batch's raw images (random shift when training) and proprio."""
        images = images_to_float(require(batch, "images", 6))
        if augment:
            images = self.shifted(images, self.net, self.image_shift_pad())
        proprio = self.proprio_normalizer.normalize(require(batch, "proprio", 3))
        return self.net.prefix_tokens(images, proprio)

    def compute_loss(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        self.stage_spec(stage)
        action = self.action_normalizer.normalize(require(batch, "action", 3))
        tau = sample_tau(action.shape[0], self.config.flow, device=action.device)
        a_tau, target = training_pair(action, tau)
        _, v = self.net(self.prefix(batch, augment=True), self.net.suffix_tokens(a_tau, tau))
        return {"loss": flow_loss(v, target)}

    def _predict(self, batch: dict[str, Tensor], return_next: bool, mode: str | None, steps: int | None,
                 return_trace: bool, generator: torch.Generator | None) -> ChunkPrediction:
        steps = steps or self.config.flow.steps
        b = batch["proprio"].shape[0]
        cache = self.net.prefix_cache(self.prefix(batch, augment=False))  # once per chunk, reused at every step

        def velocity(a: Tensor, tau: float, _next: Tensor | None) -> Tensor:
            return self.net.velocity(self.net.suffix_tokens(a, torch.full((b,), tau, device=a.device)), cache)

        a0 = torch.randn((b, self.config.horizon, self.spec.action_dim), generator=generator, device=self.device)
        trace = CouplingTrace() if return_trace else None
        a = sample_policy(velocity, a0, steps, None, trace)
        return ChunkPrediction(self.action_normalizer.unnormalize(a).cpu().numpy(),
                               trace=trace.as_dict() if trace is not None else None)


def _method() -> Method:
    from dapolicy.policies.registry import Method

    return Method("pi0", "stand-in for pi0 (Black et al. 2024): flow-matching action expert over an image+proprio "
                  "prefix with pi0's block mask and a cached prefix; no pretrained VLM (conv stem + transformer from "
                  "scratch), no language, no cross-embodiment pre-training", Pi0Config, Pi0Policy, PI0_CONFIGS,
                  stand_in=True)


METHOD = _method()
