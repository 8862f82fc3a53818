"""Temporal 1-D conv U-Net over the action chunk, with cross-attention to observation tokens (DESIGN §1.4).

The backbone follows Diffusion Policy's `ConditionalUnet1D` (residual Conv1d-GroupNorm-Mish blocks, FiLM on
the flow time tau, strided-conv down-sampling, transposed-conv up-sampling with skip connections). What DAP
adds is that observations enter through **cross-attention at every resolution** instead of FiLM, and that
the context is split in two groups with different update rates:

* *static* tokens (the current observation) are fixed for the whole flow sampling loop: their keys/values
  for every attention layer are projected once by `prepare_context` and reused at every step;
* *dynamic* tokens (the dynamics model's extrapolated next-observation estimate) change at every flow step
  and are projected on each `forward` call.

Attending to ``concat(static_kv, dynamic_kv)`` is exactly the same computation as attending to the
concatenated tokens, so the cache changes cost, never results.

For the Diffusion-Policy CNN baseline the same module works without attention (`cross_attention=False`),
conditioned by FiLM on ``[tau embedding, global_cond]``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapolicy.nn.attention import KV, CrossAttention, TimestepEmbedding

__all__ = ["UNet1DConfig", "ContextCache", "CrossAttnUNet1D", "TracedInference", "FiLM"]

FiLM = tuple[Tensor, Tensor]  # (1 + scale, bias) of one residual block, each [N, C, 1]


@dataclass
class UNet1DConfig:
    """Hyper-parameters of the U-Net.

    down_dims: channels of each resolution level; the chunk is halved between consecutive levels, so the
        horizon H must be divisible by ``2 ** (len(down_dims) - 1)``.
    kernel_size: temporal kernel of the residual convs (odd, so "same" padding keeps the length).
    n_groups: GroupNorm groups in the conv blocks; must divide every entry of down_dims.
    tau_embed_dim: width of the sinusoidal+MLP embedding of tau that drives FiLM.
    attn_heads: heads of the cross-attention layers; must divide every entry of down_dims.
    cross_attention: False drops the attention layers (a plain FiLM U-Net, for the DP-C baseline).
    gated_dynamic_context: the dynamic group (DAP's next-observation tokens) gets its own attention softmax,
        added to the static group's through a learned tanh gate per layer that starts at 0. The network then
        starts as the plain policy, the current observation's attention is never diluted by the prediction's
        tokens, and the prediction is used only as far as training finds it pays. False: one softmax over
        the concatenation of both groups.
    dynamic_gate_init: the gates' starting value: the dynamic group enters with weight tanh(dynamic_gate_init).
        0 = the network starts as the plain policy and training has to open the gates; 2 = they start open
        (tanh 2 = 0.96), the prediction is used from the first step, and training has to close them if it does
        not pay. Only with gated_dynamic_context.
    dynamic_gate_scale: each gate's weight is tanh(scale * g) for its parameter g. Adam moves a parameter by
        about the learning rate per step whatever its gradient, so at scale 1 a gate travels at most ~0.3 in a
        2,000-step run at the policy's schedule, too little to open or close far; scale s lets it travel s
        times as far (a learning-rate multiplier for the gates alone). Only with gated_dynamic_context.
    """

    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    tau_embed_dim: int = 128
    attn_heads: int = 4
    cross_attention: bool = True
    gated_dynamic_context: bool = False
    dynamic_gate_init: float = 0.0
    dynamic_gate_scale: float = 1.0

    def __post_init__(self) -> None:
        self.down_dims = tuple(int(d) for d in self.down_dims)
        if not self.down_dims or any(d <= 0 for d in self.down_dims):
            raise ValueError(f"down_dims must be a non-empty tuple of positive ints, got {self.down_dims}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size}")
        if not math.isfinite(self.dynamic_gate_init):
            raise ValueError(f"dynamic_gate_init must be a finite number, got {self.dynamic_gate_init}")
        if self.dynamic_gate_init != 0.0 and not self.gated_dynamic_context:
            raise ValueError("dynamic_gate_init needs gated_dynamic_context=true (there is no gate without it)")
        if not (math.isfinite(self.dynamic_gate_scale) and self.dynamic_gate_scale > 0):
            raise ValueError(f"dynamic_gate_scale must be a positive number, got {self.dynamic_gate_scale}")
        if self.dynamic_gate_scale != 1.0 and not self.gated_dynamic_context:
            raise ValueError("dynamic_gate_scale needs gated_dynamic_context=true (there is no gate without it)")
        if self.tau_embed_dim <= 0:
            raise ValueError(f"tau_embed_dim must be positive, got {self.tau_embed_dim}")
        for d in self.down_dims:
            if d % self.n_groups:
                raise ValueError(f"n_groups {self.n_groups} must divide every down_dim, not {d}")
            if self.cross_attention and d % self.attn_heads:
                raise ValueError(f"attn_heads {self.attn_heads} must divide every down_dim, not {d}")

    @property
    def horizon_multiple(self) -> int:
        """The chunk length must be a multiple of this (one halving between consecutive levels)."""
        return 2 ** (len(self.down_dims) - 1)


@dataclass(frozen=True)
class ContextCache:
    """Keys/values of one token group, projected for every cross-attention layer of a `CrossAttnUNet1D`.

    kv[i] belongs to `model.context_layers()[i]`; each is ([B, heads, M, d], [B, heads, M, d]).
    A cache with batch 1 is broadcast to any batch size in `forward`.
    """

    kv: tuple[KV, ...]

    @property
    def batch_size(self) -> int:
        return self.kv[0][0].shape[0] if self.kv else 0

    @property
    def num_tokens(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0


def _cpu_inference(x: Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


class Conv1d(nn.Conv1d):
    """nn.Conv1d (same parameters and state dict) with a faster CPU inference path.

    At batch 1 and short horizons torch's CPU conv1d falls back to a slow im2col kernel that is 2-4x slower
    than one GEMM on the unfolded input (measured for 256-512 channels), which dominates policy latency.
    Training (grad enabled) and non-CPU devices use the stock kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not _cpu_inference(x) or self.groups != 1 or self.dilation != (1,) or self.padding_mode != "zeros":
            return super().forward(x)
        (k,), (stride,), (pad,) = self.kernel_size, self.stride, self.padding
        cols = F.pad(x, (pad, pad)).unfold(2, k, stride)  # [B, C, L, k]
        b, c, length, _ = cols.shape
        tokens = cols.permute(0, 2, 1, 3).reshape(b * length, c * k)
        y = F.linear(tokens, self.weight.view(self.out_channels, c * k), self.bias)
        return y.view(b, length, self.out_channels).transpose(1, 2)


class Upsample1d(nn.ConvTranspose1d):
    """ConvTranspose1d(kernel 4, stride 2, padding 1): doubles the length (as in Diffusion Policy).

    Fast CPU inference path: output 2m reads inputs (m-1, m) with taps (3, 1) and output 2m+1 reads (m, m+1)
    with taps (2, 0), so both come from one GEMM over 2-wide windows of the input padded by one. The
    rearranged weight is cached and rebuilt whenever the parameter changes (its version counter).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, 4, stride=2, padding=1)
        self._fast_weight: tuple[tuple | None, Tensor] | None = None

    def _gemm_weight(self) -> Tensor:
        w = self.weight  # [C_in, C_out, 4]
        # inference tensors (built under inference_mode) have no version counter: never cached then
        key = None if w.is_inference() else (id(w), w.data_ptr(), w._version, w.device, w.dtype)
        if key is None or self._fast_weight is None or self._fast_weight[0] != key:
            with torch.no_grad():
                even = torch.stack([w[:, :, 3], w[:, :, 1]], dim=-1)  # taps on (m-1, m)
                odd = torch.stack([w[:, :, 2], w[:, :, 0]], dim=-1)  # taps on (m, m+1)
                both = torch.stack([even, odd], dim=0)  # [2, C_in, C_out, 2]
                gemm = both.permute(0, 2, 1, 3).reshape(2 * w.shape[1], 2 * w.shape[0]).contiguous()
            self._fast_weight = (key, gemm)
        return self._fast_weight[1]

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not _cpu_inference(x) or output_size is not None:
            return super().forward(x, output_size)
        b, c, length = x.shape
        out = self.out_channels
        cols = F.pad(x, (1, 1)).unfold(2, 2, 1)  # [B, C, L+1, 2], window j = (x[j-1], x[j])
        tokens = cols.permute(0, 2, 1, 3).reshape(b * (length + 1), c * 2)
        y = F.linear(tokens, self._gemm_weight()).view(b, length + 1, 2, out)
        y = torch.stack([y[:, :-1, 0], y[:, 1:, 1]], dim=2)  # even from windows 0..L-1, odd from 1..L
        y = y.reshape(b, 2 * length, out)
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class FiLMResBlock1D(nn.Module):
    """Two conv blocks; the conditioning vector modulates the first one's output by (1 + scale) and bias.

    (1 + scale) rather than Diffusion Policy's bare scale keeps the block close to identity-scaled at
    initialisation, so a freshly initialised network does not multiply its features by ~0.
    `cond` is expected already passed through Mish (Diffusion Policy's cond encoder is Mish -> Linear);
    the network applies it once per forward instead of once per block.
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.conv1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Linear(cond_dim, 2 * out_ch)
        self.skip = Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def film_params(self, cond: Tensor) -> FiLM:
        """(1 + scale, bias), each [N, C, 1]: the block's whole dependence on the conditioning vector, so a
        sampler can compute it once for every flow time of a call (see `CrossAttnUNet1D.prepare_films`)."""
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        return 1.0 + scale, bias

    def forward(self, x: Tensor, cond: Tensor | None = None, film: FiLM | None = None) -> Tensor:
        if film is None:
            scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
            h = self.conv1(x) * (1.0 + scale) + bias
        else:  # precomputed (1 + scale, bias): one fused multiply-add
            h = torch.addcmul(film[1], self.conv1(x), film[0])
        return self.conv2(h) + self.skip(x)


class CrossAttnBlock1D(nn.Module):
    """Pre-norm residual cross-attention: the H time positions are the queries, context tokens the keys.

    gated: the first key/value group (the static context) and the rest (the dynamic group) are attended in
    separate softmaxes; the second result enters with weight tanh(gate_scale * gate), which starts at
    tanh(gate_init).
    """

    def __init__(self, channels: int, context_dim: int, heads: int, gated: bool = False,
                 gate_init: float = 0.0, gate_scale: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = CrossAttention(channels, context_dim, heads)
        self.gate_scale = float(gate_scale)
        self.gate = nn.Parameter(torch.full((1,), float(gate_init) / self.gate_scale)) if gated else None

    def gate_weight(self) -> Tensor:
        """The weight of the dynamic group's attention, tanh(gate_scale * gate) (gated blocks only)."""
        return torch.tanh(self.gate * self.gate_scale)

    def forward(self, x: Tensor, kv: list[KV]) -> Tensor:
        tokens = self.norm(x.transpose(1, 2))  # [B, H, C]
        if self.gate is None or len(kv) < 2:
            return x + self.attn(tokens, kv=kv).transpose(1, 2)
        out = self.attn(tokens, kv=kv[:1]) + self.gate_weight() * self.attn(tokens, kv=kv[1:])
        return x + out.transpose(1, 2)


def _attention_block(channels: int, context_dim: int, cfg: UNet1DConfig) -> CrossAttnBlock1D | None:
    if not cfg.cross_attention:
        return None
    return CrossAttnBlock1D(channels, context_dim, cfg.attn_heads, cfg.gated_dynamic_context, cfg.dynamic_gate_init,
                            cfg.dynamic_gate_scale)


class _DownLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, cfg: UNet1DConfig, ctx: int, last: bool) -> None:
        super().__init__()
        self.res1 = FiLMResBlock1D(in_ch, out_ch, cond_dim, cfg.kernel_size, cfg.n_groups)
        self.res2 = FiLMResBlock1D(out_ch, out_ch, cond_dim, cfg.kernel_size, cfg.n_groups)
        self.attn = _attention_block(out_ch, ctx, cfg)
        self.down = nn.Identity() if last else Conv1d(out_ch, out_ch, 3, stride=2, padding=1)


class _UpLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, cfg: UNet1DConfig, ctx: int) -> None:
        super().__init__()
        self.up = Upsample1d(in_ch, out_ch)
        self.res1 = FiLMResBlock1D(2 * out_ch, out_ch, cond_dim, cfg.kernel_size, cfg.n_groups)
        self.res2 = FiLMResBlock1D(out_ch, out_ch, cond_dim, cfg.kernel_size, cfg.n_groups)
        self.attn = _attention_block(out_ch, ctx, cfg)


class CrossAttnUNet1D(nn.Module):
    """Velocity field v(x_tau, tau | context) over an action chunk x [B, H, A].

    Layout with down_dims (d0, d1, d2):
        down0 (d0, H) -> down1 (d1, H/2) -> down2 (d2, H/4) -> mid (d2, H/4) -> up1 (d1, H/2) -> up0 (d0, H)
    Every level is [res, res, cross-attn]; the mid is [res, cross-attn, res]. Skips connect down_i to up_i.
    Context tokens are LayerNormed once (a per-token op, so static and dynamic groups can be normalised
    and projected separately) and then projected to keys/values per attention layer.
    """

    def __init__(
        self, cfg: UNet1DConfig, action_dim: int, context_dim: int, global_cond_dim: int = 0
    ) -> None:
        super().__init__()
        if action_dim <= 0:
            raise ValueError(f"action_dim must be positive, got {action_dim}")
        if cfg.cross_attention and context_dim <= 0:
            raise ValueError(f"context_dim must be positive when cross_attention is on, got {context_dim}")
        if global_cond_dim < 0:
            raise ValueError(f"global_cond_dim must be >= 0, got {global_cond_dim}")
        self.cfg = cfg
        self.action_dim = action_dim
        self.context_dim = context_dim
        self.global_cond_dim = global_cond_dim
        dims = cfg.down_dims
        cond_dim = cfg.tau_embed_dim + global_cond_dim

        self.tau_embed = TimestepEmbedding(cfg.tau_embed_dim)
        self.context_norm = nn.LayerNorm(context_dim) if cfg.cross_attention else None
        ins = (action_dim,) + dims[:-1]
        self.downs = nn.ModuleList(
            _DownLevel(i, o, cond_dim, cfg, context_dim, last=(n == len(dims) - 1))
            for n, (i, o) in enumerate(zip(ins, dims))
        )
        mid = dims[-1]
        self.mid1 = FiLMResBlock1D(mid, mid, cond_dim, cfg.kernel_size, cfg.n_groups)
        self.mid_attn = _attention_block(mid, context_dim, cfg)
        self.mid2 = FiLMResBlock1D(mid, mid, cond_dim, cfg.kernel_size, cfg.n_groups)
        # ups[j] goes from level j+1 to level j; applied deepest first.
        self.ups = nn.ModuleList(
            _UpLevel(dims[j + 1], dims[j], cond_dim, cfg, context_dim) for j in range(len(dims) - 1)
        )
        self.final = nn.Sequential(
            Conv1dBlock(dims[0], dims[0], cfg.kernel_size, cfg.n_groups), Conv1d(dims[0], action_dim, 1)
        )
        self._attn_layers: list[CrossAttention] = self._collect_attention()

    # ----------------------------------------------------------------------------------------- context
    def _attention_blocks(self) -> list[CrossAttnBlock1D]:
        """The cross-attention blocks in execution order (down levels, mid, up levels deepest first)."""
        if not self.cfg.cross_attention:
            return []
        return [lvl.attn for lvl in self.downs] + [self.mid_attn] + [lvl.attn for lvl in reversed(self.ups)]

    def _collect_attention(self) -> list[CrossAttention]:
        return [b.attn for b in self._attention_blocks()]

    def prediction_gates(self) -> list[float]:
        """The gate weight tanh(scale * g) of every gated attention layer, in execution order: the weight each layer
        gives the dynamic group (DAP's prediction). Empty without `gated_dynamic_context`."""
        return [float(b.gate_weight().detach()) for b in self._attention_blocks() if b.gate is not None]

    def context_layers(self) -> list[CrossAttention]:
        """The cross-attention layers in the order of `ContextCache.kv` (execution order)."""
        return list(self._attn_layers)

    def prepare_context(self, tokens: Tensor) -> ContextCache:
        """Project context tokens [B, M, context_dim] to keys/values for every attention layer, once.

        Use for the tokens that stay fixed while sampling (current observation); the result can be passed
        as `static=` to every flow step. Also usable for any constant group (e.g. learned null tokens).
        """
        if not self.cfg.cross_attention:
            raise ValueError("this U-Net was built with cross_attention=False; it takes no context tokens")
        if tokens.dim() != 3 or tokens.shape[-1] != self.context_dim:
            raise ValueError(f"context tokens must be [B, M, {self.context_dim}], got {tuple(tokens.shape)}")
        normed = self.context_norm(tokens)
        return ContextCache(tuple(layer.kv(normed) for layer in self._attn_layers))

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        tau: Tensor | float,
        static: ContextCache | None = None,
        dynamic_tokens: Tensor | ContextCache | None = None,
        static_tokens: Tensor | None = None,
        global_cond: Tensor | None = None,
    ) -> Tensor:
        """Velocity [B, H, A] for the noisy chunk x [B, H, A] at flow time tau ([B], scalar or float).

        Context: `static` (a prepared cache) or `static_tokens` (projected on the fly, the training path),
        plus optional `dynamic_tokens` [B, M', context_dim] (or a cache of them); the layers attend to the
        concatenation of both groups. At least one group is required when cross-attention is on.
        `global_cond` [B, global_cond_dim] is FiLM conditioning concatenated to the tau embedding.
        """
        if x.dim() != 3 or x.shape[-1] != self.action_dim:
            raise ValueError(f"x must be [B, H, {self.action_dim}], got {tuple(x.shape)}")
        b, horizon, _ = x.shape
        if horizon == 0 or horizon % self.cfg.horizon_multiple:
            raise ValueError(
                f"horizon H={horizon} must be a positive multiple of {self.cfg.horizon_multiple} "
                f"(2 ** (len(down_dims) - 1) with down_dims={self.cfg.down_dims})"
            )
        cond = self._condition(tau, b, x, global_cond)
        kvs = self._gather_context(b, static, dynamic_tokens, static_tokens)
        return self._backbone(x, kvs, cond=cond)

    def _backbone(self, x: Tensor, kvs: list[list[KV]], cond: Tensor | None = None,
                  films: tuple[FiLM, ...] | list[FiLM] | None = None) -> Tensor:
        """The network body, conditioned either by `cond` or by precomputed per-block `films` (same order as
        `film_blocks`); one walk over the layers serves training and fast inference alike."""
        film_iter = iter(films) if films is not None else None

        def res(block: FiLMResBlock1D, h: Tensor) -> Tensor:
            return block(h, cond) if film_iter is None else block(h, film=next(film_iter))

        h = x.transpose(1, 2)  # [B, A, H]
        skips: list[Tensor] = []
        layer = 0
        for lvl in self.downs:
            h = res(lvl.res2, res(lvl.res1, h))
            if lvl.attn is not None:
                h = lvl.attn(h, kvs[layer])
                layer += 1
            skips.append(h)
            h = lvl.down(h)
        skips.pop()  # the deepest level's output is the mid's input; no skip needed there
        h = res(self.mid1, h)
        if self.mid_attn is not None:
            h = self.mid_attn(h, kvs[layer])
            layer += 1
        h = res(self.mid2, h)
        for lvl in reversed(self.ups):
            h = torch.cat([lvl.up(h), skips.pop()], dim=1)
            h = res(lvl.res2, res(lvl.res1, h))
            if lvl.attn is not None:
                h = lvl.attn(h, kvs[layer])
                layer += 1
        return self.final(h).transpose(1, 2)

    # ----------------------------------------------------------------------------------- fast inference
    def film_blocks(self) -> list[FiLMResBlock1D]:
        """The residual blocks in execution order (the order of `prepare_films` entries)."""
        blocks: list[FiLMResBlock1D] = []
        for lvl in self.downs:
            blocks += [lvl.res1, lvl.res2]
        blocks += [self.mid1, self.mid2]
        for lvl in reversed(self.ups):
            blocks += [lvl.res1, lvl.res2]
        return blocks

    def prepare_films(self, taus: Tensor, global_cond: Tensor | None = None) -> list[tuple[FiLM, ...]]:
        """Per flow time taus[k], every block's FiLM (1 + scale, bias) ([C, 1], or [B, C, 1] with global_cond).

        tau is the same for every sample of a sampling call, so the tau embedding and all FiLM projections
        of the K steps are computed here in one batched call per block instead of at every step.
        """
        k = taus.shape[0]
        if global_cond is None:
            cond = self._condition(taus, k, taus[:, None], None)  # [K, cond_dim]
            per_block = [[t.unbind(0) for t in blk.film_params(cond)] for blk in self.film_blocks()]  # [C, 1]
            return [tuple((s[i], b[i]) for s, b in per_block) for i in range(k)]
        b = global_cond.shape[0]
        return [tuple(blk.film_params(self._condition(tau, b, global_cond, global_cond)) for blk in self.film_blocks())
                for tau in taus]

    def forward_prepared(self, x: Tensor, films: tuple[FiLM, ...], kvs: list[list[KV]]) -> Tensor:
        """Velocity [B, H, A] from precomputed FiLMs (`prepare_films`) and per-layer key/value groups.

        No input checks: the fast sampler validates shapes once per call. kvs[i] is the list of (k, v) groups
        of `context_layers()[i]`, each [B or 1, heads, M, d].
        """
        return self._backbone(x, kvs, films=films)

    def _condition(self, tau: Tensor | float, b: int, x: Tensor, global_cond: Tensor | None) -> Tensor:
        tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
        if tau.dim() == 0:
            tau = tau.expand(b)
        tau = tau.reshape(-1)
        if tau.shape[0] != b:
            raise ValueError(f"tau must be a scalar or [B]={b}, got {tuple(tau.shape)}")
        cond = self.tau_embed(tau)
        if self.global_cond_dim:
            if global_cond is None or global_cond.shape != (b, self.global_cond_dim):
                got = None if global_cond is None else tuple(global_cond.shape)
                raise ValueError(f"global_cond must be [{b}, {self.global_cond_dim}], got {got}")
            cond = torch.cat([cond, global_cond.to(cond.dtype)], dim=-1)
        elif global_cond is not None:
            raise ValueError("global_cond given but the U-Net was built with global_cond_dim=0")
        return F.mish(cond)

    def _gather_context(
        self,
        b: int,
        static: ContextCache | None,
        dynamic: Tensor | ContextCache | None,
        static_tokens: Tensor | None,
    ) -> list[list[KV]]:
        """Per attention layer, the list of (k, v) groups to concatenate."""
        if not self.cfg.cross_attention:
            if static is not None or dynamic is not None or static_tokens is not None:
                raise ValueError("this U-Net was built with cross_attention=False; it takes no context")
            return []
        if static is not None and static_tokens is not None:
            raise ValueError("pass either a prepared `static` cache or `static_tokens`, not both")
        caches = []
        for group in (static, static_tokens, dynamic):
            if group is None:
                continue
            cache = group if isinstance(group, ContextCache) else self.prepare_context(group)
            if len(cache.kv) != len(self._attn_layers):
                raise ValueError(f"cache has {len(cache.kv)} layers, model has {len(self._attn_layers)}")
            if cache.batch_size not in (1, b):
                raise ValueError(f"context batch {cache.batch_size} does not match x batch {b} (or 1)")
            caches.append(cache)
        if not caches:
            raise ValueError("cross-attention U-Net needs context: static cache, static_tokens or dynamic_tokens")
        return [[_expand(c.kv[i], b) for c in caches] for i in range(len(self._attn_layers))]


def _expand(kv: KV, b: int) -> KV:
    """Broadcast a batch-1 key/value pair to batch b (a view, no copy)."""
    k, v = kv
    if k.shape[0] == b:
        return kv
    return k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])


class _TraceWrapper(nn.Module):
    """Tensor-only signature for torch.jit.trace: x, tau [B], then the flat static kv, then dynamic tokens."""

    def __init__(self, model: CrossAttnUNet1D, n_static: int, has_dynamic: bool) -> None:
        super().__init__()
        self.model = model
        self.n_static = n_static
        self.has_dynamic = has_dynamic

    def forward(self, x: Tensor, tau: Tensor, *groups: Tensor) -> Tensor:
        flat = groups[: self.n_static]
        static = ContextCache(tuple(zip(flat[0::2], flat[1::2]))) if flat else None
        dynamic = groups[self.n_static] if self.has_dynamic else None
        return self.model(x, tau, static=static, dynamic_tokens=dynamic)


class TracedInference:
    """Low-overhead inference for a trained `CrossAttnUNet1D` (CPU, batch 1, the flow-sampling loop).

    At batch 1 roughly 40% of an eager forward is Python dispatch; a frozen TorchScript trace removes it.
    One trace is made per input-shape signature (x, static cache, dynamic tokens), lazily. The weights are
    frozen into the trace: build a new `TracedInference` after changing them. Same call signature as
    `CrossAttnUNet1D.forward` restricted to a prepared `static` cache and/or `dynamic_tokens` tensor.
    """

    def __init__(self, model: CrossAttnUNet1D) -> None:
        if model.global_cond_dim:
            raise ValueError("TracedInference does not support global_cond")
        self.model = model
        self._traces: dict[tuple, torch.jit.ScriptModule] = {}

    def __call__(
        self, x: Tensor, tau: Tensor | float, static: ContextCache | None = None, dynamic_tokens: Tensor | None = None
    ) -> Tensor:
        tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        flat = tuple(t for pair in (static.kv if static is not None else ()) for t in pair)
        args = (x, tau) + flat + ((dynamic_tokens,) if dynamic_tokens is not None else ())
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args) + (len(flat), dynamic_tokens is not None)
        with torch.no_grad():
            fn = self._traces.get(key)
            if fn is None:
                self.model(x, tau, static=static, dynamic_tokens=dynamic_tokens)  # validate inputs eagerly
                wrapper = _TraceWrapper(self.model, len(flat), dynamic_tokens is not None).eval()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn = torch.jit.freeze(torch.jit.trace(wrapper, args, check_trace=False))
                self._traces[key] = fn
            return fn(*args)
