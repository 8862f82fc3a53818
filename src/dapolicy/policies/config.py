"""DAPConfig and the named configurations `tiny` (tests), `small` (CPU default) and `paper` (~370M).

Shapes that come from the task (cameras, image size, action and proprio dims) are not here: they come from
the EnvSpec the policy is built with, so one config serves every task.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from dapolicy.flow import FlowConfig
from dapolicy.nn.dit import DiTConfig
from dapolicy.nn.encoders import ResNetGNConfig
from dapolicy.nn.unet1d import UNet1DConfig
from dapolicy.nn.vae import VAEConfig

Method = Literal["dap", "fm"]
Coupling = Literal["jacobi", "gauss_seidel", "predict_then_act", "off"]
COUPLING_MODES: tuple[str, ...] = ("jacobi", "gauss_seidel", "predict_then_act", "off")
ObsEncoder = Literal["vae", "resnet"]


@dataclass
class NextObsMix:
    """What the policy sees as the next observation during training (DESIGN §1.4); shares sum to 1.

    ground_truth: the real next latents.
    dynamics: the frozen dynamics model's extrapolated estimate at a random tau' (no gradient).
    null: the learned null tokens, so the policy also works with no prediction.
    """

    ground_truth: float = 0.4
    dynamics: float = 0.5
    null: float = 0.1

    def __post_init__(self) -> None:
        shares = (self.ground_truth, self.dynamics, self.null)
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"next_obs_mix shares must be >= 0 and sum to 1, got {shares}")


@dataclass
class DAPConfig:
    """Everything that defines a DAP (or plain flow-matching) policy, apart from the task's shapes.

    method: "dap" (policy + dynamics model, coupled) or "fm" (the same policy without dynamics: baseline).
    n_obs_steps: T_o, observation frames given to the policy.
    horizon: H, actions per predicted chunk.
    n_action_steps: T_a, actions executed before re-planning (receding horizon).
    next_obs_offset: k, the predicted observation is o_{t+k}; None = n_action_steps.
    obs_encoder: how the policy tokenises current images: "vae" (frozen VAE latent patches, cheap) or
        "resnet" (a ResNet-GroupNorm trained end to end, one per camera).
    token_dim: width of all observation tokens the policy cross-attends to.
    coupling: default generation mode (Algorithm 1): jacobi | gauss_seidel | predict_then_act | off.
    action_dropout: probability of replacing the dynamics model's action condition by the null token.
    next_obs_mix: the policy's training sources for the next observation.
    image_shift: random-shift augmentation (pixels at 64 px, scaled with size) for the "resnet" encoder;
        latent_shift: the same on cached latents (in latent pixels) for the "vae" encoder; 0 = off.
    """

    method: Method = "dap"
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    next_obs_offset: int | None = None
    obs_encoder: ObsEncoder = "vae"
    token_dim: int = 128
    coupling: Coupling = "jacobi"
    action_dropout: float = 0.1
    next_obs_mix: NextObsMix = field(default_factory=NextObsMix)
    image_shift: int = 4
    latent_shift: int = 0
    flow: FlowConfig = field(default_factory=FlowConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dynamics: DiTConfig = field(default_factory=DiTConfig)
    unet: UNet1DConfig = field(default_factory=UNet1DConfig)
    resnet: ResNetGNConfig = field(default_factory=ResNetGNConfig)

    def __post_init__(self) -> None:
        if self.method not in ("dap", "fm"):
            raise ValueError(f"method must be 'dap' or 'fm', got {self.method!r}")
        if self.coupling not in COUPLING_MODES:
            raise ValueError(f"coupling must be one of {COUPLING_MODES}, got {self.coupling!r}")
        if self.obs_encoder not in ("vae", "resnet"):
            raise ValueError(f"obs_encoder must be 'vae' or 'resnet', got {self.obs_encoder!r}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}")
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if not 0.0 <= self.action_dropout < 1.0:
            raise ValueError(f"action_dropout must be in [0, 1), got {self.action_dropout}")
        if self.next_obs_offset is not None and self.next_obs_offset < 1:
            raise ValueError(f"next_obs_offset must be >= 1, got {self.next_obs_offset}")
        if self.method == "fm":
            # The plain flow policy never sees a prediction: train and sample it without one.
            self.coupling = "off"
            self.next_obs_mix = NextObsMix(ground_truth=0.0, dynamics=0.0, null=1.0)

    @property
    def next_offset(self) -> int:
        return self.next_obs_offset or self.n_action_steps

    @property
    def uses_dynamics(self) -> bool:
        return self.method == "dap"


def _tiny() -> DAPConfig:
    return DAPConfig(
        token_dim=32,
        vae=VAEConfig(base_channels=8, channel_mults=(1, 2, 2, 2), groups=4),
        dynamics=DiTConfig(hidden_dim=32, depth=1, heads=2),
        unet=UNet1DConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, tau_embed_dim=16, attn_heads=2),
        resnet=ResNetGNConfig(width=8, blocks=(1, 1, 1, 1), n_groups=4),
        flow=FlowConfig(steps=4),
    )


def _small() -> DAPConfig:
    """The CPU default (~4.5M parameters in all): sized so the quickstart trains in minutes on 2 cores."""
    return DAPConfig(
        token_dim=96,
        # No residual blocks at 64 and 32 px: full-resolution convolutions dominate the CPU cost.
        vae=VAEConfig(base_channels=8, channel_mults=(1, 2, 4, 8), blocks_per_level=(0, 0, 1, 1)),
        dynamics=DiTConfig(hidden_dim=128, depth=3, heads=4),
        unet=UNet1DConfig(down_dims=(48, 96, 192), kernel_size=5, n_groups=8, tau_embed_dim=96, attn_heads=4),
        resnet=ResNetGNConfig(width=32, blocks=(1, 1, 1, 1)),
    )


def _paper() -> DAPConfig:
    """~360M trainable parameters in all (VAE 39M, DiT 163M, policy 156M), like the paper's 369M."""
    return DAPConfig(
        token_dim=512,
        vae=VAEConfig(base_channels=128, channel_mults=(1, 2, 4, 4)),
        dynamics=DiTConfig(hidden_dim=768, depth=12, heads=12),
        unet=UNet1DConfig(down_dims=(384, 768, 1536), kernel_size=5, n_groups=8, tau_embed_dim=256,
                          attn_heads=8),
        resnet=ResNetGNConfig(width=64, blocks=(2, 2, 2, 2)),
    )


NAMED_CONFIGS = {"tiny": _tiny, "small": _small, "paper": _paper}


def get_config(name: str = "small", method: Method = "dap", **overrides: object) -> DAPConfig:
    """A named configuration, optionally as the FM baseline and with top-level fields overridden."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}: expected one of {sorted(NAMED_CONFIGS)}")
    return replace(NAMED_CONFIGS[name](), method=method, **overrides)
