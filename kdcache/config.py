"""Job configuration plumbing: YAML file + command-line overrides -> one frozen dataclass.

The dataclasses themselves live with their jobs (`teacher_dump/config.py`,
`student_train/config.py`), each field declared once with its ``metadata``: ``help``; ``ge`` /
``gt`` for a range; ``shown_default`` where help should show something other than the field's
default (a None filled in later). This module merges sources (`build`), checks values against their
declared types (`check_fields`, the one place a `Literal`'s choices are enforced) and describes
fields for the CLI (`field_help`).

Module-level imports are stdlib and kdcache.errors only: the dataclass modules import this one, and
the CLI imports them before deciding what to load (`kdcache --help` must not pull in torch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from kdcache.errors import KdcacheError

C = TypeVar("C")

# What a role's cached rows hold (`kdcache dump --visual-targets / --response-targets`; the manifest's `targets`):
# the teacher's top-k, or N draws from its full distribution (RS-KD). Torch-free, for the configs and the schema.
TargetKind = Literal["topk", "sampled"]
TARGET_KINDS = typing.get_args(TargetKind)

# The --dtype names (`models.resolve_dtype` maps them to torch dtypes); declared here, torch-free, for the configs.
DTypeName = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]

# Limits on one dataset or cache image, the defaults of both jobs' `max_image_mb` / `max_image_pixels` and of
# `kdcache.samples` (declared here, torch-free, for the configs). 50 M pixels decode to 150 MB of RGB.
MAX_IMAGE_MB = 64.0
MAX_IMAGE_PIXELS = 50_000_000
# The --device values: auto, or a torch device type with an optional index (checked before torch is imported).
DEVICE_PATTERN = r"auto|cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?"


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML mapping of config fields (safe_load: no object construction)."""
    if path is None:
        return {}
    import yaml  # here, not at the top: the dataclass modules import this module and stay stdlib-only

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


def save_yaml(config: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, evaluated: the dataclass modules use `from __future__ import annotations`."""
    return typing.get_type_hints(cls)


def value_type(tp: Any) -> Any:
    """The type a field holds when it is set: ``int | None`` -> int; a Literal stays itself."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def is_text_list(tp: Any) -> bool:
    """A ``tuple[str, ...]`` field: a repeatable flag (``--x A --x B``), a list in YAML."""
    return typing.get_origin(value_type(tp)) is tuple and typing.get_args(value_type(tp)) == (str, Ellipsis)


def choices_of(tp: Any) -> tuple | None:
    """The values a Literal field allows (``TemplateName | None`` -> its names), None for other types."""
    tp = value_type(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise KdcacheError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def check_fields(config: Any) -> None:
    """Refuse a field value outside its Literal, its type or its declared range.

    Numbers: the type (an int is a fine float, a bool is only a bool), finite (NaN always refused,
    infinity unless the field's metadata says ``allow_inf``), then ``ge`` / ``gt`` / ``le`` from the
    metadata. Text: a non-empty string without NUL characters, matching ``pattern`` if the metadata
    has one, and not a URL where the metadata says ``local``. Call it first in a config's ``__post_init__``. None means "unset" and is not checked: a
    field that may be None says so in its type.
    """
    hints = field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        tp = value_type(hints[f.name])
        choices = choices_of(tp)
        if choices is not None:
            check_choice(f.name, value, choices)
        elif tp in (bool, int, float):
            _check_number(f.name, value, tp, f.metadata)
        elif tp is str:
            _check_text(f.name, value, f.metadata)
        elif is_text_list(tp):                      # a repeatable flag: each value checked as a text field
            if not isinstance(value, (list, tuple)):
                raise KdcacheError(f"{f.name} must be a list of text values, got {value!r}")
            for item in value:
                _check_text(f.name, item, f.metadata)


def _check_number(name: str, value: Any, tp: type, metadata: Any) -> None:
    # bool is an int subclass: accept it only for bool fields; an int is a fine float.
    accepted = (int, float) if tp is float else (tp,)
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, accepted):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise KdcacheError(f"{name} must be a {tp.__name__}, got {value!r}{hint}")
    if tp is float:
        try:
            as_float = float(value)
        except OverflowError:                       # an int too large for a float
            raise KdcacheError(f"{name} must be a finite number, got {value}") from None
        if math.isnan(as_float) or (math.isinf(as_float) and not metadata.get("allow_inf", False)):
            raise KdcacheError(f"{name} must be a finite number, got {value}")
    if "ge" in metadata and value < metadata["ge"]:
        raise KdcacheError(f"{name} must be >= {metadata['ge']}, got {value}")
    if "gt" in metadata and value <= metadata["gt"]:
        raise KdcacheError(f"{name} must be > {metadata['gt']}, got {value}")
    if "le" in metadata and value > metadata["le"]:
        raise KdcacheError(f"{name} must be <= {metadata['le']}, got {value}")


def _check_text(name: str, value: Any, metadata: Any) -> None:
    if not isinstance(value, str):
        raise KdcacheError(f"{name} must be text, got {value!r}")
    if not value.strip():
        raise KdcacheError(f"{name} must not be empty")
    if "\x00" in value:
        raise KdcacheError(f"{name} must not contain a NUL character, got {value!r}")
    if metadata.get("local") and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        # `Path("s3://bucket/x")` is the local folder "s3:/bucket/x": refuse rather than write there
        raise KdcacheError(f"{name} {value!r} is a URL; kdcache writes {name} to a local directory "
                           "(write it locally, then copy it to object storage)")
    pattern = metadata.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise KdcacheError(f"unknown {name} {value!r}; expected {metadata.get('pattern_help', pattern)}")


def show(value: Any) -> str:
    """A default as help shows it: 512 not 512.0, on/off for switches."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def field_help(cls: type, f: dataclasses.Field) -> str:
    """A field's help text, its choices and its default (none shown for a plain None)."""
    parts = [f.metadata.get("help", "")]
    choices = choices_of(field_types(cls)[f.name])
    if choices is not None:
        parts.append(f"[choices: {' | '.join(choices)}]")  # spaces: long lists wrap between names
    if "shown_default" in f.metadata:
        parts.append(f"[default: {f.metadata['shown_default']}]")
    elif f.default is dataclasses.MISSING:
        parts.append("[required: a flag or --config]")
    elif f.default is not None:
        parts.append(f"[default: {show(f.default)}]")
    return "  ".join(p for p in parts if p)   # two spaces before brackets, as typer writes its own
