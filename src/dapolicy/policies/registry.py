"""The method registry: name -> (config class, policy class, named sizes).

Adding a method = one module that defines `METHOD = Method(...)` (its config dataclass with training presets,
its `Policy` subclass, its tiny/small/paper configs) + one line in `METHOD_MODULES`. Every workflow (train,
eval, diagnose, bench, serve, info, quickstart) takes its choices from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from dapolicy.overrides import apply_overrides, closest, load_config_file
from dapolicy.spec import EnvSpec

# name -> module defining METHOD (imported on first use)
METHOD_MODULES: dict[str, str] = {
    "dap": "dapolicy.policies.dap",
    "fm": "dapolicy.policies.fm",
    "uva": "dapolicy.policies.uva",
    "pi0": "dapolicy.policies.pi0",
    "dp-c": "dapolicy.policies.dp_c",
    "dp-t": "dapolicy.policies.dp_t",
}
SIZES: tuple[str, ...] = ("tiny", "small", "paper")
MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class Method:
    """One registered method.

    name: what `--method` says. summary: one line for `dap info`. stand_in: a simplified stand-in for a
    published system (e.g. no pretrained VLM), labelled as such in tables.
    config_class, policy_class: the config dataclass and the `Policy` subclass.
    configs: named sizes -> a function returning a fresh config (every method has tiny, small, paper).
    """

    name: str
    summary: str
    config_class: type
    policy_class: type
    configs: Mapping[str, Callable[[], Any]]
    stand_in: bool = False

    def config(self, size: str = "small") -> Any:
        if size not in self.configs:
            raise ValueError(f"method {self.name!r} has no configuration {size!r}: expected one of "
                             f"{', '.join(self.configs)}")
        return self.configs[size]()


def method_names() -> tuple[str, ...]:
    return tuple(METHOD_MODULES)


def get_method(name: str) -> Method:
    """The registered method `name`; an unknown name is an error naming the closest ones."""
    if name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}{closest(name, list(METHOD_MODULES))} "
                         f"(methods: {', '.join(METHOD_MODULES)})")
    module = importlib.import_module(METHOD_MODULES[name])
    return module.METHOD


def make_config(method: str, size: str = "small", overrides: Iterable[str] | Mapping[str, Any] | None = None,
                config_file: str | Path | None = None) -> Any:
    """A method's named configuration with a config file's fields, then `--set` assignments, applied."""
    config = get_method(method).config(size)
    if config_file is not None:
        config = apply_overrides(config, load_config_file(config_file), what=f"{method} config")
    return apply_overrides(config, overrides, what=f"{method} config")


def make_policy(method: str, spec: EnvSpec, config: Any = None, size: str = "small") -> Any:
    """A freshly initialised policy of `method` for the task `spec`."""
    entry = get_method(method)
    return entry.policy_class(config if config is not None else entry.config(size), spec)


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder (holding `model/`) or a model folder itself -> the model folder."""
    path = Path(path)
    if (path / MODEL_SUBDIR / "config.json").is_file():
        return path / MODEL_SUBDIR
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run folder made by `dap train --out` (or its "
                                f"{MODEL_SUBDIR}/ folder)")
    if (path / "config.json").is_file() and ((path / "state.json").is_file() or (path / "checkpoints").is_dir()):
        raise FileNotFoundError(f"{path} is a run folder without a saved model: no stage has finished training; "
                                f"continue it with: dap train --out {path} --resume")
    raise FileNotFoundError(f"{path} holds no saved model (expected {path / MODEL_SUBDIR}/config.json, or a "
                            "model folder with config.json and model.safetensors)")


class UnfinishedRunError(ValueError):
    """A run folder whose later training stages never finished (a stopped or crashed `dap train`)."""


def check_run_finished(path: str | Path) -> None:
    """Refuse a run folder whose run has not trained every stage yet (one check for eval, diagnose, bench, serve).

    Its model/ is saved after every stage, so a stopped run still loads, but e.g. a DAP run stopped after
    the VAE holds a policy that never trained: evaluating, diagnosing or serving it reports noise as results.
    A model folder (RUN/model, or a copied one) is not checked: it is what a user passes to use it as it is.
    """
    from dapolicy.atomic import read_json

    run = Path(path)
    config_file, state_file = run / "config.json", run / "state.json"
    if not (run / MODEL_SUBDIR).is_dir() or not config_file.is_file():
        return  # a bare model folder: nothing says which stages it should have
    fix = f"pass the model folder {run / MODEL_SUBDIR} to use it as it is"
    config = read_json(config_file, fix)
    stages = config.get("stages") if isinstance(config, dict) else None
    if not isinstance(stages, list):
        return  # not a `dap train` run (or an older one): nothing to check against
    state = read_json(state_file, fix) if state_file.is_file() else {}
    done = set(state.get("stages_done", []) if isinstance(state, dict) else [])
    missing = [s for s in stages if s not in done]
    if missing:
        finished = [s for s in stages if s in done]
        raise UnfinishedRunError(
            f"{run} is an unfinished training run: stage(s) {', '.join(missing)} never finished (finished: "
            f"{', '.join(finished) or 'none'}); continue it with: dap train --out {run} --resume")


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load any method's saved model from a run folder or a model folder (config.json names the method)."""
    from dapolicy.policies.pretrained import read_header

    model_dir = resolve_model_dir(path)
    header = read_header(model_dir)
    method = header.get("method")
    if method not in METHOD_MODULES:
        raise ValueError(f"{model_dir}/config.json names method {method!r}, which this dapolicy does not know "
                         f"(methods: {', '.join(METHOD_MODULES)})")
    return get_method(method).policy_class.from_pretrained(model_dir, map_location=map_location)
