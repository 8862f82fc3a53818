"""Saving and loading models as a folder: `config.json` (format version, class, config, task spec) and
`model.safetensors` (weights + normaliser statistics). Shared by every policy class.

Both files are written to temporary names and moved into place, weights first, so an interrupted save
never leaves a folder whose config points at missing or partial weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dapolicy.atomic import write_json_atomic

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_folder(model: nn.Module, directory: str | os.PathLike, header: dict[str, Any]) -> Path:
    """Write weights then config atomically; `header` holds the class name, config and spec."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    os.replace(tmp, directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, {"format_version": FORMAT_VERSION, **header})
    return directory


def read_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a saved model, checked for presence and version."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved model: {CONFIG_FILE} is missing")
    try:
        header = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt (not valid JSON: {err})") from err
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {version!r} (this dapolicy reads {FORMAT_VERSION})")
    return header


def load_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load `model.safetensors` strictly: missing, extra or mis-shaped tensors raise a clear error."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers / sizes
        raise ValueError(f"{path} is corrupt or truncated: {err}") from err
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, "
                             f"the config expects {tuple(own[key].shape)}")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
