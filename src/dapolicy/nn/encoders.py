"""Observation encoders that turn images or VAE latents into context tokens for the policy.

See docs/method.md, "Policy".

* `ResNetGN`: a small ResNet with GroupNorm (BatchNorm is a poor fit for small-batch, EMA-averaged
  behaviour-cloning training, as Diffusion Policy found), for the end-to-end variant. Its last feature map
  becomes tokens, one per spatial position.
* `LatentPatchTokenizer`: 2x2 patches of VAE latents -> tokens, for the latent variant and for the predicted
  next observation.
* `SpatialSoftmax`: keypoint pooling of a feature map, for the Diffusion-Policy CNN baseline.
* `random_shift`: Diffusion-Policy / DrQ random-shift augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ResNetGNConfig",
    "ResNetGN",
    "LatentPatchTokenizer",
    "SpatialSoftmax",
    "random_shift",
    "sincos_pos_embed_2d",
]

POS_EMBEDS = ("sincos", "learned")


def sincos_pos_embed_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine/cosine position embedding, [h * w, dim] in row-major order (as in MAE / DiT).

    Half the channels encode the row, half the column; dim must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sincos 2-D position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None] * omega  # [h, q]
    cols = torch.arange(w, dtype=torch.float32, device=device)[:, None] * omega  # [w, q]
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(h, w, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([row_emb, col_emb], dim=-1).reshape(h * w, dim)


class _PosEmbed2D(nn.Module):
    """Adds a 2-D position embedding to tokens [B, h*w, dim].

    "sincos": fixed, works for any grid size. "learned": a parameter for the configured grid (initialised
    to the sin/cos values), so inputs of another size are rejected.
    """

    def __init__(self, kind: str, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if kind not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {kind!r}")
        self.kind = kind
        self.dim = dim
        self.grid = grid
        if dim % 4 == 0:
            table = sincos_pos_embed_2d(grid[0], grid[1], dim)[None]
        elif kind == "learned":
            table = 0.02 * torch.randn(1, grid[0] * grid[1], dim)
        else:
            raise ValueError(f"sincos position embedding needs a width divisible by 4, got {dim}")
        if kind == "learned":
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table, persistent=False)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        if (h, w) != self.grid:
            if self.kind == "learned":
                raise ValueError(f"learned position embedding is sized for a {self.grid} grid, got {(h, w)}")
            return tokens + sincos_pos_embed_2d(h, w, self.dim, tokens.device).to(tokens.dtype)
        return tokens + self.table.to(tokens.dtype)


# ------------------------------------------------------------------------------------------------ ResNet
@dataclass
class ResNetGNConfig:
    """ResNet-GroupNorm image encoder.

    width: channels of the first stage; stages have width * (1, 2, 4, 8) (with 4 stages).
    blocks: basic blocks per stage; (1, 1, 1, 1) is a light CPU encoder, (2, 2, 2, 2) is ResNet18-like.
        Every stage after the first halves the resolution; the stem halves it too, so a 64 px image gives
        a 4x4 feature map with 4 stages (down-sampling 2 ** len(blocks)).
    n_groups: GroupNorm groups (must divide width).
    out_dim: token width after the final linear projection.
    image_size: square input size the "learned" position embedding is sized for.
    pos_embed: "sincos" (any image size) or "learned".
    """

    width: int = 32
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    n_groups: int = 8
    out_dim: int = 128
    image_size: int = 64
    pos_embed: str = "sincos"
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.blocks = tuple(int(b) for b in self.blocks)
        if not self.blocks or any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks must be a non-empty tuple of ints >= 1, got {self.blocks}")
        if self.width <= 0 or self.width % self.n_groups:
            raise ValueError(f"width {self.width} must be positive and divisible by n_groups {self.n_groups}")
        if self.out_dim <= 0:
            raise ValueError(f"out_dim must be positive, got {self.out_dim}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.out_dim % 4:
            raise ValueError(f"sincos position embedding needs out_dim divisible by 4, got {self.out_dim}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be divisible by {self.downsample}")

    @property
    def downsample(self) -> int:
        """Total spatial down-sampling factor (stem x stages after the first)."""
        return 2 ** len(self.blocks)

    @property
    def feature_channels(self) -> int:
        return self.width * 2 ** (len(self.blocks) - 1)


class BasicBlockGN(nn.Module):
    """ResNet basic block (two 3x3 convs) with GroupNorm; a 1x1 projection on the shortcut when needed."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, n_groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(n_groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(n_groups, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.GroupNorm(n_groups, out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNetGN(nn.Module):
    """Images float [B, 3, S, S] in [-1, 1] -> tokens [B, (S / 2**stages)^2, out_dim].

    Stem: 3x3 conv stride 2 + GN + ReLU (no max-pool: at 64 px resolution is scarce). `feature_map`
    exposes the raw last feature map for poolings other than tokens (e.g. `SpatialSoftmax`).
    """

    def __init__(self, cfg: ResNetGNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ResNetGNConfig()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.width, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(cfg.n_groups, cfg.width),
            nn.ReLU(),
        )
        stages = []
        in_ch = cfg.width
        for i, n in enumerate(cfg.blocks):
            out_ch = cfg.width * 2**i
            blocks = [BasicBlockGN(in_ch, out_ch, 1 if i == 0 else 2, cfg.n_groups)]
            blocks += [BasicBlockGN(out_ch, out_ch, 1, cfg.n_groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(cfg.feature_channels, cfg.out_dim)
        grid = cfg.image_size // cfg.downsample
        self.pos = _PosEmbed2D(cfg.pos_embed, cfg.out_dim, (grid, grid))

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def num_tokens(self, image_size: int) -> int:
        return (image_size // self.cfg.downsample) ** 2

    def feature_map(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] -> [B, feature_channels, S / 2**stages, S / 2**stages]."""
        c, k = self.cfg.in_channels, self.cfg.downsample
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must be [B, {c}, S, S] float, got {tuple(images.shape)}")
        if images.shape[-1] % k or images.shape[-2] % k:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by {k}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")
        return self.stages(self.stem(images))

    def forward(self, images: Tensor) -> Tensor:
        fmap = self.feature_map(images)
        _, _, h, w = fmap.shape
        tokens = self.proj(fmap.flatten(2).transpose(1, 2))
        return self.pos(tokens, h, w)


# ------------------------------------------------------------------------------------------------ latents
class LatentPatchTokenizer(nn.Module):
    """VAE latents [B, c, h, w] -> non-overlapping p x p patches -> linear -> + 2-D position embedding.

    Output [B, (h/p) * (w/p), out_dim], patches in row-major order.
    """

    def __init__(
        self,
        latent_channels: int,
        patch_size: int = 2,
        out_dim: int = 128,
        latent_size: int = 8,
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        if latent_channels <= 0 or patch_size <= 0 or out_dim <= 0:
            raise ValueError("latent_channels, patch_size and out_dim must be positive")
        if latent_size % patch_size:
            raise ValueError(f"latent_size {latent_size} must be divisible by patch_size {patch_size}")
        self.latent_channels = latent_channels
        self.patch_size = patch_size
        self.out_dim = out_dim
        self.latent_size = latent_size
        self.proj = nn.Linear(latent_channels * patch_size**2, out_dim)
        grid = latent_size // patch_size
        self.pos = _PosEmbed2D(pos_embed, out_dim, (grid, grid))

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    def forward(self, latents: Tensor) -> Tensor:
        c, p = self.latent_channels, self.patch_size
        if latents.dim() != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be [B, {c}, h, w], got {tuple(latents.shape)}")
        b, _, h, w = latents.shape
        if h % p or w % p:
            raise ValueError(f"latent size {(h, w)} must be divisible by patch_size {p}")
        gh, gw = h // p, w // p
        patches = latents.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        return self.pos(self.proj(patches), gh, gw)


# ------------------------------------------------------------------------------------------------ pooling
class SpatialSoftmax(nn.Module):
    """Feature map [B, C, h, w] -> expected 2-D keypoint coordinates [B, 2 * num_kp] in [-1, 1].

    As in Diffusion Policy's CNN encoder (robomimic): a 1x1 conv to num_kp maps, a softmax over positions,
    and the expected (x, y) under each.
    """

    def __init__(self, in_channels: int, num_kp: int = 32) -> None:
        super().__init__()
        self.num_kp = num_kp
        self.keypoints = nn.Conv2d(in_channels, num_kp, 1)

    def forward(self, fmap: Tensor) -> Tensor:
        if fmap.dim() != 4:
            raise ValueError(f"feature map must be [B, C, h, w], got {tuple(fmap.shape)}")
        b, _, h, w = fmap.shape
        attn = self.keypoints(fmap).flatten(2).softmax(dim=-1)  # [B, K, h*w]
        ys = torch.linspace(-1.0, 1.0, h, device=fmap.device, dtype=attn.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=fmap.device, dtype=attn.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)  # (x, y)
        return (attn @ grid).reshape(b, 2 * self.num_kp)


# ------------------------------------------------------------------------------------------------ augment
def random_shift(images: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random-shift augmentation: replicate-pad by `pad`, then crop back to the input size at an offset
    drawn per sample in [0, 2 * pad] (each axis independently).

    Replicate padding followed by an integer crop is the same as reading the original image at clamped
    indices, so this is one gather, with no padded copy and no interpolation: pixels are copied exactly.
    images: [B, C, H, W] (any dtype). pad=0 returns the input unchanged.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return images
    b, c, h, w = images.shape
    device = images.device
    draw_on = generator.device if generator is not None else device
    shifts = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator, device=draw_on).to(device) - pad
    rows = (torch.arange(h, device=device)[None] + shifts[:, :1]).clamp_(0, h - 1)  # [B, H]
    cols = (torch.arange(w, device=device)[None] + shifts[:, 1:]).clamp_(0, w - 1)  # [B, W]
    out = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
