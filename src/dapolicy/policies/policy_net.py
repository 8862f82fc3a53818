"""The action model shared by DAP and FM: observation tokenisers + the cross-attention 1-D U-Net.

Context tokens the U-Net cross-attends to: current images (VAE latent patches or ResNet-GN features) with
camera, frame and type embeddings; one proprio token per frame; optional learned register tokens (constant,
input-independent: somewhere for attention to go that is not an observation token); and, for DAP, the predicted next
observation with its own type embedding (or learned null tokens when there is none), read either as VAE
latent patches ("latent") or, decoded to images, through the same ResNet-GN as the current images ("image").
FM builds the same network without the next-observation tokens.

With `init_seed`, the network draws its weights from generators of its own (`drawn_from`): the shared body
(encoders, embeddings, U-Net) from `init_seed`, DAP's next-observation parts and the registers from streams
derived from it. Then FM and DAP networks of one seed start from the same body, whatever else their method
built first (common random numbers for paired comparisons; `FMConfig.paired_init`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
from torch import Tensor, nn

from dapolicy.nn.encoders import LatentPatchTokenizer, ResNetGN, ResNetGNConfig
from dapolicy.nn.unet1d import CrossAttnUNet1D, UNet1DConfig
from dapolicy.spec import EnvSpec

# Salts of the streams derived from `init_seed` for the parts only some networks have.
NEXT_OBS_STREAM, REGISTER_STREAM = 1, 2
# Salt of the policy network's own stream of the training seed (`policy_init_seed`).
POLICY_INIT_STREAM = 7


@contextmanager
def drawn_from(seed: int | None) -> Iterator[None]:
    """Parameters created inside are drawn from a CPU generator seeded with `seed`; the global generator is left
    as it was. `None`: drawn from the global generator as it stands (the default construction order)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def derived_seed(seed: int | None, stream: int) -> int | None:
    """The seed of sub-stream `stream` of `seed` (None stays None)."""
    return None if seed is None else (seed * 1_000_003 + stream) % (2**63)


def policy_init_seed() -> int:
    """The seed of a `paired_init` policy network: derived from the seed the global generator was last given
    (the training seed, `seed_everything`), so it does not depend on what was drawn since."""
    return derived_seed(torch.initial_seed(), POLICY_INIT_STREAM)


class PolicyNet(nn.Module):
    """pi(A | o_t [, o_{t+k}]): tokenisers + U-Net. `with_next_obs` adds the next-observation tokens."""

    def __init__(self, spec: EnvSpec, *, obs_encoder: str, token_dim: int, n_obs_steps: int, unet: UNet1DConfig,
                 resnet: ResNetGNConfig, latent_channels: int, latent_size: int, with_next_obs: bool,
                 next_obs_reader: str = "latent", register_tokens: int = 0, init_seed: int | None = None) -> None:
        super().__init__()
        if register_tokens < 0:
            raise ValueError(f"register_tokens must be >= 0, got {register_tokens}")
        d = token_dim
        n_cams = len(spec.cameras)
        self.obs_encoder = obs_encoder
        self.with_next_obs = with_next_obs
        self.next_obs_reader = next_obs_reader
        with drawn_from(init_seed):  # the body; the optional parts below come from streams of their own
            if obs_encoder == "vae":
                self.obs_tokenizer = LatentPatchTokenizer(latent_channels, 2, d, latent_size)
            else:
                self.image_encoders = nn.ModuleList(
                    ResNetGN(replace(resnet, out_dim=d, image_size=spec.image_size)) for _ in range(n_cams))
            self.proprio_embed = nn.Sequential(nn.Linear(spec.proprio_dim, d), nn.Mish(), nn.Linear(d, d))
            self.camera_embed = nn.Parameter(torch.randn(n_cams, d) * 0.02)
            self.frame_embed = nn.Parameter(torch.randn(n_obs_steps, d) * 0.02)
            self.type_embed = nn.Parameter(torch.randn(3, d) * 0.02)  # 0 current image, 1 proprio, 2 next
            if with_next_obs:
                with drawn_from(derived_seed(init_seed, NEXT_OBS_STREAM)):
                    if next_obs_reader == "latent":
                        self.next_tokenizer = LatentPatchTokenizer(latent_channels, 2, d, latent_size)
                        per_camera = (latent_size // 2) ** 2
                    elif next_obs_reader == "image" and obs_encoder == "resnet":
                        per_camera = self.image_encoders[0].num_tokens(spec.image_size)
                    else:
                        raise ValueError(f"next_obs_reader {next_obs_reader!r} needs obs_encoder 'resnet' (readers: "
                                         f"latent, image), got obs_encoder {obs_encoder!r}")
                    self.null_next = nn.Parameter(torch.randn(n_cams * per_camera, d) * 0.02)
            self.unet = CrossAttnUNet1D(unet, spec.action_dim, d)
            # Created last, and only when asked for, so that a network without them initialises as before.
            with drawn_from(derived_seed(init_seed, REGISTER_STREAM)):
                self.registers = nn.Parameter(torch.randn(register_tokens, d) * 0.02) if register_tokens else None

    def observation_tokens(self, proprio: Tensor, latents: Tensor | None = None,
                           images: Tensor | None = None, image_keep: Tensor | None = None) -> Tensor:
        """Tokens of the current observation: [B, T_o * (C * N + 1) + R, D] (R register tokens, last). images:
        float [B, T, C, 3, S, S].

        image_keep: optional [B] mask; where False the image tokens carry only their position embeddings
        (the current images are hidden from the policy, proprio stays).
        """
        b, t = proprio.shape[:2]
        if self.obs_encoder == "vae":
            if latents is None:
                raise ValueError("the 'vae' observation encoder needs latents")
            c = latents.shape[2]
            tok = self.obs_tokenizer(latents.flatten(0, 2))  # [B*T*C, N, D]
        else:
            if images is None:
                raise ValueError("the 'resnet' observation encoder needs images")
            c = images.shape[2]
            tok = self.image_tokens(images.flatten(0, 1))  # [B*T, C, N, D]
        tok = tok.view(b, t, c, -1, tok.shape[-1])
        if image_keep is not None:
            tok = tok * image_keep.to(tok.dtype)[:, None, None, None, None]
        tok = tok + self.camera_embed[None, None, :, None] + self.frame_embed[None, :, None, None] + self.type_embed[0]
        prop = self.proprio_embed(proprio) + self.frame_embed[None] + self.type_embed[1]  # [B, T, D]
        groups = [tok.flatten(1, 3), prop]
        if self.registers is not None:
            groups.append(self.registers[None].expand(b, -1, -1))
        return torch.cat(groups, dim=1)

    def image_tokens(self, images: Tensor) -> Tensor:
        """Per-camera ResNet tokens of float images [B, C, 3, S, S] -> [B, C, N, D] (no embeddings added)."""
        return torch.stack([enc(images[:, i]) for i, enc in enumerate(self.image_encoders)], dim=1)

    def next_tokens(self, next_obs: Tensor | None, batch: int, null_mask: Tensor | None = None) -> Tensor:
        """Tokens of the predicted next observation; null tokens where there is none (or null_mask).

        next_obs: latents [B, C, c, h, w] for the "latent" reader, float images [B, C, 3, S, S] in [-1, 1] for
        the "image" reader (`DAPPolicy.next_observation_tokens` decodes latents for it).
        """
        if not self.with_next_obs:
            raise ValueError("this policy network was built without next-observation tokens")
        null = self.null_next[None].expand(batch, -1, -1)
        if next_obs is None:
            return null
        b, c = next_obs.shape[:2]
        if self.next_obs_reader == "latent":
            tok = self.next_tokenizer(next_obs.flatten(0, 1)).view(b, c, -1, null.shape[-1])
        else:
            tok = self.image_tokens(next_obs)
        tok = (tok + self.camera_embed[None, :, None] + self.type_embed[2]).flatten(1, 2)
        if null_mask is not None:
            tok = torch.where(null_mask[:, None, None], null, tok)
        return tok
