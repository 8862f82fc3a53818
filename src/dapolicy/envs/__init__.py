"""Simulated tasks with scripted experts and out-of-distribution perturbations."""

from dapolicy.envs.base import Env, EnvSpec, Observation, StepResult, make_env

__all__ = ["Env", "EnvSpec", "Observation", "StepResult", "make_env"]
