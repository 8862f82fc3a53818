"""Any config field from the command line or a file, by dotted name (`--set next_obs_mix.null=0.2`).

Works on every config dataclass (each method's config, TrainConfig): a value is parsed as JSON where it can
be (numbers, true/false, null, lists), else taken as a string; the result is rebuilt through
`configuration.from_dict`, so every field's own validation runs. An unknown name is an error that names the
closest valid ones.
"""

from __future__ import annotations

import ast
import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from dapolicy.configuration import from_dict, to_dict

T = TypeVar("T")


class OverrideError(ValueError):
    """A `--set` assignment or config file names an unknown field or gives an invalid value."""


def dotted_names(config: Any) -> list[str]:
    """Every settable leaf field of a (nested) config dataclass, as dotted names."""
    out: list[str] = []

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for key, value in d.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out.append(name)

    walk(to_dict(config), "")
    return out


def parse_value(text: str) -> Any:
    """JSON first ("3", "0.5", "true", "null", "[1, 2]"), then Python literals ("True", "(1, 2)"), else text."""
    text = text.strip()
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text


def parse_assignments(assignments: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """["a.b=1", ...] (or a mapping) -> {"a.b": parsed value}."""
    if assignments is None:
        return {}
    if isinstance(assignments, Mapping):
        return dict(assignments)
    out: dict[str, Any] = {}
    for item in assignments:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise OverrideError(f"--set expects NAME=VALUE (e.g. flow.steps=5), got {item!r}")
        out[name.strip()] = parse_value(value)
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (from a config file) -> dotted assignments."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file of config fields (nested tables or dotted keys) -> dotted assignments."""
    path = Path(path)
    if not path.is_file():
        raise OverrideError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # a parser's own error types
        raise OverrideError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                            f"{err}") from err
    if not isinstance(data, dict):
        raise OverrideError(f"config file {path} must hold a table/object of fields")
    # A whole saved config (e.g. a model's config.json) holds the fields under "config".
    if "config" in data and isinstance(data["config"], dict) and "format_version" in data:
        data = data["config"]
    return flatten(data)


def _coerce(name: str, current: Any, value: Any) -> Any:
    """Give `value` the type of the field's current value where that is unambiguous."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise OverrideError(f"{name} is a true/false field, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, float):
        if not value.is_integer():
            raise OverrideError(f"{name} is an integer field, got {value!r}")
        return int(value)
    if isinstance(current, str) and not isinstance(value, str) and value is not None:
        return str(value)
    if isinstance(current, (int, float)) and isinstance(value, str):
        raise OverrideError(f"{name} is a number field, got {value!r}")
    return value


def closest(name: str, names: list[str], n: int = 3) -> str:
    """"; did you mean a, b?" for the closest valid names (also matching on the last component)."""
    near = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    leaf = name.rsplit(".", 1)[-1]
    near += [c for c in names if c.rsplit(".", 1)[-1] == leaf and c not in near]
    return f"; did you mean {', '.join(near[:n])}?" if near else ""


def apply_overrides(config: T, assignments: Iterable[str] | Mapping[str, Any] | None,
                    what: str = "config") -> T:
    """A copy of `config` with the dotted assignments applied and validated."""
    values = parse_assignments(assignments)
    if not values:
        return config
    data = to_dict(config)
    names = dotted_names(config)
    for name, value in values.items():
        parts = name.split(".")
        node = data
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise OverrideError(f"unknown {what} field {name!r}{closest(name, names)}")
            if i == len(parts) - 1:
                if isinstance(node[part], dict) and not isinstance(value, dict):
                    fields = ", ".join(f"{name}.{k}" for k in node[part])
                    raise OverrideError(f"{name} is a group of fields; set one of them: {fields}")
                node[part] = _coerce(name, node[part], value)
            else:
                node = node[part]
    try:
        return from_dict(type(config), data, what)
    except OverrideError:
        raise
    except (ValueError, TypeError) as err:
        raise OverrideError(f"invalid {what} after --set {', '.join(f'{k}={v!r}' for k, v in values.items())}: "
                            f"{err}") from err


def differences(a: Any, b: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names whose values differ between two configs of one class (prefixes in `ignore` skipped)."""
    da, db = flatten(to_dict(a)), flatten(to_dict(b))
    keys = sorted(set(da) | set(db))
    return [k for k in keys if da.get(k) != db.get(k) and not k.startswith(ignore)]
