"""Policies: DAP and its plain flow-matching ablation (more baselines plug in here with the same contract)."""

from dapolicy.policies.config import DAPConfig, NextObsMix, get_config
from dapolicy.policies.dap import DAPPolicy

__all__ = ["DAPConfig", "DAPPolicy", "NextObsMix", "get_config"]
