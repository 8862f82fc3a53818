"""Attention and embedding building blocks shared by the DiT dynamics model and the U-Net policy.

Cross-attention exposes its key/value projection separately (`kv`) so a caller can project the tokens that
stay fixed during sampling (current observation) once per call and only re-project the tokens that change
at every flow step (the other model's estimate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KV = tuple[Tensor, Tensor]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of a scalar per sample, [B] -> [B, dim]. tau in [0, 1] is scaled by 1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """tau -> sinusoid -> MLP, the conditioning vector for FiLM / adaLN."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        hidden = hidden or 4 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Mish(), nn.Linear(hidden, dim))

    def forward(self, tau: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(tau, self.dim))


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over [B, N, D] using torch's fused kernel."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(*(split_heads(t, self.heads) for t in (q, k, v)))
        return self.out(o.transpose(1, 2).reshape(x.shape))


class CrossAttention(nn.Module):
    """Queries from x [B, N, D]; keys/values from context tokens [B, M, C].

    `kv(context)` projects context once; `forward(x, kv=[...])` attends to the concatenation of several
    projected groups, so fixed and changing tokens can be projected at different rates.
    """

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)

    def kv(self, context: Tensor) -> KV:
        return split_heads(self.k(context), self.heads), split_heads(self.v(context), self.heads)

    def forward(self, x: Tensor, context: Tensor | None = None, kv: list[KV] | None = None) -> Tensor:
        groups = list(kv or [])
        if context is not None:
            groups.append(self.kv(context))
        if not groups:
            raise ValueError("CrossAttention needs context tokens or projected key/value groups")
        if len(groups) == 1:  # a pre-merged group (fast sampler): no copy
            k, v = groups[0]
        else:
            k = torch.cat([g[0] for g in groups], dim=2)
            v = torch.cat([g[1] for g in groups], dim=2)
        q = split_heads(self.q(x), self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(x.shape))


def fused_kv_weights(layers: list[CrossAttention]) -> tuple[Tensor, Tensor]:
    """(weight, bias) projecting context tokens to the keys and values of all `layers` in one GEMM.

    Inference only (a copy of the weights, rebuilt by the caller when they change): one [M, sum 2D] matmul
    replaces 2 * len(layers) small ones, which at batch 1 are mostly dispatch overhead.
    """
    weight = torch.cat([w for layer in layers for w in (layer.k.weight, layer.v.weight)])
    bias = torch.cat([b for layer in layers for b in (layer.k.bias, layer.v.bias)])
    return weight, bias


def split_fused_kv(projected: Tensor, layers: list[CrossAttention]) -> list[KV]:
    """Per layer (k, v) [B, heads, M, d] from the output of a `fused_kv_weights` projection [B, M, sum 2D]."""
    out: list[KV] = []
    start = 0
    for layer in layers:
        d = layer.q.out_features
        k = projected[..., start:start + d]
        v = projected[..., start + d:start + 2 * d]
        out.append((split_heads(k, layer.heads), split_heads(v, layer.heads)))
        start += 2 * d
    return out
