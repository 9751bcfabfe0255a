"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

RUN/checkpoints/step-000123/
    trainable.safetensors   the trainable parameters (frozen ones come from the student source)
    optimizer.safetensors   AdamW moments and step counts, keyed by parameter name
    rng.safetensors         torch CPU (and CUDA) generator states of this rank
    state.json              step, sampler state, scheduler state, param order, optimizer hyper-parameters

A checkpoint is written to a temporary directory and renamed into place, so a run killed while
saving resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def save_checkpoint(run_dir: Path, step: int, named_params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, state: dict, keep: int = 2, write: bool = True) -> Path:
    """Write one checkpoint atomically and keep only the newest `keep`.

    FSDP-sharded (DTensor) parameters and moments are gathered to full tensors first: then every
    rank must call this, and only the one with `write=True` writes.
    """
    weights = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in named_params.items()}
    moments, hyper = optimizer_tensors(named_params, optimizer)
    final = checkpoint_dir(run_dir, step)
    if not write:
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "trainable.safetensors")
    save_file(moments, tmp / "optimizer.safetensors")
    save_file(rng_tensors(), tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": hyper}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in final.parent.iterdir() if STEP_DIR.match(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, named_params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters, optimizer and RNG in place; returns state.json's contents."""
    weights = load_file(path / "trainable.safetensors")
    if set(weights) != set(named_params):
        raise KdcacheError(f"checkpoint {path} holds parameters {sorted(set(weights) ^ set(named_params))[:5]}... "
                           "that do not match this stage's trainable set; was it written by another stage?")
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(like(param, weights[name]))
    state = json.loads((path / "state.json").read_text())
    load_optimizer_tensors(load_file(path / "optimizer.safetensors"), state["optimizer"], named_params, optimizer)
    restore_rng(load_file(path / "rng.safetensors"))
    return state


def optimizer_tensors(named_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer):
    """AdamW state as {param_name.moment: tensor} plus the JSON-able param-group hyper-parameters."""
    tensors = {}
    for name, param in named_params.items():                 # the same order on every rank (gathers)
        for slot, value in sorted(optimizer.state.get(param, {}).items()):
            tensors[f"{name}.{slot}"] = full_tensor(torch.as_tensor(value).detach()).cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"param_groups": groups}


def load_optimizer_tensors(tensors: dict, hyper: dict, named_params: dict[str, torch.nn.Parameter],
                           optimizer: torch.optim.Optimizer) -> None:
    for group, saved in zip(optimizer.param_groups, hyper["param_groups"]):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    for name, param in named_params.items():
        slots = {key.removeprefix(name + "."): value for key, value in tensors.items()
                 if key.startswith(name + ".") and "." not in key.removeprefix(name + ".")}
        if slots:
            optimizer.state[param] = {k: (v if k == "step" else like(param, v)) for k, v in slots.items()}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded DTensor (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` on param's device and dtype, sharded like param when param is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor; with FSDP every rank must call it."""
    return {name: full_tensor(value.detach()).cpu() for name, value in model.state_dict().items()}


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])
