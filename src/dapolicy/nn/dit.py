"""Latent DiT backbone of the action-conditioned dynamics model f(o_t, a_t) -> o_{t+k} (DESIGN §1.3).

The network predicts the flow velocity of the next latents of all cameras, given
  - the noisy next latents Z_tau [B, C, c, h, w] and the flow time tau [B];
  - the clean current latents Z_t of the same cameras, concatenated channel-wise to the noisy ones before
    patchifying, so every token sees "where this patch is now" next to "where it is going";
  - the action chunk [B, H, A] and the proprioception [B, P] as cross-attention context.

Why this split of conditioning: tau is one scalar per sample and modulates every layer globally (adaLN-Zero,
as in DiT); the action chunk is a sequence whose steps matter for different regions of the image, so tokens
attend to it (cross-attention, one token per action step). Joint self-attention over all cameras' tokens lets
the views agree on one scene. A learned null-action sequence replaces the action where it is dropped, which
gives the action-agnostic mode used at the first coupled step of inference (DESIGN §1.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dapolicy.nn.attention import KV, CrossAttention, SelfAttention, TimestepEmbedding, fused_kv_weights, split_fused_kv


@dataclass
class DiTConfig:
    """Size of the latent dynamics transformer.

    hidden_dim: token width D (divisible by heads and by 4 for the 2-D sin-cos position embedding).
    depth: number of transformer blocks.
    heads: attention heads (self- and cross-attention).
    patch_size: p; each token covers p x p latent pixels of one camera (latent size must be divisible by p).
    mlp_ratio: hidden width of the block MLP relative to D.
    action_token_mlp_hidden: hidden width of the MLPs that embed one action step / the proprioception into a
        context token; None means D.
    dropout: dropout on the residual branches (0 as in DiT).
    learned_pos_embed: learn the 2-D position embedding instead of the fixed sin-cos one.
    grad_checkpoint: recompute block activations in the backward pass (memory for paper-scale training).
    """

    hidden_dim: int = 256
    depth: int = 4
    heads: int = 4
    patch_size: int = 2
    mlp_ratio: float = 4.0
    action_token_mlp_hidden: int | None = None
    dropout: float = 0.0
    learned_pos_embed: bool = False
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim < 4 or self.depth < 1 or self.heads < 1 or self.patch_size < 1:
            raise ValueError("hidden_dim >= 4, depth >= 1, heads >= 1 and patch_size >= 1 are required")
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by heads {self.heads}")
        if self.hidden_dim % 4:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by 4 (2-D position embedding)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.action_token_mlp_hidden is not None and self.action_token_mlp_hidden < 1:
            raise ValueError("action_token_mlp_hidden must be >= 1 or None")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def sincos_2d_embedding(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [grid_h * grid_w, dim] (half the channels per axis, row-major)."""

    def axis(pos: Tensor, d: int) -> Tensor:
        freqs = 1.0 / 10_000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        args = pos.double()[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([axis(ys.reshape(-1), dim // 2), axis(xs.reshape(-1), dim // 2)], dim=1)
    return emb.float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine of normalised tokens; x [B, N, D], shift/scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN -> self-attention -> (pre-LN) cross-attention to the action/proprio tokens -> adaLN -> MLP.

    Self-attention and MLP branches are scaled by zero-initialised adaLN gates, the cross-attention output
    projection is zero-initialised (as in PixArt-alpha): at initialisation the block is the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor, context: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.drop(self.cross(self.norm_cross(x), context=context))
        x = x + gate2[:, None] * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x

    def ada_params(self, cond: Tensor) -> tuple[Tensor, ...]:
        """(shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2), each [N, 1, D]: the block's whole dependence
        on tau, precomputable for every flow time of a sampling call."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (t[:, None] for t in self.ada(cond).chunk(6, dim=-1))
        return shift1, 1.0 + scale1, gate1, shift2, 1.0 + scale2, gate2

    def forward_prepared(self, x: Tensor, ada: tuple[Tensor, ...], kv: KV) -> Tensor:
        """Inference `forward` (eval mode, no dropout) with precomputed `ada_params` and cross-attention kv."""
        shift1, scale1, gate1, shift2, scale2, gate2 = ada
        x = torch.addcmul(x, gate1, self.attn(torch.addcmul(shift1, self.norm1(x), scale1)))
        x = x + self.cross(self.norm_cross(x), kv=[kv])
        return torch.addcmul(x, gate2, self.mlp(torch.addcmul(shift2, self.norm2(x), scale2)))


class FinalLayer(nn.Module):
    """adaLN then a zero-initialised linear to the per-token patch of velocities."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LatentDynamicsDiT(nn.Module):
    """Velocity field of the next latents of all cameras, conditioned on tau, current latents, action, proprio.

    Args:
        cfg: transformer size.
        n_cameras: C, number of cameras (their tokens attend to each other jointly).
        latent_channels: c, channels of one camera's latent.
        latent_size: h (= w) or (h, w) of one camera's latent; divisible by cfg.patch_size.
        action_dim: A. horizon: H, length of the action chunk (one context token per step).
        proprio_dim: P; 0 means no proprioception token.
    """

    def __init__(
        self,
        cfg: DiTConfig,
        n_cameras: int,
        latent_channels: int,
        latent_size: int | tuple[int, int],
        action_dim: int,
        horizon: int,
        proprio_dim: int,
    ) -> None:
        super().__init__()
        h, w = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        p = cfg.patch_size
        if min(n_cameras, latent_channels, action_dim, horizon) < 1 or proprio_dim < 0:
            raise ValueError("n_cameras, latent_channels, action_dim and horizon must be >= 1, proprio_dim >= 0")
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
        self.cfg = cfg
        self.n_cameras, self.latent_channels, self.latent_hw = n_cameras, latent_channels, (h, w)
        self.action_dim, self.horizon, self.proprio_dim = action_dim, horizon, proprio_dim
        self.grid = (h // p, w // p)
        d = cfg.hidden_dim

        # Observation tokens: [noisy next ; clean current] patch -> D, plus camera and position embeddings.
        self.patch_embed = nn.Linear(2 * latent_channels * p * p, d)
        self.camera_embed = nn.Parameter(torch.zeros(n_cameras, 1, d))
        pos = sincos_2d_embedding(d, *self.grid)
        if cfg.learned_pos_embed:
            self.pos_embed = nn.Parameter(pos.clone())
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.tau_embed = TimestepEmbedding(d)

        # Context tokens: one per action step (+ temporal embedding), one for proprioception.
        ctx_hidden = cfg.action_token_mlp_hidden or d
        self.action_mlp = nn.Sequential(nn.Linear(action_dim, ctx_hidden), nn.SiLU(), nn.Linear(ctx_hidden, d))
        self.action_time_embed = nn.Parameter(torch.zeros(horizon, d))
        self.null_action = nn.Parameter(torch.zeros(horizon, d))
        self.proprio_mlp = (
            nn.Sequential(nn.Linear(proprio_dim, ctx_hidden), nn.SiLU(), nn.Linear(ctx_hidden, d))
            if proprio_dim
            else None
        )
        self.context_norm = nn.LayerNorm(d)

        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.final = FinalLayer(d, latent_channels * p * p)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier linears, small embeddings, zero adaLN / cross-out / final (identity start)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for param in (self.camera_embed, self.action_time_embed, self.null_action):
            nn.init.normal_(param, std=0.02)
        for lin in (self.tau_embed.mlp[0], self.tau_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero: list[nn.Linear] = [self.final.ada[1], self.final.linear]
        for block in self.blocks:
            zero += [block.ada[1], block.cross.out]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---------------------------------------------------------------- tokens
    def patchify(self, noisy_next: Tensor, current: Tensor) -> Tensor:
        """[B, C, c, h, w] x 2 -> tokens [B, C * N, 2c * p * p], camera-major, row-major patches."""
        x = torch.cat([noisy_next, current], dim=2)
        b, cams, ch, h, w = x.shape
        p = self.cfg.patch_size
        x = x.view(b, cams, ch, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, cams * (h // p) * (w // p), ch * p * p)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, C * N, c * p * p] -> [B, C, c, h, w] (inverse of `patchify` for the c output channels)."""
        b = tokens.shape[0]
        p, (gh, gw), c = self.cfg.patch_size, self.grid, self.latent_channels
        x = tokens.reshape(b, self.n_cameras, gh, gw, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.n_cameras, c, gh * p, gw * p)

    def context(
        self, action: Tensor | None, proprio: Tensor | None, drop_action: Tensor | None, batch: int
    ) -> Tensor:
        """Cross-attention context [B, H (+1), D]: action-step tokens (or the null sequence) + proprio token."""
        null = self.null_action.unsqueeze(0).expand(batch, -1, -1)
        if action is None:
            tokens = null
        else:
            tokens = self.action_mlp(action) + self.action_time_embed
            if drop_action is not None:
                tokens = torch.where(drop_action.view(batch, 1, 1), null.to(tokens.dtype), tokens)
        if self.proprio_mlp is not None:
            tokens = torch.cat([tokens, self.proprio_mlp(proprio).unsqueeze(1)], dim=1)
        return self.context_norm(tokens)

    def _check_inputs(
        self, noisy_next: Tensor, tau: Tensor, current: Tensor, action: Tensor | None, proprio: Tensor | None,
        drop_action: Tensor | None,
    ) -> Tensor:
        want = (self.n_cameras, self.latent_channels, *self.latent_hw)
        if noisy_next.dim() != 5 or tuple(noisy_next.shape[1:]) != want:
            shape = ", ".join(map(str, want))
            raise ValueError(f"noisy_next must be [B, {shape}], got {tuple(noisy_next.shape)}")
        b = noisy_next.shape[0]
        if current.shape != noisy_next.shape:
            raise ValueError(
                f"current must have the shape of noisy_next {tuple(noisy_next.shape)}, got {tuple(current.shape)}"
            )
        if tau.dim() == 0:
            tau = tau.expand(b)
        if tau.shape != (b,):
            raise ValueError(f"tau must be [B={b}] or a scalar, got {tuple(tau.shape)}")
        if action is not None and tuple(action.shape) != (b, self.horizon, self.action_dim):
            raise ValueError(f"action must be [{b}, {self.horizon}, {self.action_dim}], got {tuple(action.shape)}")
        if self.proprio_dim and (proprio is None or tuple(proprio.shape) != (b, self.proprio_dim)):
            got = None if proprio is None else tuple(proprio.shape)
            raise ValueError(f"proprio must be [{b}, {self.proprio_dim}], got {got}")
        if drop_action is not None and (drop_action.dtype != torch.bool or tuple(drop_action.shape) != (b,)):
            raise ValueError(
                f"drop_action must be a bool tensor [{b}], got {drop_action.dtype} {tuple(drop_action.shape)}"
            )
        return tau

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        noisy_next: Tensor,
        tau: Tensor,
        current: Tensor,
        action: Tensor | None,
        proprio: Tensor | None,
        drop_action: Tensor | None = None,
    ) -> Tensor:
        """Velocity [B, C, c, h, w] of the next latents.

        noisy_next, current: [B, C, c, h, w] (scaled latents); tau: [B] (or a scalar) in [0, 1];
        action: [B, H, A] normalised, or None for the action-agnostic mode (null tokens for every sample);
        proprio: [B, P] (None only when proprio_dim == 0); drop_action: bool [B], True -> null tokens for that
        sample (condition dropout in training).
        """
        tau = self._check_inputs(noisy_next, tau, current, action, proprio, drop_action)
        b = noisy_next.shape[0]
        x = self.patch_embed(self.patchify(noisy_next, current))
        x = x + (self.camera_embed + self.pos_embed).reshape(-1, x.shape[-1])  # [C * N, D], camera-major
        cond = self.tau_embed(tau.to(x.dtype)).to(x.dtype)
        ctx = self.context(action, proprio, drop_action, b)
        for block in self.blocks:
            if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, ctx, use_reentrant=False)
            else:
                x = block(x, cond, ctx)
        return self.unpatchify(self.final(x, cond))

    # ---------------------------------------------------------------- fast inference
    def _patches(self, latents: Tensor) -> Tensor:
        """[B, C, c, h, w] -> [B, C * N, c * p * p], the per-input half of `patchify`'s feature layout."""
        b, cams, ch, h, w = latents.shape
        p = self.cfg.patch_size
        x = latents.reshape(b, cams, ch, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, cams * (h // p) * (w // p), ch * p * p)

    def inference_constants(self, taus: Tensor) -> "DiTConstants":
        """What `prepare_inference` needs that depends on the weights and the K flow times `taus` alone.

        adaLN depends only on tau, so the tau embedding and every block's adaLN projection are tabulated for
        the K known flow times; the null-action tokens' keys/values are constant. Cacheable while the weights
        do not change (the fast sampler keys its cache on them).
        """
        noisy_dim = self.latent_channels * self.cfg.patch_size ** 2
        cond = self.tau_embed(taus.to(self.patch_embed.weight.dtype))  # [K, D]
        blocks = [[t.unbind(0) for t in blk.ada_params(cond)] for blk in self.blocks]  # per flow time [1, D]
        f_shift, f_scale = (t[:, None] for t in self.final.ada(cond).chunk(2, dim=-1))
        final = (f_shift.unbind(0), (1.0 + f_scale).unbind(0))
        steps = [(tuple(tuple(t[k] for t in ada) for ada in blocks), (final[0][k], final[1][k]))
                 for k in range(taus.shape[0])]
        kv_weight, kv_bias = fused_kv_weights([blk.cross for blk in self.blocks])
        null_action_kv = F.linear(self.context_norm(self.null_action[None]), kv_weight, kv_bias)  # [1, H, *]
        return DiTConstants(self.patch_embed.weight[:, :noisy_dim], steps, kv_weight, kv_bias, null_action_kv)

    def prepare_inference(self, current: Tensor, proprio: Tensor | None, taus: Tensor,
                          constants: "DiTConstants | None" = None) -> "DiTPrepared":
        """Everything of a sampling call that does not depend on the flow state, computed once.

        Besides `inference_constants` (pass them to reuse them): the patch embedding is linear, so the clean
        current latents' half of it (plus the camera and position embeddings) is a per-call constant, and so
        are the proprio token's keys/values and with them the whole null-action context's.
        Inference only (eval mode); results equal `forward` up to float rounding.
        """
        c = constants if constants is not None else self.inference_constants(taus)
        noisy_dim = c.noisy_weight.shape[1]
        b = current.shape[0]
        x_current = F.linear(self._patches(current), self.patch_embed.weight[:, noisy_dim:], self.patch_embed.bias)
        x_current = x_current + (self.camera_embed + self.pos_embed).reshape(-1, x_current.shape[-1])
        null = c.null_action_kv.expand(b, -1, -1)
        proprio_kv = None
        if self.proprio_mlp is not None:
            proprio_kv = F.linear(self.context_norm(self.proprio_mlp(proprio).unsqueeze(1)), c.kv_weight, c.kv_bias)
            null = torch.cat([null, proprio_kv], dim=1)
        layers = [blk.cross for blk in self.blocks]
        null_kv = [(k.contiguous(), v.contiguous()) for k, v in split_fused_kv(null, layers)]
        return DiTPrepared(c.noisy_weight, x_current, c.steps, c.kv_weight, c.kv_bias, proprio_kv, null_kv)

    def forward_prepared(self, noisy_next: Tensor, prep: "DiTPrepared", step: int, action: Tensor | None) -> Tensor:
        """Velocity of the next latents at flow step `step` of a prepared call; action None = action-agnostic.

        Same result as `forward(noisy_next, taus[step], current, action, proprio)` up to float rounding.
        """
        x = torch.addmm(prep.x_current.flatten(0, 1), self._patches(noisy_next).flatten(0, 1),
                        prep.noisy_weight.t()).view(prep.x_current.shape)
        layers = [blk.cross for blk in self.blocks]
        if action is None:
            kvs = prep.null_kv
        else:
            tokens = self.context_norm(self.action_mlp(action) + self.action_time_embed)
            projected = F.linear(tokens, prep.kv_weight, prep.kv_bias)
            if prep.proprio_kv is not None:
                projected = torch.cat([projected, prep.proprio_kv], dim=1)
            kvs = split_fused_kv(projected, layers)
        ada, (shift, scale) = prep.steps[step]
        for block, block_ada, kv in zip(self.blocks, ada, kvs):
            x = block.forward_prepared(x, block_ada, kv)
        return self.unpatchify(self.final.linear(torch.addcmul(shift, self.final.norm(x), scale)))


@dataclass
class DiTConstants:
    """Weight-only inference tables (see `LatentDynamicsDiT.inference_constants`); fields as in `DiTPrepared`,
    plus null_action_kv: the normalised null-action tokens projected for every block [1, H, depth * 2D]."""

    noisy_weight: Tensor
    steps: list[tuple[tuple[tuple[Tensor, ...], ...], tuple[Tensor, Tensor]]]
    kv_weight: Tensor
    kv_bias: Tensor
    null_action_kv: Tensor


@dataclass
class DiTPrepared:
    """Per-call constants of `LatentDynamicsDiT.forward_prepared` (see `prepare_inference`).

    noisy_weight: the noisy-latent columns of the patch embedding. x_current: [B, C * N, D] the rest of the
    token embedding. steps[k]: (per-block `ada_params`, final (shift, 1 + scale)) at flow time k.
    kv_weight/kv_bias: all blocks' cross-attention key/value projections fused. proprio_kv: the projected
    proprio token [B, 1, depth * 2D] or None. null_kv: per block (k, v) of the null-action context.
    """

    noisy_weight: Tensor
    x_current: Tensor
    steps: list[tuple[tuple[tuple[Tensor, ...], ...], tuple[Tensor, Tensor]]]
    kv_weight: Tensor
    kv_bias: Tensor
    proprio_kv: Tensor | None
    null_kv: list[KV]


__all__ = ["DiTConfig", "DiTBlock", "DiTConstants", "DiTPrepared", "LatentDynamicsDiT", "sincos_2d_embedding"]
