"""Model presets: the names `load_bundle` accepts besides a checkpoint directory or a hub id.

A preset names its loader as a "module:function" string that `loader_of` imports only when the
preset is loaded. So this registry imports nothing heavy (the CLI can list it without torch), and
`kdcache.models` never imports the toy world: kdcache.toy builds on kdcache.models, not the other
way round. Every loader is called as ``loader(name, dtype=..., trust_remote_code=...)`` and returns
a `models.Bundle` whose projector is fresh (untrained).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
HUB_LOADER = "kdcache.models:compose_preset"
TOY_LOADER = "kdcache.toy.models:load_toy"


@dataclass(frozen=True)
class Preset:
    loader: str                    # "module:function"
    description: str               # one line, shown where presets are listed or refused
    repos: tuple[str, ...] = ()    # hub-composed presets: (vision tower id, LLM id); () for built ones


def hub_preset(vision_id: str, llm_id: str) -> Preset:
    """A SigLIP tower and an LLM from the hub, joined by `models.compose_preset` with a fresh projector."""
    return Preset(HUB_LOADER, f"{vision_id} + {llm_id}, fresh projector", (vision_id, llm_id))


PRESETS: dict[str, Preset] = {
    "qwen1.5-0.5b": hub_preset(SIGLIP_SO400M, "Qwen/Qwen1.5-0.5B"),
    "qwen1.5-1.8b": hub_preset(SIGLIP_SO400M, "Qwen/Qwen1.5-1.8B"),
    "qwen1.5-4b": hub_preset(SIGLIP_SO400M, "Qwen/Qwen1.5-4B"),
    "qwen2.5-0.5b": hub_preset(SIGLIP_SO400M, "Qwen/Qwen2.5-0.5B"),
    "qwen2.5-1.5b": hub_preset(SIGLIP_SO400M, "Qwen/Qwen2.5-1.5B"),
    "qwen2.5-3b": hub_preset(SIGLIP_SO400M, "Qwen/Qwen2.5-3B"),
    "toy-teacher": Preset(TOY_LOADER, "the toy world's trained teacher, from the stored weights (kdcache.toy.models, kdcache.toy.build)"),
    "toy-student": Preset(TOY_LOADER, "the toy world's student: stored tower and text-pretrained LM, fresh projector (kdcache.toy.models)"),
}


def loader_of(preset: Preset) -> Callable:
    """Import and return the function `preset.loader` names."""
    module, _, function = preset.loader.partition(":")
    return getattr(importlib.import_module(module), function)
