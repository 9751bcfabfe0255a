"""Job configuration plumbing: YAML file + command-line overrides -> one frozen dataclass.

The dataclasses themselves live with their jobs (`teacher_dump/config.py`,
`student_train/config.py`); this module only merges sources, so that each default is written once.
No torch import here: the CLI uses it before deciding what to load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdcache.errors import KdcacheError

C = TypeVar("C")


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML mapping of config fields (safe_load: no object construction)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KdcacheError(f"cannot read config {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdcacheError(f"config {path} must be a mapping of field: value, got {type(data).__name__}")
    return data


def build(cls: type[C], file_values: dict[str, Any], overrides: dict[str, Any]) -> C:
    """cls(**(dataclass defaults <- YAML <- flags given on the command line)).

    `overrides` holds only the flags the user actually passed (value not None).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise KdcacheError(f"unknown config keys {unknown}; known: {sorted(names)}")
    merged = dict(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**merged)
    except TypeError as e:
        raise KdcacheError(f"bad configuration: {e}") from None


def default_of(cls: type, name: str) -> Any:
    """The dataclass default of a field, for help texts."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
