"""UVA stand-in: one transformer that jointly denoises the next frame's VAE latents and the action chunk.

Stands in for the Unified Video Action model (Li et al. 2025). The frozen VAE's latent patches of the T_o
history frames (all cameras) and the proprio are in one token sequence with the noisy next-frame latents (k
steps ahead, all cameras) and the noisy action chunk; as in UVA, a frame token concatenates one patch of the
history frames and of the noisy next frame channel-wise. Two heads read out the two velocities. At inference
both are integrated from noise together on one flow time, so the frames are generated *jointly with* the
actions (one network, one sequence) rather than conditioned on them, which is the contrast with DAP, whose
separate dynamics model is conditioned on the policy's action estimate at every step.

Missing from the published model: its masked-autoregressive (MAR) backbone with per-token diffusion heads,
multi-frame video generation and history of several chunks, the masked training of the other modes (forward /
inverse dynamics, video-only), and its pretrained initialisation. The VAE is this project's, trained first
and frozen exactly as for FM and DAP (`policies/fm.py`), so all three read the same latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dapolicy.flow import FlowConfig, euler_step, extrapolate, flow_loss, sample_tau, time_grid, training_pair
from dapolicy.nn.attention import SelfAttention, TimestepEmbedding
from dapolicy.nn.dit import DiTConfig, FinalLayer, modulate
from dapolicy.nn.encoders import LatentPatchTokenizer
from dapolicy.nn.vae import VAE, VAEConfig
from dapolicy.policies.base import (
    Capabilities,
    ChunkPrediction,
    Policy,
    StagePreset,
    StageSpec,
    TrainingPresets,
    preset_field,
    require,
)
from dapolicy.policies.coupling import CouplingTrace
from dapolicy.policies.fm import VAE_PRESET, FMPolicy, paper_parts, sized_training, small_parts, tiny_parts
from dapolicy.spec import EnvSpec

if TYPE_CHECKING:
    from dapolicy.policies.registry import Method

@dataclass
class UVATraining(TrainingPresets):
    """Per-stage defaults: the VAE as for FM/DAP; the joint model gets DAP's dynamics + policy step budget,
    since it learns both in one network."""

    vae: StagePreset = preset_field(*VAE_PRESET)
    policy: StagePreset = preset_field(3700, 2e-4, 64)


@dataclass
class UVAConfig:
    """The joint video-action model (the task's shapes come from the EnvSpec).

    n_obs_steps: T_o, history frames. horizon: H, actions per chunk. n_action_steps: T_a, actions executed
        before re-planning.
    next_obs_offset: k, the generated frame is o_{t+k}; None = n_action_steps (the frame seen at the next
        re-plan, as for DAP).
    decouple_tau: draw the frames' and the actions' flow times independently in training (UVA's decoupled
        video/action diffusion); False = one shared tau per sample. Sampling always uses one shared tau.
    frame_loss_weight: weight of the next-frame velocity loss next to the action velocity loss.
    flow: training-time tau schedule and the number of sampling steps K.
    vae: the image VAE (same sizes as FM/DAP, so `--init-from` can reuse their trained VAE).
    transformer: the joint transformer (hidden_dim, depth, heads, latent patch_size, ...; see DiTConfig).
    training: per-stage budgets (steps, lr, batch size).
    """

    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    next_obs_offset: int | None = None
    decouple_tau: bool = False
    frame_loss_weight: float = 1.0
    flow: FlowConfig = field(default_factory=FlowConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transformer: DiTConfig = field(default_factory=DiTConfig)
    training: UVATraining = field(default_factory=UVATraining)

    def __post_init__(self) -> None:
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}")
        if self.next_obs_offset is not None and self.next_obs_offset < 1:
            raise ValueError(f"next_obs_offset must be >= 1, got {self.next_obs_offset}")
        if self.frame_loss_weight < 0:
            raise ValueError(f"frame_loss_weight must be >= 0, got {self.frame_loss_weight}")


UVA_CONFIGS = {
    "tiny": lambda: UVAConfig(vae=tiny_parts()["vae"], flow=FlowConfig(steps=4),
                              transformer=DiTConfig(hidden_dim=32, depth=2, heads=2),
                              training=sized_training(UVATraining(), "tiny")),
    "small": lambda: UVAConfig(vae=small_parts()["vae"], transformer=DiTConfig(hidden_dim=160, depth=6, heads=5)),
    "paper": lambda: UVAConfig(vae=paper_parts()["vae"], transformer=DiTConfig(hidden_dim=1024, depth=16, heads=16),
                               training=sized_training(UVATraining(), "paper")),
}


# ---------------------------------------------------------------------------------------------- network
class JointBlock(nn.Module):
    """adaLN-Zero self-attention + MLP over the whole joint sequence (DiT's block without cross-attention:
    frame, proprio and action tokens all attend to each other)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1)))
        return x + gate2[:, None] * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class JointVideoActionTransformer(nn.Module):
    """Velocities of the next-frame latents and of the action chunk from one sequence of tokens.

    Sequence: [frame tokens (C x N) ; proprio (T_o) ; noisy actions (H)]. A frame token is one latent patch
    position of one camera carrying, as UVA's tokens do, the channel-wise concatenation of that patch in the
    T_o history frames and in the noisy next frame (so the next frame is generated where the history is
    read, with less than half the tokens of separate history tokens). Type, camera, frame and step embeddings
    tell the tokens apart. The flow times condition every block via adaLN (one embedding per stream, summed, so
    decoupled times are possible).
    """

    def __init__(self, cfg: DiTConfig, n_cameras: int, n_obs_steps: int, latent_channels: int, latent_size: int,
                 action_dim: int, horizon: int, proprio_dim: int) -> None:
        super().__init__()
        p, d = cfg.patch_size, cfg.hidden_dim
        if latent_size % p:
            raise ValueError(f"latent size {latent_size} is not divisible by transformer.patch_size {p}")
        self.cfg = cfg
        self.n_cameras, self.n_obs_steps, self.horizon, self.action_dim = n_cameras, n_obs_steps, horizon, action_dim
        self.latent_shape = (latent_channels, latent_size, latent_size)
        self.proprio_dim = proprio_dim
        pos = "learned" if cfg.learned_pos_embed else "sincos"
        self.frame_tokenizer = LatentPatchTokenizer((n_obs_steps + 1) * latent_channels, p, d, latent_size, pos)
        hidden = cfg.action_token_mlp_hidden or d
        self.action_in = nn.Sequential(nn.Linear(action_dim, hidden), nn.SiLU(), nn.Linear(hidden, d))
        self.proprio_in = nn.Sequential(nn.Linear(proprio_dim, hidden), nn.SiLU(), nn.Linear(hidden, d))
        self.type_embed = nn.Parameter(torch.zeros(3, d))
        self.camera_embed = nn.Parameter(torch.zeros(n_cameras, d))
        self.frame_embed = nn.Parameter(torch.zeros(n_obs_steps, d))  # of the proprio tokens
        self.step_embed = nn.Parameter(torch.zeros(horizon, d))
        self.frame_tau = TimestepEmbedding(d)
        self.action_tau = TimestepEmbedding(d)
        self.blocks = nn.ModuleList(JointBlock(d, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.frame_head = FinalLayer(d, latent_channels * p * p)
        self.action_head = FinalLayer(d, action_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier linears, small embeddings, zero adaLN and heads (identity start)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for param in (self.type_embed, self.camera_embed, self.frame_embed, self.step_embed):
            nn.init.normal_(param, std=0.02)
        for emb in (self.frame_tau, self.action_tau):
            for lin in (emb.mlp[0], emb.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
        zero = [self.frame_head.ada[1], self.frame_head.linear, self.action_head.ada[1], self.action_head.linear]
        zero += [block.ada[1] for block in self.blocks]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, C * N, c * p * p] -> [B, C, c, h, w], inverse of `LatentPatchTokenizer`'s row-major patches."""
        b, p = tokens.shape[0], self.cfg.patch_size
        c, h, w = self.latent_shape
        x = tokens.reshape(b, self.n_cameras, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.n_cameras, c, h, w)

    def _check(self, history: Tensor, proprio: Tensor, noisy_next: Tensor, noisy_action: Tensor, tau_frames: Tensor,
               tau_action: Tensor) -> None:
        b, t, cams = history.shape[0], self.n_obs_steps, self.n_cameras
        expected = {"history": (history, (b, t, cams, *self.latent_shape)),
                    "proprio": (proprio, (b, t, self.proprio_dim)),
                    "noisy_next": (noisy_next, (b, cams, *self.latent_shape)),
                    "noisy_action": (noisy_action, (b, self.horizon, self.action_dim)),
                    "tau_frames": (tau_frames, (b,)), "tau_action": (tau_action, (b,))}
        for name, (value, shape) in expected.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must be [{', '.join(map(str, shape))}], got {tuple(value.shape)}")

    def forward(self, history: Tensor, proprio: Tensor, noisy_next: Tensor, noisy_action: Tensor, tau_frames: Tensor,
                tau_action: Tensor) -> tuple[Tensor, Tensor]:
        """(velocity of the next latents [B, C, c, h, w], velocity of the actions [B, H, A]).

        history: scaled latents [B, T_o, C, c, h, w]; proprio [B, T_o, P] and actions [B, H, A] normalised;
        tau_frames, tau_action: [B] flow times of the two streams (equal when they are not decoupled).
        """
        self._check(history, proprio, noisy_next, noisy_action, tau_frames, tau_action)
        b, cams, d = history.shape[0], self.n_cameras, self.cfg.hidden_dim
        stacked = torch.cat([history.transpose(1, 2).flatten(2, 3), noisy_next], dim=2)  # [B, C, (T_o + 1) c, h, w]
        frames = self.frame_tokenizer(stacked.flatten(0, 1)).view(b, cams, -1, d) + self.camera_embed[None, :, None]
        prop = self.proprio_in(proprio) + self.frame_embed
        act = self.action_in(noisy_action) + self.step_embed
        te = self.type_embed
        x = torch.cat([frames.flatten(1, 2) + te[0], prop + te[1], act + te[2]], dim=1)
        cond = self.frame_tau(tau_frames) + self.action_tau(tau_action)
        for block in self.blocks:
            if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, use_reentrant=False)
            else:
                x = block(x, cond)
        n_frame_tokens = frames.shape[1] * frames.shape[2]
        v_next = self.unpatchify(self.frame_head(x[:, :n_frame_tokens], cond))
        return v_next, self.action_head(x[:, -self.horizon:], cond)


# ---------------------------------------------------------------------------------------------- policy
class UVAPolicy(FMPolicy):
    """The frozen VAE (FM's stage and hooks) + the joint video-action transformer; joint Euler sampling.

    It inherits FM's VAE pieces (the "vae" stage, its loss, latent-scale calibration, latent encoding and
    decoding) but not FM's U-Net policy network, which is why `__init__` skips `FMPolicy.__init__`.
    """

    method = "uva"
    config_class = UVAConfig
    capabilities = Capabilities(predicts_next_obs=True, modes=(), has_trace=True)

    def __init__(self, config: UVAConfig, spec: EnvSpec) -> None:
        Policy.__init__(self, config, spec)  # FMPolicy.__init__ would build its U-Net policy network
        down, p = config.vae.downsample_factor, config.transformer.patch_size
        if spec.image_size % (down * p):
            raise ValueError(f"image_size {spec.image_size} must be divisible by {down * p} "
                             f"(VAE down-sampling x{down}, then {p}x{p} latent patches)")
        self.latent_channels = config.vae.latent_channels
        self.latent_size = spec.image_size // down
        self.vae = VAE(config.vae)
        self.model = JointVideoActionTransformer(config.transformer, len(spec.cameras), config.n_obs_steps,
                                                 self.latent_channels, self.latent_size, spec.action_dim,
                                                 config.horizon, spec.proprio_dim)

    @property
    def uses_vae(self) -> bool:
        return True

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return (self._vae_stage(), StageSpec("policy", sources=("expert",), success_only=True, inputs=("latents",)))

    def stage_module(self, stage: str) -> nn.Module:
        self.stage_spec(stage)
        return self.vae if stage == "vae" else self.model

    # ------------------------------------------------------------------ loss (FM's compute_loss dispatches here)
    def _policy_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        history = require(batch, "latents", 6)
        next_latents = require(batch, "next_latents", 5)
        proprio = self.proprio_normalizer.normalize(require(batch, "proprio", 3))
        action = self.action_normalizer.normalize(require(batch, "action", 3))
        b, dev = action.shape[0], action.device
        tau_action = sample_tau(b, self.config.flow, device=dev)
        tau_frames = sample_tau(b, self.config.flow, device=dev) if self.config.decouple_tau else tau_action
        z_tau, z_target = training_pair(next_latents, tau_frames)
        a_tau, a_target = training_pair(action, tau_action)
        v_next, v_action = self.model(history, proprio, z_tau, a_tau, tau_frames, tau_action)
        action_loss, frame_loss = flow_loss(v_action, a_target), flow_loss(v_next, z_target)
        return {"loss": action_loss + self.config.frame_loss_weight * frame_loss, "action_loss": action_loss.detach(),
                "frame_loss": frame_loss.detach()}

    # ------------------------------------------------------------------ inference
    def _predict(self, batch: dict[str, Tensor], return_next: bool, mode: str | None, steps: int | None,
                 return_trace: bool, generator: torch.Generator | None) -> ChunkPrediction:
        steps = steps or self.config.flow.steps
        history = self.encode_latents(batch["images"])
        proprio = self.proprio_normalizer.normalize(batch["proprio"])
        b, dev = proprio.shape[0], self.device
        z = torch.randn((b, len(self.spec.cameras), self.latent_channels, self.latent_size, self.latent_size),
                        generator=generator, device=dev)
        a = torch.randn((b, self.config.horizon, self.spec.action_dim), generator=generator, device=dev)
        trace = CouplingTrace() if return_trace else None
        for tau in time_grid(steps):  # one shared flow time: frames and actions leave the noise together
            t = torch.full((b,), tau, device=dev)
            v_next, v_action = self.model(history, proprio, z, a, t, t)
            if trace is not None:
                trace.record(tau, extrapolate(z, v_next, tau), extrapolate(a, v_action, tau))
            z, a = euler_step(z, v_next, 1.0 / steps), euler_step(a, v_action, 1.0 / steps)
        next_frames = self.decode_latents(z).cpu().numpy() if return_next else None
        return ChunkPrediction(self.action_normalizer.unnormalize(a).cpu().numpy(), next_frames,
                               trace.as_dict() if trace is not None else None)


def _method() -> Method:
    from dapolicy.policies.registry import Method

    return Method("uva", "stand-in for UVA (Li et al. 2025): one transformer denoises the next frame's VAE latents "
                  "and the action chunk jointly; no MAR backbone/per-token diffusion heads, multi-frame video, masked "
                  "multi-mode training or pretraining", UVAConfig, UVAPolicy, UVA_CONFIGS, stand_in=True)


METHOD = _method()
