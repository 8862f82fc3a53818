"""Policies: every method implements the contract in `policies/base.py` and is listed in the registry.

    from dapolicy.policies import load_pretrained, make_config, make_policy
    policy = load_pretrained("runs/bp")                       # any method, from a run or model folder
    cfg = make_config("dap", "small", ["flow.steps=5"])       # a named size with dotted overrides
"""

from dapolicy.policies.base import Capabilities, ChunkPrediction, Policy, StagePreset, StageSpec, UnsupportedByMethod
from dapolicy.policies.dap import DAPPolicy
from dapolicy.policies.dap_config import DAPConfig, NextObsMix
from dapolicy.policies.fm import FMConfig, FMPolicy
from dapolicy.policies.registry import (
                                        SIZES,
                                        Method,
                                        get_method,
                                        load_pretrained,
                                        make_config,
                                        make_policy,
                                        method_names,
)

__all__ = ["Capabilities", "ChunkPrediction", "DAPConfig", "DAPPolicy", "FMConfig", "FMPolicy", "Method",
           "NextObsMix", "Policy", "SIZES", "StagePreset", "StageSpec", "UnsupportedByMethod", "get_method",
           "load_pretrained", "make_config", "make_policy", "method_names"]
