"""DAPPolicy: the VAE, the action-conditioned dynamics model and the policy, trained in stages and sampled
together with Algorithm 1 (`policies/coupling.py`).

Units: actions and proprio are normalised to [-1, 1] inside the policy (statistics saved with it); images
arrive as uint8 [..., S, S, 3] and become float [-1, 1] CHW; next observations live in scaled VAE latents.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from dapolicy import __version__
from dapolicy.configuration import from_dict, to_dict
from dapolicy.spec import EnvSpec
from dapolicy.flow import extrapolate, flow_loss, interpolate, sample_tau, training_pair
from dapolicy.nn.dit import LatentDynamicsDiT
from dapolicy.nn.encoders import LatentPatchTokenizer, ResNetGN, random_shift
from dapolicy.nn.unet1d import CrossAttnUNet1D
from dapolicy.nn.vae import VAE
from dapolicy.policies.config import COUPLING_MODES, DAPConfig
from dapolicy.policies.coupling import CouplingTrace, coupled_generation
from dapolicy.policies.normalizer import MinMaxNormalizer, check_finite
from dapolicy.policies.receding import RecedingHorizon, env_frame
from dapolicy.policies import pretrained

STAGES = ("vae", "dynamics", "policy")


def images_to_float(images: Tensor) -> Tensor:
    """uint8 [..., S, S, 3] -> float [..., 3, S, S] in [-1, 1]."""
    return images.movedim(-1, -3).float().div(127.5).sub(1.0)


def float_to_images(x: Tensor) -> Tensor:
    """float [..., 3, S, S] in [-1, 1] -> uint8 [..., S, S, 3]."""
    return x.clamp(-1, 1).add(1.0).mul(127.5).round().to(torch.uint8).movedim(-3, -1)


class PolicyNet(nn.Module):
    """The action model pi(A | o_t, o_{t+k}): observation tokenisers + the cross-attention 1-D U-Net.

    Context tokens: current images (VAE latent patches or ResNet-GN features) with camera, frame and type
    embeddings; one proprio token per frame; the predicted next observation's latent patches with their own
    type embedding, or learned null tokens when there is no prediction.
    """

    def __init__(self, cfg: DAPConfig, spec: EnvSpec, latent_channels: int, latent_size: int) -> None:
        super().__init__()
        d = cfg.token_dim
        n_cams = len(spec.cameras)
        self.obs_encoder = cfg.obs_encoder
        if cfg.obs_encoder == "vae":
            self.obs_tokenizer = LatentPatchTokenizer(latent_channels, 2, d, latent_size)
        else:
            self.image_encoders = nn.ModuleList(
                ResNetGN(replace(cfg.resnet, out_dim=d, image_size=spec.image_size)) for _ in range(n_cams))
        self.next_tokenizer = LatentPatchTokenizer(latent_channels, 2, d, latent_size)
        self.proprio_embed = nn.Sequential(nn.Linear(spec.proprio_dim, d), nn.Mish(), nn.Linear(d, d))
        self.camera_embed = nn.Parameter(torch.randn(n_cams, d) * 0.02)
        self.frame_embed = nn.Parameter(torch.randn(cfg.n_obs_steps, d) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(3, d) * 0.02)  # 0 current image, 1 proprio, 2 next
        n_next = n_cams * (latent_size // 2) ** 2
        self.null_next = nn.Parameter(torch.randn(n_next, d) * 0.02)
        self.unet = CrossAttnUNet1D(cfg.unet, spec.action_dim, d)

    def observation_tokens(self, proprio: Tensor, latents: Tensor | None = None,
                           images: Tensor | None = None) -> Tensor:
        """Tokens of the current observation: [B, T_o * (C * N + 1), D]."""
        b, t = proprio.shape[:2]
        if self.obs_encoder == "vae":
            assert latents is not None
            _, _, c = latents.shape[:3]
            tok = self.obs_tokenizer(latents.flatten(0, 2))  # [B*T*C, N, D]
            tok = tok.view(b, t, c, -1, tok.shape[-1])
        else:
            assert images is not None
            c = images.shape[2]
            tok = torch.stack([enc(images[:, :, i].flatten(0, 1)) for i, enc in enumerate(self.image_encoders)],
                              dim=1)  # [B*T, C, N, D]
            tok = tok.view(b, t, c, -1, tok.shape[-1])
        tok = tok + self.camera_embed[None, None, :, None] + self.frame_embed[None, :, None, None] + self.type_embed[0]
        prop = self.proprio_embed(proprio) + self.frame_embed[None] + self.type_embed[1]  # [B, T, D]
        return torch.cat([tok.flatten(1, 3), prop], dim=1)

    def next_tokens(self, next_latents: Tensor | None, batch: int, null_mask: Tensor | None = None) -> Tensor:
        """Tokens of the predicted next observation; null tokens where there is none (or null_mask)."""
        null = self.null_next[None].expand(batch, -1, -1)
        if next_latents is None:
            return null
        b, c = next_latents.shape[:2]
        tok = self.next_tokenizer(next_latents.flatten(0, 1)).view(b, c, -1, null.shape[-1])
        tok = (tok + self.camera_embed[None, :, None] + self.type_embed[2]).flatten(1, 2)
        if null_mask is not None:
            tok = torch.where(null_mask[:, None, None], null, tok)
        return tok


class DAPPolicy(nn.Module):
    """Dynamics-Aligned Flow Matching Policy (method "dap"), or the same policy alone (method "fm")."""

    def __init__(self, config: DAPConfig, spec: EnvSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        down = 2 ** (len(config.vae.channel_mults) - 1)
        if spec.image_size % (2 * down):
            raise ValueError(f"image_size {spec.image_size} must be divisible by {2 * down} "
                             f"(VAE down-sampling x{down}, then 2x2 patches)")
        self.latent_channels = config.vae.latent_channels
        self.latent_size = spec.image_size // down
        n_cams = len(spec.cameras)
        self.vae = VAE(config.vae)
        self.action_normalizer = MinMaxNormalizer(spec.action_dim)
        self.proprio_normalizer = MinMaxNormalizer(spec.proprio_dim)
        self.dynamics = (LatentDynamicsDiT(config.dynamics, n_cams, self.latent_channels, self.latent_size,
                                           spec.action_dim, config.horizon,
                                           spec.proprio_dim * config.n_obs_steps)
                         if config.uses_dynamics else None)
        self.policy_net = PolicyNet(config, spec, self.latent_channels, self.latent_size)
        self.reset()

    # ------------------------------------------------------------------ staging (what the trainer drives)
    @property
    def stages(self) -> tuple[str, ...]:
        needs_vae = self.config.uses_dynamics or self.config.obs_encoder == "vae"
        return tuple(s for s in STAGES if (s != "vae" or needs_vae) and (s != "dynamics" or self.dynamics))

    def stage_module(self, stage: str) -> nn.Module:
        modules = {"vae": self.vae, "dynamics": self.dynamics, "policy": self.policy_net}
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} is not part of this policy; its stages are {self.stages}")
        return modules[stage]

    def stage_data(self, stage: str) -> tuple[tuple[str, ...] | None, bool]:
        """(sources, success_only): the VAE and the dynamics model see everything; the policy successes."""
        return ((("expert",), True) if stage == "policy" else (None, False))

    def needs_images(self, stage: str) -> bool:
        return stage == "vae" or (stage == "policy" and self.config.obs_encoder == "resnet")

    def needs_latents(self, stage: str) -> bool:
        return stage == "dynamics" or (stage == "policy" and (self.config.obs_encoder == "vae"
                                                             or self.config.next_obs_mix.null < 1.0))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fit_normalizer(self, data: Any) -> None:
        """Fit action/proprio statistics on an EpisodeData (or anything with .action and .proprio)."""
        self.action_normalizer.fit(data.action, "action")
        self.proprio_normalizer.fit(data.proprio, "proprio")

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode_latents(self, images: np.ndarray | Tensor, batch_size: int = 256) -> Tensor:
        """Frozen-VAE latents of uint8 images [N, C, S, S, 3] -> [N, C, c, h, w] (scaled, deterministic)."""
        images = torch.as_tensor(images)
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        out = [self.vae.to_latent(images_to_float(flat[i:i + batch_size].to(self.device)))
               for i in range(0, flat.shape[0], batch_size)]
        z = torch.cat(out) if out else torch.empty(0)
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents [..., c, h, w] -> uint8 frames [..., S, S, 3]."""
        lead = latents.shape[:-3]
        frames = float_to_images(self.vae.from_latent(latents.reshape(-1, *latents.shape[-3:]).to(self.device)))
        return frames.reshape(*lead, *frames.shape[1:])

    @torch.no_grad()
    def calibrate_latent_scale(self, images: np.ndarray | Tensor) -> float:
        """Set the VAE's latent scale so latents of these images have unit variance."""
        x = torch.as_tensor(images)
        x = images_to_float(x.reshape(-1, *x.shape[-3:]).to(self.device))
        self.vae.fit_latent_scale(x)
        return float(self.vae.latent_scale)

    # ------------------------------------------------------------------ losses
    def compute_loss(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        """Training loss of one stage on a batch laid out as in docs/architecture.md."""
        if stage == "vae":
            images = _require(batch, "images", 5)
            out = self.vae.loss(images_to_float(images.flatten(0, 1)))
            return dict(out)
        if stage == "dynamics":
            return {"loss": self._dynamics_loss(batch)}
        if stage == "policy":
            return self._policy_loss(batch)
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    def _dynamics_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        latents = _require(batch, "latents", 6)
        proprio = self.proprio_normalizer.normalize(_require(batch, "proprio", 3))
        action = self.action_normalizer.normalize(_require(batch, "action", 3))
        return latents[:, -1], proprio.flatten(1), action

    def _dynamics_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.dynamics is None:
            raise ValueError("method 'fm' has no dynamics model")
        current, proprio, action = self._dynamics_inputs(batch)
        target_latents = _require(batch, "next_latents", 5)
        b = current.shape[0]
        tau = sample_tau(b, self.config.flow, device=current.device)
        z_tau, target = training_pair(target_latents, tau)
        drop = torch.rand(b, device=current.device) < self.config.action_dropout
        v = self.dynamics(z_tau, tau, current, action, proprio, drop_action=drop)
        return flow_loss(v, target)

    @torch.no_grad()
    def _dynamics_estimate(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The frozen dynamics model's extrapolated next latents at a random tau' (no gradient)."""
        current, proprio, action = self._dynamics_inputs(batch)
        target = batch["next_latents"]
        tau = torch.rand(current.shape[0], device=current.device)
        z_tau = interpolate(target, torch.randn_like(target), tau)
        was_training = self.dynamics.training
        self.dynamics.eval()
        v = self.dynamics(z_tau, tau, current, action, proprio)
        self.dynamics.train(was_training)
        return extrapolate(z_tau, v, tau)

    def _policy_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        action = self.action_normalizer.normalize(_require(batch, "action", 3))
        b = action.shape[0]
        tokens = self._observation_tokens(batch, augment=True)
        mix = self.config.next_obs_mix
        source = torch.multinomial(torch.tensor([mix.ground_truth, mix.dynamics, mix.null]), b, replacement=True)
        source = source.to(action.device)
        next_latents = None
        if mix.null < 1.0:
            next_latents = _require(batch, "next_latents", 5)
            use_dyn = source == 1
            if use_dyn.any():
                if self.dynamics is None:
                    raise ValueError("next_obs_mix.dynamics > 0 needs a dynamics model")
                sub = {k: v[use_dyn] for k, v in batch.items() if k in ("latents", "proprio", "action", "next_latents")}
                next_latents = next_latents.clone()
                next_latents[use_dyn] = self._dynamics_estimate(sub)
        next_tok = self.policy_net.next_tokens(next_latents, b, null_mask=source == 2)
        tau = sample_tau(b, self.config.flow, device=action.device)
        a_tau, target = training_pair(action, tau)
        v = self.policy_net.unet(a_tau, tau, static_tokens=tokens, dynamic_tokens=next_tok)
        return {"loss": flow_loss(v, target), "share_dynamics": (source == 1).float().mean()}

    def _observation_tokens(self, batch: Mapping[str, Tensor], augment: bool) -> Tensor:
        proprio = self.proprio_normalizer.normalize(_require(batch, "proprio", 3))
        if self.config.obs_encoder == "vae":
            latents = _require(batch, "latents", 6)
            if augment and self.training and self.config.latent_shift > 0:
                latents = random_shift(latents.flatten(0, 2), self.config.latent_shift).view_as(latents)
            return self.policy_net.observation_tokens(proprio, latents=latents)
        images = images_to_float(_require(batch, "images", 6))
        if augment and self.training and self.config.image_shift > 0:
            pad = max(1, round(self.config.image_shift * self.spec.image_size / 64))
            images = random_shift(images.flatten(0, 2), pad).view_as(images)
        return self.policy_net.observation_tokens(proprio, images=images)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_chunk(self, obs: Mapping[str, Any], return_next: bool = False, mode: str | None = None,
                      steps: int | None = None, return_trace: bool = False,
                      generator: torch.Generator | None = None) -> Any:
        """One action chunk [B, H, A] (numpy, env units) by coupled generation.

        Returns `actions`, or a tuple `(actions, next_frames)` with return_next (uint8 [B, C, S, S, 3], None
        in mode "off"), `(actions, trace)` with return_trace, `(actions, next_frames, trace)` with both.
        The trace holds the per-step extrapolations: {"tau": [K], "z_hat": [K, B, C, c, h, w] (or None),
        "a_hat": [K, B, H, A]} in normalised units.
        """
        mode = mode or self.config.coupling
        if mode not in COUPLING_MODES:
            raise ValueError(f"unknown coupling mode {mode!r}; expected one of {COUPLING_MODES}")
        if self.dynamics is None and mode != "off":
            mode = "off"
        steps = steps or self.config.flow.steps
        self.eval()
        batch = self._validate_obs(obs)
        b = batch["proprio"].shape[0]
        if self.needs_latents("policy") or mode != "off":
            batch["latents"] = self.encode_latents(batch["images"])
        obs_tokens = self._observation_tokens(batch, augment=False)
        context = self.policy_net.unet.prepare_context(obs_tokens)  # projected once per call, not per step

        def policy_velocity(a: Tensor, tau: float, z_hat: Tensor | None) -> Tensor:
            t = torch.full((b,), tau, device=a.device)
            return self.policy_net.unet(a, t, static=context, dynamic_tokens=self.policy_net.next_tokens(z_hat, b))

        current = batch["latents"][:, -1] if mode != "off" else None
        proprio = self.proprio_normalizer.normalize(batch["proprio"]).flatten(1)

        def dynamics_velocity(z: Tensor, tau: float, a_hat: Tensor | None) -> Tensor:
            t = torch.full((b,), tau, device=z.device)
            return self.dynamics(z, t, current, a_hat, proprio)

        dev = self.device
        z0 = torch.randn((b, len(self.spec.cameras), self.latent_channels, self.latent_size, self.latent_size),
                         generator=generator, device=dev)
        a0 = torch.randn((b, self.config.horizon, self.spec.action_dim), generator=generator, device=dev)
        trace = CouplingTrace() if return_trace else None
        a, z = coupled_generation(dynamics_velocity, policy_velocity, z0, a0, steps, mode, trace)
        actions = self.action_normalizer.unnormalize(a).cpu().numpy()
        out: list[Any] = [actions]
        if return_next:
            out.append(None if z is None else self.decode_latents(z).cpu().numpy())
        if return_trace:
            out.append({"tau": trace.taus,
                        "z_hat": torch.stack(trace.z_hat).cpu() if trace.z_hat else None,
                        "a_hat": torch.stack(trace.a_hat).cpu()})
        return out[0] if len(out) == 1 else tuple(out)

    def _validate_obs(self, obs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Check a batched observation's keys, shapes and values; errors name the key and expected shape."""
        t, c, s = self.config.n_obs_steps, len(self.spec.cameras), self.spec.image_size
        expected = {"images": (t, c, s, s, 3), "proprio": (t, self.spec.proprio_dim)}
        out = {}
        for key, shape in expected.items():
            if key not in obs:
                raise ValueError(f"observation is missing key {key!r} (expected shape [B, {', '.join(map(str, shape))}])")
            value = torch.as_tensor(np.asarray(obs[key]) if not isinstance(obs[key], Tensor) else obs[key])
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape:
                raise ValueError(f"observation {key!r} has shape {tuple(value.shape)}, "
                                 f"expected [B, {', '.join(map(str, shape))}]")
            if key == "proprio":
                value = value.float()
                check_finite(key, value)
            elif value.dtype != torch.uint8:
                raise ValueError(f"observation 'images' must be uint8, got {value.dtype}")
            out[key] = value.to(self.device)
        return out

    # ------------------------------------------------------------------ closed loop
    def reset(self) -> None:
        """Forget the observation history and queued actions (call at every episode start)."""
        self._loop = RecedingHorizon(self.config.n_obs_steps, self.config.n_action_steps)
        self.last_next_frames: np.ndarray | None = None
        if not hasattr(self, "record_predictions"):
            # Decoding the predicted next frames costs a VAE decode per chunk: only on request (videos, UIs).
            self.record_predictions = False

    def select_action(self, env_obs: Mapping[str, Any]) -> np.ndarray:
        """Receding-horizon control: predict a chunk of H when the queue is empty, execute T_a of it.

        With `record_predictions = True` the decoded predicted next frames of the last chunk are kept in
        `last_next_frames` ([C, S, S, 3] uint8).
        """
        self._loop.observe(env_frame(env_obs, self.spec))
        if self._loop.needs_chunk:
            if self.record_predictions:
                actions, next_frames = self.predict_chunk(self._loop.batch(), return_next=True)
                self.last_next_frames = None if next_frames is None else next_frames[0]
            else:
                actions = self.predict_chunk(self._loop.batch())
            self._loop.enqueue(actions[0])
        return self._loop.pop()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        header = {"class": type(self).__name__, "dapolicy_version": __version__,
                  "config": to_dict(self.config), "spec": self.spec.to_dict()}
        return pretrained.save_folder(self, directory, header)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "DAPPolicy":
        header = pretrained.read_header(directory)
        if header.get("class") != cls.__name__:
            raise ValueError(f"{directory} holds a {header.get('class')!r}, not a {cls.__name__}")
        config = from_dict(DAPConfig, header["config"], "config")
        policy = cls(config, EnvSpec.from_dict(header["spec"]))
        pretrained.load_weights(policy, directory)
        return policy.to(map_location)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per component."""
        parts = {"vae": self.vae, "dynamics": self.dynamics, "policy": self.policy_net}
        counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items() if m}
        counts["total"] = sum(counts.values())
        return counts


def _require(batch: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    """A batch entry, checked for presence, rank and finiteness (errors name the key)."""
    if key not in batch:
        raise ValueError(f"batch is missing key {key!r} (have {sorted(batch)})")
    value = batch[key]
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    if value.dim() != ndim:
        raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, expected {ndim} dimensions")
    if value.is_floating_point():
        check_finite(key, value)
    return value
