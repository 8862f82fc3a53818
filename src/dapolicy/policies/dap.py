"""DAPPolicy: the VAE, the action-conditioned dynamics model and the policy, trained in stages and sampled
together with Algorithm 1 (`policies/coupling.py`).

It is FM's policy (`policies/fm.py`) plus a latent dynamics DiT, with the policy network also reading the
predicted next observation. Units: actions and proprio in [-1, 1] inside the policy; next observations in
scaled VAE latents.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from dapolicy.flow import (
    euler_step,
    extrapolate,
    flow_loss,
    interpolate,
    per_sample_flow_error,
    sample_tau,
    time_grid,
    training_pair,
    velocity_target,
)
from dapolicy.nn.dit import LatentDynamicsDiT
from dapolicy.policies.base import Capabilities, ChunkPrediction, StageSpec, check_flow_steps, require
from dapolicy.policies.coupling import COUPLING_MODES, CouplingTrace, coupled_generation, sample_policy
from dapolicy.policies.dap_config import NEXT_OBS_SOURCES, DAPConfig
from dapolicy.policies.fm import FMPolicy
from dapolicy.policies.normalizer import MinMaxNormalizer
from dapolicy.spec import EnvSpec


class DAPPolicy(FMPolicy):
    """Dynamics-Aligned Flow Matching Policy."""

    method = "dap"
    config_class = DAPConfig
    capabilities = Capabilities(predicts_next_obs=True, modes=COUPLING_MODES, has_trace=True)
    with_next_obs = True

    def __init__(self, config: DAPConfig, spec: EnvSpec) -> None:
        super().__init__(config, spec)
        self.dynamics = LatentDynamicsDiT(config.dynamics, len(spec.cameras), self.latent_channels,
                                          self.latent_size, spec.action_dim, config.horizon,
                                          spec.proprio_dim * config.n_obs_steps)
        # The dynamics model trains on every episode (random actions included): its own statistics.
        self.dynamics_action_normalizer = MinMaxNormalizer(spec.action_dim)
        self.dynamics_proprio_normalizer = MinMaxNormalizer(spec.proprio_dim)

    @property
    def uses_vae(self) -> bool:
        return True  # the dynamics model lives in the VAE's latent space

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> tuple[StageSpec, ...]:
        dynamics = StageSpec("dynamics", sources=self.config.dynamics_sources, inputs=("latents",))
        policy = self._policy_stage()
        if "latents" not in policy.inputs and self._needs_next_latents:
            policy = StageSpec(policy.name, policy.sources, policy.success_only, inputs=(*policy.inputs, "latents"))
        return (self._vae_stage(), dynamics, policy)

    @property
    def _needs_next_latents(self) -> bool:
        return self.config.next_obs_mix.null < 1.0

    def stage_module(self, stage: str) -> nn.Module:
        return self.dynamics if stage == "dynamics" else super().stage_module(stage)

    def normalizers_by_stage(self) -> dict[str, tuple[MinMaxNormalizer, MinMaxNormalizer]]:
        return {**super().normalizers_by_stage(),
                "dynamics": (self.dynamics_action_normalizer, self.dynamics_proprio_normalizer)}

    def policy_to_dynamics_action(self) -> tuple[Tensor, Tensor]:
        """(scale, shift): a policy-normalised action chunk a -> a * scale + shift in the dynamics model's units
        (the two models' statistics differ: the policy's cover expert actions, the dynamics model's all)."""
        ones = torch.ones(self.spec.action_dim, device=self.device)
        shift = self.dynamics_action_normalizer.normalize(self.action_normalizer.unnormalize(0 * ones))
        scale = self.dynamics_action_normalizer.normalize(self.action_normalizer.unnormalize(ones)) - shift
        return scale, shift

    def dynamics_proprio(self, proprio: Tensor) -> Tensor:
        """Raw proprio [B, T_o, P] -> the dynamics model's flattened, normalised proprio [B, T_o * P]."""
        return self.dynamics_proprio_normalizer.normalize(proprio).flatten(1)

    # ------------------------------------------------------------------ losses
    def compute_loss(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        if stage == "dynamics":
            return self._dynamics_loss(batch)
        return super().compute_loss(batch, stage)

    def _dynamics_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        latents = require(batch, "latents", 6)
        proprio = self.dynamics_proprio(require(batch, "proprio", 3))
        action = self.dynamics_action_normalizer.normalize(require(batch, "action", 3))
        return latents[:, -1], proprio, action

    def _dynamics_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        current, proprio, action = self._dynamics_inputs(batch)
        target_latents = require(batch, "next_latents", 5)
        b = current.shape[0]
        tau = sample_tau(b, self.config.flow, device=current.device)
        z_tau, target = training_pair(target_latents, tau)
        drop = torch.rand(b, device=current.device) < self.config.action_dropout
        v = self.dynamics(z_tau, tau, current, action, proprio, drop_action=drop)
        flow = flow_loss(v, target)
        if self.config.action_contrast <= 0 or b < 2:
            return {"loss": flow}
        # Another window's chunk for every sample (a random derangement), same noisy latents and tau.
        other = action[(torch.arange(b, device=action.device) + torch.randint(1, b, (1,), device=action.device)) % b]
        v_other = self.dynamics(z_tau, tau, current, other, proprio)
        contrast = action_contrast_loss(per_sample_flow_error(v, target), per_sample_flow_error(v_other, target), ~drop,
                                        self.config.action_contrast_margin)
        return {"loss": flow + self.config.action_contrast * contrast, "flow_loss": flow.detach(),
                "action_contrast": contrast.detach()}

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
        action = self.action_normalizer.normalize(require(batch, "action", 3))
        b = action.shape[0]
        image_keep = self._current_image_keep(b, action.device)
        tokens = self.observation_tokens(batch, augment=True, image_keep=image_keep)
        tau = sample_tau(b, self.config.flow, device=action.device)
        noise = torch.randn_like(action)
        a_tau, target = interpolate(action, noise, tau), velocity_target(action, noise)
        shares = torch.tensor(self.config.next_obs_mix.shares)
        source = torch.multinomial(shares, b, replacement=True).to(action.device)
        if image_keep is not None:  # a sample that hides the current images must see a prediction
            shown = shares.clone()
            shown[NEXT_OBS_SOURCES.index("null")] = 0
            redraw = torch.multinomial(shown, b, replacement=True).to(action.device)
            source = torch.where(image_keep, source, redraw)
        next_latents, null = self._training_next_obs(batch, tokens, noise, tau, source, image_keep)
        next_tok = self.next_observation_tokens(next_latents, b, null_mask=null)
        v = self.policy_net.unet(a_tau, tau, static_tokens=tokens, dynamic_tokens=next_tok)
        out = {"loss": flow_loss(v, target)}
        out.update({f"share_{name}": (source == i).float().mean() for i, name in enumerate(NEXT_OBS_SOURCES)
                    if shares[i] > 0})
        if image_keep is not None:
            out["images_hidden"] = (~image_keep).float().mean()
        return out

    def next_observation_tokens(self, next_latents: Tensor | None, b: int, null_mask: Tensor | None = None) -> Tensor:
        """The policy's tokens of a next-observation estimate (latents [B, C, c, h, w] or None = null), read as
        `next_obs_reader` says: latent patches, or the frozen VAE's decoded frames through the policy's ResNet."""
        next_obs = next_latents
        if next_latents is not None and self.config.next_obs_reader == "image":
            with torch.no_grad():  # the VAE is frozen; the ResNet that reads the frames learns
                frames = self.vae.from_latent(next_latents.flatten(0, 1)).clamp(-1.0, 1.0)
            next_obs = frames.view(*next_latents.shape[:2], *frames.shape[1:])
        return self.policy_net.next_tokens(next_obs, b, null_mask=null_mask)

    def _current_image_keep(self, b: int, device: torch.device) -> Tensor | None:
        """[B] mask of the samples whose current images the policy sees (`current_image_dropout`), or None."""
        if self.config.current_image_dropout <= 0:
            return None
        return torch.rand(b, device=device) >= self.config.current_image_dropout

    def _training_next_obs(self, batch: Mapping[str, Tensor], tokens: Tensor, noise: Tensor, tau: Tensor,
                           source: Tensor, image_keep: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """(next latents [B, C, c, h, w] or None, null mask [B]) as `next_obs_mix` draws them per sample.

        image_keep: the samples whose current images the policy sees (`current_image_dropout`). A rollout runs
        with the images in view, as at inference; a hidden sample that its rollout would hand no estimate
        (the first Jacobi step) gets the dynamics estimate instead, so it never sees the null observation.
        """
        null = source == NEXT_OBS_SOURCES.index("null")
        if bool(null.all()):
            return None, null
        next_latents = require(batch, "next_latents", 5).clone()
        use_dyn = source == NEXT_OBS_SOURCES.index("dynamics")
        if use_dyn.any():
            sub = {k: v[use_dyn] for k, v in batch.items() if k in ("latents", "proprio", "action", "next_latents")}
            next_latents[use_dyn] = self._dynamics_estimate(sub)
        use_roll = source == NEXT_OBS_SOURCES.index("rollout")
        if use_roll.any():
            sub = {k: v[use_roll] for k, v in batch.items() if k in ("latents", "proprio")}
            if image_keep is not None and not bool(image_keep[use_roll].all()):
                with torch.no_grad():  # the rollout inference would run: current images in view
                    roll_tokens = self.observation_tokens({k: v[use_roll] for k, v in batch.items()}, augment=True)
            else:
                roll_tokens = tokens[use_roll].detach()
            z_hat, first = self._rollout_estimate(sub, roll_tokens, noise[use_roll], tau[use_roll])
            next_latents[use_roll] = z_hat
            null = null.clone()
            null[use_roll] = first
            if image_keep is not None:
                blind = null & ~image_keep
                if blind.any():
                    sub = {k: v[blind] for k, v in batch.items() if k in ("latents", "proprio", "action",
                                                                         "next_latents")}
                    next_latents[blind] = self._dynamics_estimate(sub)
                    null[blind] = False
        return next_latents, null

    def _policy_velocity(self, tokens: Tensor, b: int) -> Callable[[Tensor, float, Tensor | None], Tensor]:
        """The policy network as the velocity function `coupling.py` takes, its observation keys/values
        projected once (the plain path, for training-time rollouts and diagnostics; inference uses the fast
        sampler)."""
        context = self.policy_net.unet.prepare_context(tokens)

        def policy_velocity(a: Tensor, t: float, z_hat: Tensor | None) -> Tensor:
            return self.policy_net.unet(a, torch.full((b,), t, device=a.device), static=context,
                                        dynamic_tokens=self.next_observation_tokens(z_hat, b))

        return policy_velocity

    @torch.no_grad()
    def _rollout_estimate(self, batch: Mapping[str, Tensor], tokens: Tensor, a_noise: Tensor, tau: Tensor,
                          z_noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The next-observation estimate the policy is handed at flow time `tau` when sampling from `a_noise`.

        Runs the coupled sampler (config's coupling mode and K, live policy network, frozen dynamics model)
        and picks, per sample, the estimate conditioning the policy at step k = floor(tau * K): the trace's
        z_hat of step k - 1 (Jacobi / Gauss-Seidel), the final prediction (predict-then-act). Returns
        (estimates, mask of samples that see no estimate: step 0 of Jacobi / Gauss-Seidel).
        Jacobi / Gauss-Seidel run each sample only as far as its step needs, in two groups (early / late
        steps) rather than K steps for all: ~40% fewer network calls at uniform tau, the same numbers.
        """
        mode, steps = self.config.coupling, self.config.flow.steps
        b = a_noise.shape[0]
        z0 = z_noise if z_noise is not None else torch.randn(
            b, len(self.spec.cameras), self.latent_channels, self.latent_size, self.latent_size, device=a_noise.device)
        step = (tau * steps).floor().long().clamp(0, steps - 1)
        if mode == "off":
            return torch.zeros_like(z0), torch.ones(b, dtype=torch.bool, device=z0.device)
        current, proprio = batch["latents"][:, -1], self.dynamics_proprio(batch["proprio"])
        scale, shift = self.policy_to_dynamics_action()
        was_training = self.policy_net.training
        self.policy_net.eval()

        def trace_of(rows: Tensor, stop_after: int | None) -> tuple[CouplingTrace, Tensor | None]:
            n = int(rows.numel())
            policy_velocity = self._policy_velocity(tokens[rows], n)

            def dynamics_velocity(z: Tensor, t: float, a_hat: Tensor | None) -> Tensor:
                a_dyn = None if a_hat is None else a_hat * scale + shift
                return self.dynamics(z, torch.full((n,), t, device=z.device), current[rows], a_dyn, proprio[rows])

            trace = CouplingTrace()
            _, z_final = coupled_generation(dynamics_velocity, policy_velocity, z0[rows], a_noise[rows], steps, mode,
                                            trace, stop_after=stop_after)
            return trace, z_final

        try:
            if mode == "predict_then_act":
                _, z_final = trace_of(torch.arange(b, device=z0.device), None)
                return z_final, torch.zeros(b, dtype=torch.bool, device=z0.device)
            picked = torch.zeros_like(z0)
            middle = steps // 2
            for low, high in ((1, middle), (middle + 1, steps - 1)):  # the estimate of step j - 1 needs j steps
                rows = ((step >= low) & (step <= high)).nonzero().flatten()
                if rows.numel():
                    trace, _ = trace_of(rows, int(step[rows].max()))
                    z_hats = torch.stack(trace.z_hat)  # [steps run, n, ...]: z_hat of step j conditions step j + 1
                    picked[rows] = z_hats[step[rows] - 1, torch.arange(rows.numel(), device=z0.device)]
            return picked, step == 0
        finally:  # the rollout samples as inference does; training goes on in the mode it was in
            self.policy_net.train(was_training)

    # ------------------------------------------------------------------ the dynamics model alone
    @torch.no_grad()
    def predict_next(self, obs: Mapping[str, object], actions: object | None, steps: int | None = None,
                     generator: torch.Generator | None = None) -> np.ndarray:
        """Predicted frames o_{t+k} uint8 [B, C, S, S, 3] for given action chunks [B, H, A] in env units
        (None = the action-agnostic mode), by integrating the dynamics model alone: what `dap diagnose` uses to
        measure how much the prediction depends on the action."""
        self.eval()
        batch = self.encode_observation(self.validate_obs(obs), need_latents=True)
        b = batch["proprio"].shape[0]
        action = None
        if actions is not None:
            action = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=self.device)
            if tuple(action.shape) != (b, self.config.horizon, self.spec.action_dim):
                raise ValueError(f"actions must be [{b}, {self.config.horizon}, {self.spec.action_dim}], got "
                                 f"{tuple(action.shape)}")
            action = self.dynamics_action_normalizer.normalize(action)
        current = batch["latents"][:, -1]
        proprio = self.dynamics_proprio(batch["proprio"])
        steps = check_flow_steps(steps) or self.config.flow.steps
        z = torch.randn(current.shape, generator=generator, device=self.device)
        for tau in time_grid(steps):
            v = self.dynamics(z, torch.full((b,), tau, device=z.device), current, action, proprio)
            z = euler_step(z, v, 1.0 / steps)
        return self.decode_latents(z).cpu().numpy()

    @torch.no_grad()
    def act_given_next(self, obs: Mapping[str, object], next_images: object | None, steps: int | None = None,
                       generator: torch.Generator | None = None) -> np.ndarray:
        """Action chunks [B, H, A] (env units) from the policy alone, conditioned on fixed next frames o_{t+k}
        (uint8 [B, C, S, S, 3]; None = the null next observation). `dap diagnose` uses it to measure how much
        the policy relies on the next observation: with the real future, a shuffled one, or none."""
        self.eval()
        batch = self.encode_observation(self.validate_obs(obs), need_latents=False)
        b = batch["proprio"].shape[0]
        z_cond = None
        if next_images is not None:
            frames = np.asarray(next_images)
            expected = (b, len(self.spec.cameras), self.spec.image_size, self.spec.image_size, 3)
            if frames.shape != expected or frames.dtype != np.uint8:
                raise ValueError(f"next_images must be uint8 {list(expected)}, got {frames.dtype} "
                                 f"{list(frames.shape)}")
            z_cond = self.encode_latents(frames)
        policy_velocity = self._policy_velocity(self.observation_tokens(batch, augment=False), b)
        shape = (b, self.config.horizon, self.spec.action_dim)
        a0 = torch.randn(shape, generator=generator, device=self.device)  # as predict_chunk draws it
        a = sample_policy(policy_velocity, a0, check_flow_steps(steps) or self.config.flow.steps, z_cond)
        return self.action_normalizer.unnormalize(a).cpu().numpy()

    # ------------------------------------------------------------------ inference
    def _predict(self, batch: dict[str, Tensor], return_next: bool, mode: str | None, steps: int | None,
                 return_trace: bool, generator: torch.Generator | None) -> ChunkPrediction:
        # Algorithm 1 (reference: coupling.coupled_generation) on the fast sampler, which computes the same
        # numbers with every per-call constant hoisted, the unused last dynamics call skipped and, for
        # Jacobi, both models of a step run concurrently.
        from dapolicy.policies import fast_sampler

        mode = mode or self.config.coupling
        a, z, trace = fast_sampler.predict(self, batch, return_next, mode, steps or self.config.flow.steps,
                                           return_trace, generator)
        next_frames = self.decode_latents(z).cpu().numpy() if return_next and z is not None else None
        return ChunkPrediction(self.action_normalizer.unnormalize(a).cpu().numpy(), next_frames, trace)


def _method():  # -> registry.Method (imported late: the registry imports this module)
    from dapolicy.policies.dap_config import DAP_CONFIGS
    from dapolicy.policies.registry import Method

    return Method("dap", "Dynamics-Aligned Flow Matching Policy: policy + action-conditioned dynamics, coupled",
                  DAPConfig, DAPPolicy, DAP_CONFIGS)


METHOD = _method()


def action_contrast_loss(error_true: Tensor, error_other: Tensor, counted: Tensor, margin: float) -> Tensor:
    """Hinge on how much better the true action explains the future than another one: mean over the counted
    samples of max(0, margin + error_true - error_other); zero once every counted gap reaches the margin."""
    hinge = torch.relu(margin + error_true - error_other) * counted.to(error_true.dtype)
    return hinge.sum() / counted.sum().clamp_min(1)
