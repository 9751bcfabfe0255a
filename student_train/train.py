"""kdcache train: one stage (PT / SFT / DPT / DFT) of the student, from a cache or a dataset.

Reads top to bottom: setup -> data -> optimizer -> resume -> loop -> finalize. The teacher is never
loaded: distillation targets come from the cache. Under torchrun the student is wrapped in DDP (or
FSDP with --fsdp) and the sampler gives every rank the same number of samples.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdcache import compat, config as configs, distributed, losses, models
from kdcache.batches import CacheDataset, JsonDataset, make_loader
from kdcache.errors import KdcacheError
from kdcache.sampler import ResumableSampler
from kdcache.shards import CacheReader
from student_train import checkpoint
from student_train.config import TrainConfig
from student_train.report import plot_metrics


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
        distil = self.cfg.distils
        return losses.distill_loss(
            hidden, models.lm_head_weight(self.model), batch,
            alpha=self.cfg.alpha if distil else 0.0, beta=self.cfg.beta if distil else 0.0,
            gamma=self.cfg.gamma if distil else 0.0,
            temperature_response=self.temperatures["response"], temperature_visual=self.temperatures["visual"],
            tail=self.cfg.tail, loss_norm=self.cfg.loss_norm, chunk_rows=self.cfg.chunk_rows, gram=self.gram)


def train(cfg: TrainConfig) -> Path | None:
    """Run one stage; returns RUN/final on rank 0 (None on other ranks)."""
    # --- setup
    topo = distributed.topology()
    device = distributed.resolve_device(cfg.device, topo)
    distributed.init_process_group(topo, backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out)
    refuse_used_run_dir(run_dir, cfg)
    distributed.barrier()                             # every rank checks before rank 0 creates files in it
    bundle = models.load_bundle(cfg.student, trust_remote_code=cfg.trust_remote_code)
    model = bundle.model.to(device)
    set_trainable(model, cfg.trainable)
    model.train()                                     # load_bundle gives eval(); HF checkpoints layers only in train()
    model.model.vision_tower.eval()                   # frozen: no dropout noise in its features
    if cfg.grad_checkpointing:
        lm = model.model.language_model
        enable = getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)  # renamed in 5.x
        enable()

    # --- data
    dataset, temperatures = build_dataset(cfg, bundle)
    if topo.is_main:                                  # inputs are valid: now the run directory may appear
        run_dir.mkdir(parents=True, exist_ok=True)
        configs.save_yaml(cfg, run_dir / "config.yaml")
    distributed.barrier()
    grad_accum = cfg.grad_accum or max(1, cfg.resolved_global_batch // (cfg.batch_size * topo.world_size))
    sampler = ResumableSampler(dataset.shard_sizes, seed=cfg.seed, rank=topo.rank, world_size=topo.world_size,
                               batch_size=cfg.batch_size * grad_accum)
    steps_per_epoch = len(sampler) // (cfg.batch_size * grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < 1:
        raise KdcacheError(f"{len(dataset)} samples make no full optimizer step of "
                           f"{cfg.batch_size} x {grad_accum} x {topo.world_size}; lower --batch-size/--global-batch")

    # --- loss module, sharding, optimizer and schedule
    gram = None
    if cfg.distils and cfg.gamma > 0 and "llm" not in cfg.trainable:
        from kdcache.targets import gram_matrix

        with torch.no_grad():
            gram = gram_matrix(models.lm_head_weight(model))                                 # (D, D) once
    student_loss = StudentLoss(model, cfg, temperatures, gram)
    sharded = cfg.fsdp and topo.world_size > 1
    if sharded:                                       # before the optimizer: sharding replaces the parameters
        shard_with_fsdp(student_loss)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))

    # --- resume
    step = 0
    if cfg.resume and (last := checkpoint.latest_checkpoint(run_dir)) is not None:
        state = checkpoint.load_checkpoint(last, trainable, optimizer)
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
    if cfg.resume and topo.is_main:                   # also without a checkpoint: the run restarts at step 0
        truncate_metrics(run_dir / "metrics.jsonl", step)
    wrapped = student_loss
    if topo.world_size > 1 and not sharded:
        wrapped = DistributedDataParallel(student_loss, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)

    # --- loop
    loader = make_loader(dataset, sampler, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         pad_id=bundle.tokenizer.pad_token_id)
    batches = iter(loader)
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (cfg.progress and topo.is_main),
               desc=f"{cfg.stage} {run_dir.name}")
    metrics_file = open(run_dir / "metrics.jsonl", "a") if topo.is_main else None
    started, seen_at_start = time.perf_counter(), step
    while step < total_steps:
        sums = {}
        for micro in range(grad_accum):
            batch, batches = next_batch(batches, loader, sampler)
            batch = to_device(batch, device)
            sync = micro == grad_accum - 1 or not isinstance(wrapped, DistributedDataParallel)
            with nullcontext() if sync else wrapped.no_sync():
                parts = wrapped(batch)
                (parts["loss"] / grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / grad_accum
        sums = mean_over_ranks(sums, device)
        lr = scheduler.get_last_lr()[0]
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sampler.advance(cfg.batch_size * grad_accum * topo.world_size)
        rate = (step - seen_at_start) * cfg.batch_size * grad_accum * topo.world_size / (time.perf_counter() - started)
        if metrics_file is not None and (step % cfg.log_every == 0 or step == total_steps):
            record = {"step": step, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr,
                      "samples_seen": sampler.state_dict()["samples_seen"], "samples_per_s": round(rate, 2)}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        if step % cfg.save_every == 0 or step == total_steps:
            save_state(run_dir, step, trainable, optimizer, scheduler, sampler, topo, sharded)
    bar.close()

    # --- finalize
    final = None
    full_state = checkpoint.full_state_dict(model) if sharded else None    # collective: every rank
    if topo.is_main:
        metrics_file.close()
        final = run_dir / "final"
        if sharded:                                   # rank 0 saves an unsharded copy of the student
            bundle = models.load_bundle(cfg.student, trust_remote_code=cfg.trust_remote_code)
            bundle.model.load_state_dict(full_state)
        models.save_bundle(bundle, final, stages=[*bundle_stages(bundle), cfg.stage])
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{cfg.stage}: {cfg.student}")
    distributed.barrier()
    distributed.destroy_process_group()
    return final


def refuse_used_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Never overwrite another run: a non-empty RUN/ is continued with --resume or refused."""
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.resume:
        raise KdcacheError(f"{run_dir} is not empty; pass --resume to continue it or choose another --out")


def set_trainable(model, parts: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the stage's parts; the vision tower is never trained."""
    model.requires_grad_(False)
    if "projector" in parts:
        model.model.multi_modal_projector.requires_grad_(True)
    if "llm" in parts:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_dataset(cfg: TrainConfig, bundle: models.Bundle):
    """The stage's dataset and the temperatures its targets were made at."""
    if cfg.cache is not None:
        reader = CacheReader(cfg.cache, verify=True)
        compat.check_student_matches_cache(reader.manifest, bundle, cfg.cache)
        if cfg.distils and cfg.gamma > 0 and not reader.manifest.get("relation", True):
            raise KdcacheError(f"cache {cfg.cache} was dumped with --no-relation; pass --gamma 0 to train without RDist")
        dataset = CacheDataset(reader, bundle.image_processor, images=cfg.images, with_targets=cfg.distils)
        return dataset, reader.manifest["temperature"]
    visual_len = models.visual_len_of(bundle.model.config)
    dataset = JsonDataset(cfg.data, cfg.images, bundle.tokenizer, bundle.image_processor,
                          template=cfg.resolved_template, image_token_id=bundle.model.config.image_token_id,
                          visual_len=visual_len, max_length=cfg.max_length)
    return dataset, {"response": 1.0, "visual": 1.0}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine to zero (HF's get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def shard_with_fsdp(student_loss: StudentLoss) -> None:
    """FSDP2: one unit per LLM decoder layer, the rest (tower, projector, embeddings, head) in the root.

    The root is the loss module, whose forward the loop calls, so the head's weight is gathered for
    the chunked losses. Frozen and trainable parameters may share a unit.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in student_loss.model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(student_loss)


def next_batch(batches, loader, sampler):
    """The next batch; at the end of an epoch, start the next one (the sampler reshuffles)."""
    try:
        return next(batches), batches
    except StopIteration:
        sampler.set_epoch(sampler.state_dict()["epoch"] + 1)
        batches = iter(loader)
        return next(batches), batches


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def save_state(run_dir, step, trainable, optimizer, scheduler, sampler, topo, sharded: bool) -> None:
    """Rank 0 writes; with FSDP every rank takes part in gathering the full tensors first."""
    if topo.is_main or sharded:
        checkpoint.save_checkpoint(run_dir, step, trainable, optimizer,
                                   {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()},
                                   write=topo.is_main)
    distributed.barrier()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def bundle_stages(bundle) -> list[str]:
    return list(getattr(bundle, "stages", []) or [])
