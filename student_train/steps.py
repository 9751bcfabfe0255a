"""The pieces of one optimizer step of `kdcache train` (student_train/train.py's loop): micro-batch
forward/backward with gradient accumulation, the update, the gradient norm, and the checks that stop a
run on a non-finite loss, gradient or parameter before anything is saved from it (docs/design.md §8)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from kdcache.batches import StatefulLoader
from kdcache.errors import KdcacheError
from student_train import checkpoint
from student_train.config import TrainConfig


def accumulate_gradients(wrapped: torch.nn.Module, loader: StatefulLoader, cfg: TrainConfig, device: torch.device):
    """Forward and backward over the step's `grad_accum` micro-batches.

    Returns the loss components averaged over the micro-batches, this rank's first non-finite loss
    (a description, or None) and the step's sample ids (for the error that names them).
    """
    parts: dict[str, float] = {}
    bad, sample_ids = None, []
    module = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped     # the StudentLoss
    for micro in range(cfg.grad_accum):
        batch = to_device(next(loader), device)
        sample_ids += batch["sample_id"]
        module.start_micro_batch(micro, cfg.grad_accum)
        with grad_sync(wrapped, micro == cfg.grad_accum - 1):      # DDP all-reduces on the last micro-batch only
            out = wrapped(batch)
            (out["loss"] / cfg.grad_accum).backward()
        values = {name: float(value.detach()) for name, value in out.items()}
        if bad is None and not math.isfinite(values["loss"]):
            bad = (f"loss ({values['loss']}) in micro-batch {micro + 1}/{cfg.grad_accum} of samples "
                   f"{describe_ids(batch['sample_id'])}")
        for name, value in values.items():
            parts[name] = parts.get(name, 0.0) + value / cfg.grad_accum
    return parts, bad, sample_ids


def apply_update(optimizer, scheduler, step: int, cfg: TrainConfig, run_dir: Path) -> None:
    """optimizer.step(), scheduler.step(), zero the gradients; an update that overflows is a one-line error."""
    try:
        optimizer.step()
    except RuntimeError as e:                                       # AdamW's step size itself overflowed
        if "overflow" not in str(e):
            raise
        raise KdcacheError(f"the update of step {step} overflowed ({' '.join(str(e).split())}): --lr "
                           f"{cfg.lr:g} is too large; nothing was saved from it "
                           f"({last_checkpoint_words(run_dir)})") from e
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """DDP's no_sync() on micro-batches whose gradients are only accumulated; a no-op otherwise."""
    return wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) and not sync else nullcontext()


def gradient_norm(trainable: list[torch.nn.Parameter], clip_grad: float | None) -> float:
    """The total gradient norm of the step (over all ranks' shards under FSDP), clipped to `clip_grad` when set."""
    if clip_grad is not None:
        norm = torch.nn.utils.clip_grad_norm_(trainable, clip_grad)
    elif hasattr(torch.nn.utils, "get_total_norm"):                 # torch >= 2.6: no rescaling pass
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(trainable, math.inf)
    if hasattr(norm, "full_tensor"):                                # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def describe_ids(ids: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{f', ... ({len(ids)} in all)' if len(ids) > limit else ''}]"


def stop_non_finite(step: int, bad: str | None, run_dir: Path) -> None:
    """Stop the run before the update of `step`, naming what was not finite and where (a collective)."""
    import torch.distributed as dist

    found = [bad]
    if dist.is_available() and dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
    rank, reason = next((r, b) for r, b in enumerate(found) if b is not None)
    where = f" on rank {rank}" if len(found) > 1 else ""
    raise KdcacheError(f"non-finite {reason} at step {step}{where}: training stopped before that update, nothing "
                       f"was saved from it ({last_checkpoint_words(run_dir)}); lower --lr, check --alpha/--beta/"
                       "--gamma, or run `kdcache verify` on the cache")


def refuse_non_finite_parameters(trainable: list[torch.nn.Parameter], step: int, run_dir: Path, device) -> None:
    """Before a checkpoint (and so before final/): the updated parameters are finite on every rank."""
    with torch.no_grad():
        checks = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in trainable]
        finite = bool(torch.stack(checks).all()) if checks else True              # one device sync
    if mean_over_ranks({"bad": float(not finite)}, device)["bad"] > 0:
        raise KdcacheError(f"the update of step {step} made parameters non-finite (is --lr too large?): no "
                           f"checkpoint or final/ was written from them ({last_checkpoint_words(run_dir)})")


def last_checkpoint_words(run_dir: Path) -> str:
    last = checkpoint.latest_checkpoint(run_dir)
    return f"last checkpoint: {last}" if last is not None else "no checkpoint was written yet"


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}
