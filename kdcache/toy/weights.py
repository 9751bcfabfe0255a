"""The toy world's stored weights, shipped in the package (kdcache/toy/weights/).

    tower.safetensors        the shared SigLIP tower after `pretrain.pretrain_tower` (float32)
    student-lm.safetensors   toy-student's Qwen2 LM after text-only pretraining (float16)
    teacher.safetensors      toy-teacher's LM and projector after text pretraining, PT and SFT (float16)
    weights.json             {name: {"file", "sha256", "dtype", "num_parameters"}, "build": {...}}

All three are produced by ``python -m kdcache.toy.build`` (kdcache/toy/build.py) from code and
seeds; weights.json records the command's plan. `load` checks a file's sha256 against weights.json
before reading it, so a damaged or swapped file is refused instead of silently giving another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdcache.errors import KdcacheError
from kdcache.files import sha256_file, write_json_atomic

WEIGHTS_DIR = Path(__file__).with_name("weights")
INDEX = "weights.json"
REBUILD = "python -m kdcache.toy.build"


def load(name: str, directory: Path = WEIGHTS_DIR) -> dict[str, torch.Tensor]:
    """The tensors of stored weights `name` (tower, student-lm, teacher), in float32, after a sha256 check."""
    from safetensors.torch import load_file

    index_path = directory / INDEX
    try:
        entry = json.loads(index_path.read_text())[name]
    except (OSError, ValueError, KeyError) as e:
        raise KdcacheError(f"the toy weights {name!r} are not in {index_path} ({type(e).__name__}); "
                           f"rebuild them with `{REBUILD}`") from None
    path = directory / entry["file"]
    if not path.is_file() or sha256_file(path)[1] != entry["sha256"]:
        raise KdcacheError(f"{path} is missing or its sha256 differs from {index_path}; "
                           f"rebuild the toy weights with `{REBUILD}`")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def save(tensors: dict[str, torch.Tensor], name: str, directory: Path, *, dtype: torch.dtype,
         build: dict | None = None) -> str:
    """Write `tensors` as directory/NAME.safetensors in `dtype` and record it in weights.json; returns its sha256."""
    from safetensors.torch import save_file

    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    save_file({k: v.detach().to(dtype).clone().contiguous() for k, v in tensors.items()}, str(path))   # clone: tied weights
    index_path = directory / INDEX
    with open(directory / ".weights.lock", "w") as lock:          # build steps may run in parallel processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        index[name] = {"file": path.name, "sha256": sha256_file(path)[1], "dtype": str(dtype).removeprefix("torch."),
                       "num_parameters": sum(v.numel() for v in tensors.values()), **({"build": build} if build else {})}
        write_json_atomic(index_path, index)
    return index[name]["sha256"]


def language_model_state(model) -> dict[str, torch.Tensor]:
    """The LM's weights of a LLaVA model (decoder and head), keyed as in the LLaVA model."""
    return {k: v for k, v in model.state_dict().items()
            if k.startswith(("model.language_model.", "lm_head."))}


def trained_state(model) -> dict[str, torch.Tensor]:
    """What training changes in a toy LLaVA model: the LM and the projector (the tower stays frozen)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
