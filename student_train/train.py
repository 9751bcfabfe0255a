"""kdcache train: one stage (PT / SFT / DPT / DFT) of the student, from a cache or a dataset.

    train(cfg) = setup (student, data, sharding, optimizer, resume) -> loop -> finalize (final/, loss.png)

The teacher is never loaded: distillation targets come from the cache. Under torchrun the student
is wrapped in DDP (or FSDP with --fsdp) and the sampler gives every rank the same number of
samples. Stage defaults (lr, global batch, template, gradient accumulation) are resolved by
`TrainConfig.resolve`; the loader counts the samples it handed out, so the loop keeps no data
bookkeeping (docs/design.md §6, §7).

Hostile conditions (docs/design.md §8): the run directory is locked for the run's lifetime
(`kdcache.lock`); a non-finite loss, gradient norm or updated parameter stops the run with a
one-line error before anything is saved from it; a resumed run must have the settings recorded
in RUN/run.json at its first start (`student_train.run_record`); OS errors of the run's own writes
(disk full, read-only or unwritable --out) are one-line errors naming the path (`lock.storage_errors`
around the whole job).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdcache import compat, distributed, lock, losses, models, samples, schema, targets, templates
from kdcache.batches import CacheDataset, JsonDataset, StatefulLoader
from kdcache.errors import KdcacheError
from kdcache.reader import CacheReader
from kdcache.sampler import ResumableSampler
from student_train import checkpoint
from student_train.config import TrainConfig
from student_train.report import MetricsLog, plot_metrics
from student_train.run_record import check_resumed_settings, record_run, run_settings
from student_train.steps import (accumulate_gradients, apply_update, describe_ids, gradient_norm, mean_over_ranks,
                                 refuse_non_finite_parameters, stop_non_finite)

NONFINITE = "nonfinite"        # a flag summed over ranks with the step's metrics


class StudentLoss(torch.nn.Module):
    """The student forward that DDP wraps: hidden states, then the losses at the rows that need logits.

    The forward runs under autocast in the compute dtype (`--dtype`; bf16 on a GPU by default, float32 on
    the CPU); on CUDA in bf16 the LM-head GEMMs of the losses also take bf16 operands (float32 accumulation
    and output, `rowloss.lowered_head`). Parameters and optimizer state stay float32. With RDist on a trained
    head, `start_micro_batch` makes G = WᵀW once per optimizer step (`losses.StepGram`).
    """

    def __init__(self, model, cfg: TrainConfig, temperatures: dict, gram: torch.Tensor | None,
                 kinds: dict | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.temperatures = temperatures
        self.kinds = kinds          # role -> "topk" | "sampled": the cache's targets (None: top-k), picks each KL
        self.gram = gram            # (D, D) when the LM head is frozen, else computed with grad (once per step)
        self.sharded = False        # set by shard_with_fsdp: every rank must then produce the same gradients
        device = next(model.parameters()).device
        self.compute_dtype = models.resolve_dtype(cfg.dtype, device)
        self.matmul_dtype = lm_head_matmul_dtype(device, self.compute_dtype)
        self.step_gram = losses.StepGram() if gram is None and cfg.distills and cfg.gamma > 0 else None

    def start_micro_batch(self, micro: int, count: int) -> None:
        """Before micro-batch `micro` of the step's `count`: G is made on the first, its gradient applied on the last."""
        if self.step_gram is not None:
            self.step_gram.start(micro, count)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        autocast = (torch.autocast(device.type, dtype=self.compute_dtype) if self.compute_dtype != torch.float32
                    else nullcontext())
        with autocast:
            hidden = models.final_hidden_states(self.model, batch["input_ids"], batch["attention_mask"],
                                                batch["pixel_values"])                      # (B, T, D)
        lm_head = models.lm_head_weight(self.model)
        per_step = self.step_gram is not None and self.step_gram.active and torch.is_grad_enabled()
        gram = self.step_gram.gram(lm_head) if per_step else self.gram
        weight = 1.0 if self.cfg.distills else 0.0          # pt / sft: CE only
        out = losses.distill_loss(
            hidden, lm_head, batch,
            alpha=weight * self.cfg.alpha, beta=weight * self.cfg.beta, gamma=weight * self.cfg.gamma,
            temperature_response=self.temperatures["response"], temperature_visual=self.temperatures["visual"],
            tail=self.cfg.tail, loss_norm=self.cfg.loss_norm, chunk_rows=self.cfg.chunk_rows, gram=gram,
            matmul_dtype=self.matmul_dtype, kinds=self.kinds)
        if per_step:                # the backward must reach G even without a relation term (StepGram)
            out["loss"] = out["loss"] + 0.0 * gram.sum()
        if torch.is_grad_enabled() and batch["pixel_values"] is None and (self.sharded or not out["loss"].requires_grad):
            # A micro-batch without images never reaches the projector. In pt/dpt (the projector is all that
            # trains) the loss then has no gradient at all; under FSDP the ranks' gradient reduce-scatters
            # must cover the same parameters. A zero term gives the projector a zero gradient in both cases
            # (elsewhere it stays None, as in a one-process run, and AdamW skips it).
            projector = self.model.model.multi_modal_projector.parameters()
            out["loss"] = out["loss"] + 0.0 * sum(p.sum() for p in projector if p.requires_grad)
        return out


def lm_head_matmul_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The LM head's GEMM operand dtype in the losses: bf16 on CUDA when the compute dtype is bf16 (tensor cores,
    float32 accumulation); None (float32 GEMMs, today's numerics) on the CPU and in float32 runs."""
    return torch.bfloat16 if device.type == "cuda" and compute_dtype == torch.bfloat16 else None


def train(cfg: TrainConfig) -> Path | None:
    """Run one stage; returns RUN/final on rank 0 (None on other ranks)."""
    # --- setup: process group, resolved config, run directory (locked), student, data, optimizer, resume
    topo = distributed.topology()
    device = join_process_group(cfg, topo)
    torch.manual_seed(cfg.seed)
    cfg = cfg.resolve(topo.world_size)
    run_dir = Path(cfg.out)
    settings: dict = {}                               # rank 0: what RUN/run.json records (or must match)

    def check_run_dir() -> None:                      # rank 0, holding the lock, before anything is written
        refuse_used_run_dir(run_dir, cfg)
        settings.update(run_settings(cfg, topo.world_size))
        check_resumed_settings(run_dir, cfg, settings)

    with lock.storage_errors(run_dir), lock.job_lock(run_dir, job="train", is_main=topo.is_main, check=check_run_dir):
        return run_stage(cfg, topo, device, run_dir, settings)


def run_stage(cfg: TrainConfig, topo, device: torch.device, run_dir: Path, settings: dict) -> Path | None:
    """setup -> loop -> finalize, in a checked and locked run directory."""
    bundle = models.load_bundle(cfg.student, trust_remote_code=cfg.trust_remote_code)
    model = prepare_student(bundle.model.to(device), cfg)
    loader, temperatures, total_steps = setup_data(cfg, bundle, topo, settings)
    student_loss = StudentLoss(model, cfg, temperatures, frozen_head_gram(model, cfg), kinds=target_kinds(loader))
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
        parts, bad, sample_ids = accumulate_gradients(wrapped, loader, cfg, device)
        norm = gradient_norm(trainable, cfg.clip_grad)              # clips to --clip-grad when set
        if bad is None and not math.isfinite(norm):
            bad = f"gradient norm ({norm}) over samples {describe_ids(sample_ids)}"
        parts = mean_over_ranks({**parts, NONFINITE: float(bad is not None)}, device)
        if parts.pop(NONFINITE) > 0:                                # every rank sees the same flag
            stop_non_finite(step + 1, bad, run_dir)
        lr = scheduler.get_last_lr()[0]
        apply_update(optimizer, scheduler, step + 1, cfg, run_dir)
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            log.write(step, parts, lr=lr, samples_seen=loader.state_dict()["samples_seen"])
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{log.rate(step):.1f}")
        if step % cfg.save_every == 0 or step == total_steps:
            refuse_non_finite_parameters(trainable, step, run_dir, device)
            checkpoint.save_checkpoint(run_dir, step, student_loss, optimizer,
                                       {"scheduler": scheduler.state_dict(), "sampler": loader.state_dict()},
                                       write=topo.is_main, cache=cache_identity(loader))
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
    """Never overwrite another run: a non-empty RUN/ is continued with --resume or refused.

    The lock file (`kdcache.lock.LOCK_NAME`, this run's or a killed run's) is not content.
    """
    if run_dir.is_dir() and lock.entries(run_dir) and not cfg.resume:
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
        reader = CacheReader(cfg.cache, for_training=True, remote=cfg)    # reads the manifest, no shard yet
        compat.check_student_matches_cache(reader.manifest, bundle, cfg.cache)
        reader.verify_shards()        # local shards hashed now; a cache URL's as each arrives (kdcache/shardcache.py)
        models.note_stage_template(bundle, reader.manifest.get("template"),
                                   templates.cache_template_version(reader.manifest), source=f"cache {cfg.cache}")
        if cfg.distills and cfg.gamma > 0 and not reader.manifest.get("relation", True):
            raise KdcacheError(f"cache {cfg.cache} was dumped with --no-relation; pass --gamma 0 to train without RDist")
        dataset = CacheDataset(reader, bundle.image_processor, images=cfg.images, with_targets=cfg.distills,
                               image_limits=samples.image_limits(cfg), dataset=cfg.cache_dataset)
        return dataset, reader.manifest["temperature"]
    models.note_stage_template(bundle, cfg.template, templates.TEMPLATE_VERSION, source=f"dataset {cfg.data}")
    dataset = JsonDataset(cfg.data, cfg.images, bundle.tokenizer, bundle.image_processor,
                          template=cfg.template, image_token_id=bundle.model.config.image_token_id,
                          visual_len=models.visual_len_of(bundle.model.config), max_length=cfg.max_length,
                          image_limits=samples.image_limits(cfg))
    return dataset, {"response": 1.0, "visual": 1.0}


def setup_data(cfg: TrainConfig, bundle: models.Bundle, topo, settings: dict) -> tuple[StatefulLoader, dict, int]:
    """The loader over the stage's data, the targets' temperatures and the run's optimizer steps.

    Once the inputs are known to be valid, rank 0 records a first start (`record_run`).
    """
    dataset, temperatures = build_dataset(cfg, bundle)
    if topo.is_main:                                  # RUN/ exists: the lock made it
        record_run(Path(cfg.out), cfg, settings, topo.world_size)
    distributed.barrier()
    per_rank_step = cfg.batch_size * cfg.grad_accum   # samples one rank consumes per optimizer step
    sampler = ResumableSampler(dataset.shard_sizes, seed=cfg.seed, rank=topo.rank, world_size=topo.world_size,
                               batch_size=per_rank_step)
    total_steps = count_steps(cfg, len(sampler) // per_rank_step, len(dataset), topo.world_size)
    loader = StatefulLoader(dataset, sampler, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            pad_id=bundle.tokenizer.pad_token_id)
    if isinstance(dataset, CacheDataset):
        dataset.prefetch(sampler)     # a cache URL: its next shards in this rank's order, in the background
    return loader, temperatures, total_steps


def target_kinds(loader: StatefulLoader) -> dict | None:
    """{role: "topk" | "sampled"} of the cache trained from (its manifest's `targets`), None for --data."""
    reader = getattr(loader.loader.dataset, "reader", None)
    return None if reader is None else schema.target_kinds(reader.manifest)


def cache_identity(loader: StatefulLoader) -> str | None:
    """The identity of the cache trained from (its manifest's sha256), None for --data: checkpoints record it."""
    return getattr(loader.loader.dataset, "identity", None)


def count_steps(cfg: TrainConfig, steps_per_epoch: int, num_samples: int, world_size: int) -> int:
    """Optimizer steps of the run: whole epochs, capped by --max-steps; refuses a run of none."""
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if total < 1:
        source = cfg.cache if cfg.cache is not None else cfg.data
        if num_samples == 0:
            raise KdcacheError(f"{source} holds no samples: there is nothing to train on")
        raise KdcacheError(f"{source} holds {num_samples} samples, too few for one optimizer step of "
                           f"{cfg.batch_size} x {cfg.grad_accum} x {world_size} (batch size x gradient "
                           "accumulation x ranks); lower --batch-size/--global-batch")
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
    student_loss.sharded = True


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
    state = checkpoint.load_checkpoint(last, student_loss, optimizer, cache=cache_identity(loader))
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["sampler"])
    return state["step"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine to zero (HF's get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    if sharded:                 # a fresh unsharded copy of the weights; the rest (template included) is the run's
        fresh = models.load_bundle(cfg.student, trust_remote_code=cfg.trust_remote_code)
        fresh.model.load_state_dict(full_state)
        bundle = dataclasses.replace(bundle, model=fresh.model)
    final = run_dir / "final"
    models.save_bundle(bundle, final, stages=[*bundle.stages, cfg.stage])
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{cfg.stage}: {cfg.student}")
    return final
