"""KL-regularised convolutional image autoencoder: the latent space of the dynamics model.

See docs/method.md, "Image autoencoder".

The dynamics model predicts next frames in a compact latent space instead of pixels, which makes it cheap
enough to run at every flow step of coupled generation. The autoencoder is trained first on all images
(expert and random), then frozen; its latents are scaled to unit variance by a factor measured on the data
(`fit_latent_scale`) so the flow path x_tau = (1 - tau) eps + tau x1 mixes noise and data of equal scale.

Plugging in another autoencoder. The rest of the library only uses the `LatentCodec` interface:
`to_latent`, `from_latent`, `latent_channels` and `downsample_factor`. A user with pretrained weights
(e.g. a diffusers AutoencoderKL on disk) can wrap them in a module that implements those four members (for
AutoencoderKL: `to_latent(x) = vae.encode(x).latent_dist.mean * scaling_factor`, `from_latent(z) =
vae.decode(z / scaling_factor).sample`) and pass it wherever a `VAE` is expected; no code here downloads
anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@runtime_checkable
class LatentCodec(Protocol):
    """What the policy needs from an image autoencoder. Images are float [B, 3, H, W] in [-1, 1]."""

    latent_channels: int
    downsample_factor: int

    def to_latent(self, x: Tensor) -> Tensor: ...

    def from_latent(self, z: Tensor) -> Tensor: ...


#: a camera with more foreground than this share of its pixels over the batch has no static scene
MAX_FOREGROUND_SHARE = 0.5


def foreground_weights(frames: Tensor, weight: float, threshold: float) -> Tensor:
    """Loss weights [B, C, 1, S, S] for a batch of frames [B, C, 3, S, S] in [-1, 1] (C cameras): 1 + weight
    where a pixel differs from the static scene, 1 elsewhere.

    The static scene is each camera's per-pixel median over the batch: with frames drawn from many episodes and
    times, whatever moves (the agent, the object) sits at a given pixel in fewer than half of them. A camera
    that moves itself (a wrist camera) has no such scene: where more than `MAX_FOREGROUND_SHARE` of its pixels
    count as foreground, its weights stay 1 rather than weighting nearly everything alike.
    """
    if frames.ndim != 5:
        raise ValueError(f"foreground_weights needs frames [B, cameras, 3, S, S], got shape {tuple(frames.shape)}")
    background = frames.median(dim=0, keepdim=True).values
    moving = (frames - background).abs().mean(dim=-3, keepdim=True) > threshold
    has_static_scene = moving.to(frames.dtype).mean(dim=(0, 2, 3, 4), keepdim=True) <= MAX_FOREGROUND_SHARE
    return 1.0 + weight * (moving & has_static_scene).to(frames.dtype)


@dataclass
class VAEConfig:
    """Architecture and loss weights of the image VAE.

    in_channels: image channels (3 for RGB).
    latent_channels: channels of the latent map (4, as in latent diffusion).
    base_channels: width of the first resolution level; level i has base_channels * channel_mults[i].
    channel_mults: one entry per resolution level; there are len(channel_mults) - 1 down-samplings by 2,
        so the default (1, 2, 4, 4) gives 8x down-sampling (64x64x3 -> 8x8x4).
    blocks_per_level: residual blocks per resolution level (encoder and decoder alike): one int for every
        level, or one entry per level (finest first). Full-resolution convolutions dominate the CPU cost, so
        the CPU presets put no blocks at the finest levels: e.g. (0, 0, 1, 1) is ~10x cheaper than 1.
    groups: GroupNorm groups; every level width must be divisible by it. GroupNorm rather than BatchNorm so
        encoding a batch of one (inference, latent caching) behaves exactly like training.
    kl_weight: weight of the KL term. Both loss terms are per-element means (pixel MSE, KL per latent
        element), so the weight does not depend on the image size. Small (as in latent diffusion): the KL
        only keeps the posterior from collapsing to a point and the latents from drifting; the measured
        `latent_scale` takes care of their magnitude.
    logvar_clamp: the encoder's log-variance is clamped to this range for numerical safety.
    foreground_weight: extra weight of the pixels that differ from the static scene (`foreground_weights`)
        in the reconstruction loss; 0 = plain pixel MSE. Why: a small moving object (PushT's agent covers 11
        of 4,096 pixels) costs a plain MSE almost nothing to erase, and an erased object is one no dynamics
        model can move. The static scene is the per-camera median of the batch's frames, so nothing is fitted;
        a camera that moves with the robot has none and keeps plain MSE (`foreground_weights`).
    foreground_threshold: a pixel is foreground where its mean absolute difference from that median over the
        colour channels exceeds this (images in [-1, 1]).
    """

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int | tuple[int, ...] = 1
    groups: int = 8
    kl_weight: float = 1e-6
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)
    foreground_weight: float = 0.0
    foreground_threshold: float = 0.1

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if isinstance(self.blocks_per_level, (list, tuple)):
            self.blocks_per_level = tuple(int(b) for b in self.blocks_per_level)
            if len(self.blocks_per_level) != len(self.channel_mults) or min(self.blocks_per_level) < 0:
                raise ValueError(f"blocks_per_level needs one entry >= 0 per level ({len(self.channel_mults)}), "
                                 f"got {self.blocks_per_level}")
        self.logvar_clamp = (float(self.logvar_clamp[0]), float(self.logvar_clamp[1]))
        if self.in_channels < 1 or self.latent_channels < 1:
            raise ValueError("in_channels and latent_channels must be >= 1")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        if self.base_channels < 1 or self.groups < 1 or min(self.level_blocks) < 0 or max(self.level_blocks) < 1:
            raise ValueError("base_channels and groups must be >= 1 and some level needs a residual block")
        for width in self.widths:
            if width % self.groups:
                raise ValueError(f"level width {width} is not divisible by groups={self.groups}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.foreground_weight < 0 or self.foreground_threshold <= 0:
            raise ValueError(f"foreground_weight must be >= 0 and foreground_threshold > 0, got "
                             f"{self.foreground_weight} and {self.foreground_threshold}")
        if self.logvar_clamp[0] >= self.logvar_clamp[1]:
            raise ValueError(f"logvar_clamp must be (low, high) with low < high, got {self.logvar_clamp}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of every resolution level, finest first."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def level_blocks(self) -> tuple[int, ...]:
        """Residual blocks of every resolution level, finest first."""
        if isinstance(self.blocks_per_level, tuple):
            return self.blocks_per_level
        return (int(self.blocks_per_level),) * len(self.channel_mults)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected where widths differ) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (learned down-sampling; exact halving for even sizes).

    It also moves to the next level's width, so a level without residual blocks costs one cheap conv.
    """

    def __init__(self, ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution (avoids the checkerboard of transposed convolutions)."""

    def __init__(self, ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image [B, in, H, W] -> posterior parameters [B, 2 * latent, H / f, W / f] (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.level_blocks[level]):
                layers.append(ResBlock(ch, width, cfg.groups))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch, widths[level + 1]))
                ch = widths[level + 1]
        layers.append(ResBlock(ch, ch, cfg.groups))  # bottleneck
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, in, h * f, w * f] (mirror of the encoder)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.widths[::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch, cfg.groups)]  # bottleneck
        blocks = cfg.level_blocks[::-1]
        for level, width in enumerate(widths):
            for _ in range(blocks[level]):
                layers.append(ResBlock(ch, width, cfg.groups))
                ch = width
            if level < len(widths) - 1:
                layers.append(Upsample(ch, widths[level + 1]))
                ch = widths[level + 1]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class VAE(nn.Module):
    """KL conv VAE with a measured latent scale. Implements `LatentCodec`.

    Images are float [B, in_channels, H, W] in [-1, 1], H and W divisible by `downsample_factor`.
    `encode`/`decode`/`loss` work in the raw latent space; `to_latent`/`from_latent` work in the scaled,
    unit-variance space that the dynamics model and the latent cache use.
    """

    latent_scale: Tensor

    def __init__(self, cfg: VAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VAEConfig()
        self.latent_channels = self.cfg.latent_channels
        self.downsample_factor = self.cfg.downsample_factor
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        # Part of the state dict so a saved VAE keeps the scale it was fitted with.
        self.register_buffer("latent_scale", torch.tensor(1.0))

    # ---------------------------------------------------------------- shape checks
    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(channels, h, w) of the latent of an image of the given size."""
        width = height if width is None else width
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the down-sampling factor {f}")
        return self.latent_channels, height // f, width // f

    def _check_image(self, x: Tensor) -> None:
        c, f = self.cfg.in_channels, self.downsample_factor
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"expected images [B, {c}, H, W] with H and W divisible by {f}, got {tuple(x.shape)}"
            )

    def _check_latent(self, z: Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")

    # ---------------------------------------------------------------- raw latent space
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior N(mean, exp(logvar)) of images in [-1, 1] -> (mean, logvar), each [B, c, H/f, W/f]."""
        self._check_image(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*self.cfg.logvar_clamp)

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latents -> images [B, in, h*f, w*f] (unbounded; clamp to [-1, 1] for display)."""
        self._check_latent(z)
        return self.decoder(z)

    def loss(self, x: Tensor, pixel_weight: Tensor | None = None) -> dict[str, Tensor]:
        """Training loss on images in [-1, 1] with a reparameterised posterior sample.

        pixel_weight: optional [N, 1, H, W] weights of the reconstruction error (`foreground_weights`); the
        loss then uses their weighted mean, while "recon" stays the plain pixel MSE, comparable across runs.
        Returns {"loss": recon + kl_weight * kl, "recon": pixel MSE, "kl": KL(q || N(0, I)) per latent element}.
        """
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        decoded = self.decoder(z)
        recon = F.mse_loss(decoded, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        if pixel_weight is None:
            return {"loss": recon + self.cfg.kl_weight * kl, "recon": recon, "kl": kl}
        weighted = ((decoded - x).pow(2) * pixel_weight).mean() / pixel_weight.mean()
        return {"loss": weighted + self.cfg.kl_weight * kl, "recon": recon.detach(),
                "recon_weighted": weighted.detach(), "kl": kl}

    # ---------------------------------------------------------------- scaled latent space
    @torch.no_grad()
    def fit_latent_scale(self, x: Tensor, batch_size: int = 256) -> float:
        """Set `latent_scale` to 1 / std of the posterior means of images `x`, so `to_latent` has unit std.

        Encodes in chunks of `batch_size`; the statistics are accumulated in float64. Returns the scale.
        """
        self._check_image(x)
        total, sq, n = 0.0, 0.0, 0
        for chunk in x.split(batch_size):
            mean = self.encode(chunk.to(self.latent_scale.device))[0].double()
            total += mean.sum().item()
            sq += mean.pow(2).sum().item()
            n += mean.numel()
        var = max(sq / n - (total / n) ** 2, 0.0)
        if var <= 1e-12:
            raise ValueError("posterior means have zero variance; cannot fit a latent scale")
        scale = var**-0.5
        self.latent_scale.fill_(scale)
        return scale

    def to_latent(self, x: Tensor) -> Tensor:
        """Deterministic scaled latent (posterior mean * latent_scale): what the dynamics model sees and the
        latent cache stores."""
        return self.encode(x)[0] * self.latent_scale

    def from_latent(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in (roughly) [-1, 1]."""
        return self.decode(z / self.latent_scale)
