"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

RUN/checkpoints/step-000123/
    trainable.safetensors   the trainable (requires_grad) parameters as full tensors, keyed by FQN; frozen
                            ones come from the student source
    optimizer.safetensors   AdamW state as full tensors keyed "{fqn}.{slot}": exp_avg and exp_avg_sq shaped
                            like the parameter, step a 0-d float
    rng.safetensors         torch CPU (and CUDA) generator states of the writing rank (rank 0)
    state.json              step, sampler and scheduler state, "cache" (the identity of the cache trained from:
                            "sha256:<hex>" of its manifest.json), and "optimizer": {"param_groups": [...]}, the
                            hyper-parameters of each group with its parameters' FQNs in the optimizer's order

Gathering and scattering go through torch.distributed.checkpoint.state_dict (get_state_dict /
set_*_state_dict with full_state_dict=True), which handles plain modules and FSDP2 (DTensor) alike:
the files hold full tensors, so a checkpoint written by N ranks loads into any number of ranks.

A checkpoint is written to a temporary directory and renamed into place, so a run killed while
saving resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from kdcache.errors import KdcacheError

STEP_DIR = re.compile(r"^step-(\d{9})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (temporary directories are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").exists())
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, *, keep: int = 2, write: bool = True, cache: str | None = None) -> Path:
    """Write one checkpoint atomically and keep only the newest `keep`.

    `module` holds the optimizer's parameters (possibly FSDP-sharded). Under a process group the
    gather is a collective: every rank calls this and rank 0, the only one that receives the full
    tensors (cpu_offload), is the one with `write=True`. Call it after an optimizer step: on an
    optimizer without state, get_state_dict initialises one with an lr=0 step. `cache` is the identity of
    the cache the run trains from (recorded as "cache"; `load_checkpoint` refuses another).
    """
    if write and distributed() and dist.get_rank() != 0:
        raise ValueError("only rank 0 receives the gathered state: write=True belongs to rank 0")
    # full tensors on CPU, each shaped like its parameter (under a process group only rank 0's dicts are
    # non-empty). Buffers and tied aliases of frozen weights survive ignore_frozen_params, and a trainable
    # tied weight comes under both names sharing storage (which save_file refuses): hence the filter by
    # trainable_names, which lists each parameter once
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    final = checkpoint_dir(run_dir, step)
    if not write:
        return final
    weights = {name: model_state[name].contiguous() for name in trainable_names(module)}
    # {fqn: {"exp_avg": (param shape), "exp_avg_sq": (param shape), "step": 0-d}} -> "fqn.slot" keys
    moments = {f"{fqn}.{slot}": value.contiguous()
               for fqn, slots in optim_state["state"].items() for slot, value in slots.items()}
    state = {**state, "step": step, "optimizer": {"param_groups": optim_state["param_groups"]}}
    if cache is not None:
        state["cache"] = cache
    write_atomically(final, {"trainable": weights, "optimizer": moments, "rng": rng_tensors()}, state)
    for old in sorted(p for p in final.parent.iterdir() if STEP_DIR.match(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_atomically(final: Path, tensor_files: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
    """NAME.safetensors for each entry of `tensor_files` plus state.json, renamed into `final` at once."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in tensor_files.items():
        save_file(tensors, tmp / f"{name}.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))         # last: it marks the dir complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    cache: str | None = None) -> dict:
    """Restore trainable parameters, optimizer state and RNG in place; returns the saved `state` plus "step".

    Every rank calls it. Under a process group only rank 0 reads the tensors and broadcasts them,
    each rank keeping its shard; without one the process loads them itself. Call it before the
    first backward (set_optimizer_state_dict initialises an empty optimizer with an lr=0 step). A
    checkpoint taken over another cache than `cache` (both identities known) is refused first.
    """
    state = json.loads((path / "state.json").read_text())
    check_cache(path, state.get("cache"), cache)       # on every rank, before anything is restored
    check_names(path, module)                          # on every rank, before any collective
    broadcast = distributed()
    reader = not broadcast or dist.get_rank() == 0
    groups = state.pop("optimizer")["param_groups"]
    weights = load_file(path / "trainable.safetensors") if reader else {}
    optim_state = read_optimizer(path, groups) if reader else {}
    # strict=False: the frozen parameters are not in the checkpoint (check_names vouches for the rest)
    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=broadcast)
    set_optimizer_state_dict(module, optimizer, optim_state, options=options)
    for group in optimizer.param_groups:             # JSON and the library's flattening made betas a list
        group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    # separately, not set_state_dict: that skips the model (and its broadcast) on ranks whose dict is empty
    set_model_state_dict(module, weights, options=options)
    restore_rng(load_file(path / "rng.safetensors"))
    return state


def check_cache(path: Path, recorded: str | None, cache: str | None) -> None:
    """Refuse to resume from a checkpoint taken over another cache (identities: manifest sha256s)."""
    if recorded is not None and cache is not None and recorded != cache:
        raise KdcacheError(f"checkpoint {path} was taken while training from the cache whose manifest has "
                           f"{recorded}, but --cache has {cache}: a resume must read the same cache (its sample "
                           "order and targets depend on it); pass that cache, or start a new run with another --out")


def check_names(path: Path, module: torch.nn.Module) -> None:
    """Refuse a checkpoint written for another trainable set (reads only the safetensors header)."""
    with safe_open(path / "trainable.safetensors", framework="pt") as f:
        saved = set(f.keys())
    expected = set(trainable_names(module))
    if saved != expected:
        raise KdcacheError(f"checkpoint {path} does not match this stage's trainable parameters: only in the "
                           f"checkpoint {sorted(saved - expected)[:3]}, only in the model "
                           f"{sorted(expected - saved)[:3]}; was it written by another stage?")


def read_optimizer(path: Path, param_groups: list[dict]) -> dict:
    """optimizer.safetensors + state.json's param_groups as {"state": {fqn: {slot: t}}, "param_groups": [...]}."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        fqn, slot = key.rsplit(".", 1)                 # FQNs have dots, AdamW slot names do not
        state.setdefault(fqn, {})[slot] = value
    return {"state": state, "param_groups": param_groups}


def trainable_names(module: torch.nn.Module) -> list[str]:
    """FQNs of the parameters that train (a tied weight once, under its first name)."""
    return [name for name, param in module.named_parameters() if param.requires_grad]


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor.

    Collective under FSDP (every rank calls it); under a process group only rank 0 gets the tensors,
    the other ranks an empty dict.
    """
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])
