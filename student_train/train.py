"""kdcache train: one stage (PT / SFT / DPT / DFT) of the student, from a cache or a dataset.

    train(cfg) = setup (student, data, sharding, optimizer, resume) -> loop -> finalize (final/, loss.png)

The teacher is never loaded: distillation targets come from the cache. Under torchrun the student
is wrapped in DDP (or FSDP with --fsdp) and the sampler gives every rank the same number of
samples. Stage defaults (lr, global batch, template, gradient accumulation) are resolved by
`TrainConfig.resolve`; the loader counts the samples it handed out, so the loop keeps no data
bookkeeping (docs/design.md §6, §7).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdcache import compat, config as configs, distributed, losses, models, targets
from kdcache.batches import CacheDataset, JsonDataset, StatefulLoader
from kdcache.errors import KdcacheError
from kdcache.reader import CacheReader
from kdcache.sampler import ResumableSampler
from student_train import checkpoint
from student_train.config import TrainConfig
from student_train.report import MetricsLog, plot_metrics


class StudentLoss(torch.nn.Module):
    """The student forward that DDP wraps: hidden states, then the losses at the rows that need logits."""

    def __init__(self, model, cfg: TrainConfig, temperatures: dict, gram: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.temperatures = temperatures
        self.gram = gram            # (D, D) when the LM head is frozen, else computed with grad per step

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        with autocast:
            hidden = models.final_hidden_states(self.model, batch["input_ids"], batch["attention_mask"],
                                                batch["pixel_values"])                      # (B, T, D)
        weight = 1.0 if self.cfg.distills else 0.0          # pt / sft: CE only
        return losses.distill_loss(
            hidden, models.lm_head_weight(self.model), batch,
            alpha=weight * self.cfg.alpha, beta=weight * self.cfg.beta, gamma=weight * self.cfg.gamma,
            temperature_response=self.temperatures["response"], temperature_visual=self.temperatures["visual"],
            tail=self.cfg.tail, loss_norm=self.cfg.loss_norm, chunk_rows=self.cfg.chunk_rows, gram=self.gram)


def train(cfg: TrainConfig) -> Path | None:
    """Run one stage; returns RUN/final on rank 0 (None on other ranks)."""
    # --- setup: process group, resolved config, student, data, optimizer, resume
    topo = distributed.topology()
    device = join_process_group(cfg, topo)
    torch.manual_seed(cfg.seed)
    cfg = cfg.resolve(topo.world_size)
    run_dir = Path(cfg.out)
    refuse_used_run_dir(run_dir, cfg)
    distributed.barrier()                             # every rank checks before rank 0 creates files in it
    bundle = models.load_bundle(cfg.student, trust_remote_code=cfg.trust_remote_code)
    model = prepare_student(bundle.model.to(device), cfg)
    loader, temperatures, total_steps = setup_data(cfg, bundle, topo)
    student_loss = StudentLoss(model, cfg, temperatures, frozen_head_gram(model, cfg))
    wrapped = distribute(student_loss, cfg, topo, device)          # FSDP shards before the optimizer sees params
    trainable = [p for p in student_loss.parameters() if p.requires_grad]
    optimizer, scheduler = setup_optimizer(trainable, cfg, total_steps)
    step = resume(run_dir, cfg, student_loss, optimizer, scheduler, loader)
    log = MetricsLog(run_dir / "metrics.jsonl", step=step, enabled=topo.is_main,
                     samples_per_step=cfg.batch_size * cfg.grad_accum * topo.world_size)

    # --- loop
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (cfg.progress and topo.is_main),
               desc=f"{cfg.stage} {run_dir.name}")
    while step < total_steps:
        parts: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(loader), device)
            with grad_sync(wrapped, micro == cfg.grad_accum - 1):  # DDP all-reduces on the last micro-batch only
                out = wrapped(batch)
                (out["loss"] / cfg.grad_accum).backward()
            for name, value in out.items():
                parts[name] = parts.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
        parts = mean_over_ranks(parts, device)
        lr = scheduler.get_last_lr()[0]
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            log.write(step, parts, lr=lr, samples_seen=loader.state_dict()["samples_seen"])
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{log.rate(step):.1f}")
        if step % cfg.save_every == 0 or step == total_steps:
            checkpoint.save_checkpoint(run_dir, step, student_loss, optimizer,
                                       {"scheduler": scheduler.state_dict(), "sampler": loader.state_dict()},
                                       write=topo.is_main)
            distributed.barrier()
    bar.close()
    log.close()

    # --- finalize
    final = save_final(run_dir, cfg, bundle, model, sharded=cfg.fsdp and topo.world_size > 1, is_main=topo.is_main)
    distributed.barrier()
    distributed.destroy_process_group()
    return final


# --- setup steps


def join_process_group(cfg: TrainConfig, topo) -> torch.device:
    """This rank's device, and the process group under torchrun (nccl on GPUs, gloo on CPUs)."""
    device = distributed.resolve_device(cfg.device, topo)
    distributed.init_process_group(topo, backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def refuse_used_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Never overwrite another run: a non-empty RUN/ is continued with --resume or refused."""
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.resume:
        raise KdcacheError(f"{run_dir} is not empty; pass --resume to continue it or choose another --out")


def prepare_student(model, cfg: TrainConfig):
    """Freeze everything but the stage's parts; train mode except for the frozen tower."""
    set_trainable(model, cfg.trainable)
    model.train()                                     # load_bundle gives eval(); HF checkpoints layers only in train()
    model.model.vision_tower.eval()                   # frozen: no dropout noise in its features
    if cfg.grad_checkpointing:
        lm = model.model.language_model
        # transformers 5.x renamed gradient_checkpointing_enable; the older name is the fallback for early 5.x
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable()
    return model


def set_trainable(model, parts: tuple[str, ...]) -> None:
    """Freeze everything, then unfreeze the stage's parts; the vision tower is never trained."""
    model.requires_grad_(False)
    if "projector" in parts:
        model.model.multi_modal_projector.requires_grad_(True)
    if "llm" in parts:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def build_dataset(cfg: TrainConfig, bundle: models.Bundle):
    """The stage's dataset and the temperatures its targets were made at."""
    if cfg.cache is not None:
        reader = CacheReader(cfg.cache, verify=True)
        compat.check_student_matches_cache(reader.manifest, bundle, cfg.cache)
        if cfg.distills and cfg.gamma > 0 and not reader.manifest.get("relation", True):
            raise KdcacheError(f"cache {cfg.cache} was dumped with --no-relation; pass --gamma 0 to train without RDist")
        dataset = CacheDataset(reader, bundle.image_processor, images=cfg.images, with_targets=cfg.distills)
        return dataset, reader.manifest["temperature"]
    dataset = JsonDataset(cfg.data, cfg.images, bundle.tokenizer, bundle.image_processor,
                          template=cfg.template, image_token_id=bundle.model.config.image_token_id,
                          visual_len=models.visual_len_of(bundle.model.config), max_length=cfg.max_length)
    return dataset, {"response": 1.0, "visual": 1.0}


def setup_data(cfg: TrainConfig, bundle: models.Bundle, topo) -> tuple[StatefulLoader, dict, int]:
    """The loader over the stage's data, the targets' temperatures and the run's optimizer steps.

    Once the inputs are known to be valid, rank 0 creates the run directory and saves the resolved config.
    """
    dataset, temperatures = build_dataset(cfg, bundle)
    if topo.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        configs.save_yaml(cfg, Path(cfg.out) / "config.yaml")
    distributed.barrier()
    per_rank_step = cfg.batch_size * cfg.grad_accum   # samples one rank consumes per optimizer step
    sampler = ResumableSampler(dataset.shard_sizes, seed=cfg.seed, rank=topo.rank, world_size=topo.world_size,
                               batch_size=per_rank_step)
    total_steps = count_steps(cfg, len(sampler) // per_rank_step, len(dataset), topo.world_size)
    loader = StatefulLoader(dataset, sampler, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            pad_id=bundle.tokenizer.pad_token_id)
    return loader, temperatures, total_steps


def count_steps(cfg: TrainConfig, steps_per_epoch: int, num_samples: int, world_size: int) -> int:
    """Optimizer steps of the run: whole epochs, capped by --max-steps; refuses a run of none."""
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if total < 1:
        raise KdcacheError(f"{num_samples} samples make no full optimizer step of "
                           f"{cfg.batch_size} x {cfg.grad_accum} x {world_size}; lower --batch-size/--global-batch")
    return total


def frozen_head_gram(model, cfg: TrainConfig) -> torch.Tensor | None:
    """G = WᵀW once, when RDist runs and the LM head is frozen (pt/dpt); else None (computed with grad per step)."""
    if not (cfg.distills and cfg.gamma > 0) or "llm" in cfg.trainable:
        return None
    with torch.no_grad():
        return targets.gram_matrix(models.lm_head_weight(model))                  # (D, D) float32


def distribute(student_loss: StudentLoss, cfg: TrainConfig, topo, device: torch.device) -> torch.nn.Module:
    """What the loop calls: the loss module itself (one process), FSDP-sharded in place, or DDP-wrapped."""
    if topo.world_size == 1:
        return student_loss
    if cfg.fsdp:
        shard_with_fsdp(student_loss)
        return student_loss
    # find_unused_parameters: a micro-batch without images never runs the projector, so its
    # parameters get no gradient in that backward; DDP would otherwise wait for them forever.
    return DistributedDataParallel(student_loss, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def shard_with_fsdp(student_loss: StudentLoss) -> None:
    """FSDP2: one unit per LLM decoder layer, the rest (tower, projector, embeddings, head) in the root.

    The root is the loss module, whose forward the loop calls, so the head's weight is gathered for
    the chunked losses. Frozen and trainable parameters may share a unit.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in student_loss.model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(student_loss)


def setup_optimizer(trainable: list[torch.nn.Parameter], cfg: TrainConfig, total_steps: int):
    """AdamW and the warmup + cosine schedule over `total_steps` (docs/design.md §6)."""
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    return optimizer, scheduler


def resume(run_dir: Path, cfg: TrainConfig, student_loss: StudentLoss, optimizer, scheduler,
           loader: StatefulLoader) -> int:
    """Restore the newest checkpoint with --resume; returns the step to continue from (0 without one)."""
    last = checkpoint.latest_checkpoint(run_dir) if cfg.resume else None
    if last is None:
        return 0
    state = checkpoint.load_checkpoint(last, student_loss, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["sampler"])
    return state["step"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine to zero (HF's get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- loop steps


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """DDP's no_sync() on micro-batches whose gradients are only accumulated; a no-op otherwise."""
    return wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) and not sync else nullcontext()


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


# --- finalize


def save_final(run_dir: Path, cfg: TrainConfig, bundle: models.Bundle, model, *, sharded: bool,
               is_main: bool) -> Path | None:
    """RUN/final (a `save_pretrained` checkpoint with its stage history) and RUN/loss.png, on rank 0.

    With FSDP every rank takes part in gathering the full weights, which rank 0 loads into a fresh
    copy of the student to save it unsharded.
    """
    full_state = checkpoint.full_state_dict(model) if sharded else None       # collective: every rank
    if not is_main:
        return None
    if sharded:
        bundle = models.load_bundle(cfg.student, trust_remote_code=cfg.trust_remote_code)
        bundle.model.load_state_dict(full_state)
    final = run_dir / "final"
    models.save_bundle(bundle, final, stages=[*bundle.stages, cfg.stage])
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{cfg.stage}: {cfg.student}")
    return final
