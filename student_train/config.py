"""The training job's configuration: one frozen dataclass; stage defaults from the paper (docs/design.md §6).

Each field is declared once, here: `kdcache train` derives its flags, help and defaults from these
fields and their ``metadata`` (``help``; ``shown_default`` where the default is not a plain value;
``ge`` / ``gt`` ranges checked by `kdcache.config.check_fields`). Fields left None take the stage's
value in `TrainConfig.resolve`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

from kdcache.config import DEVICE_PATTERN, MAX_IMAGE_MB, MAX_IMAGE_PIXELS, check_fields
from kdcache.errors import KdcacheError
from kdcache.remote import RemoteConfig
from kdcache.templates import TemplateName

StageName = Literal["pt", "sft", "dpt", "dft"]
# The training --dtype names (`models.resolve_dtype` maps them): the compute dtype only; there is no float16 (it
# would need loss scaling) and master weights and optimizer state are float32 whatever is chosen.
TrainDTypeName = Literal["auto", "bfloat16", "bf16", "float32", "fp32"]


class Stage(NamedTuple):
    trainable: tuple[str, ...]     # parts of the model that train
    lr: float                      # peak learning rate
    global_batch: int
    template: TemplateName
    distills: bool                 # learns from a teacher's cache (else plain cross-entropy)


STAGES: dict[str, Stage] = {
    "pt":  Stage(("projector",), 1e-3, 256, "plain", False),
    "sft": Stage(("projector", "llm"), 2e-5, 128, "qwen2_base", False),
    "dpt": Stage(("projector",), 1e-3, 256, "plain", True),
    "dft": Stage(("projector", "llm"), 2e-5, 128, "qwen2_base", True),
}
assert tuple(STAGES) == get_args(StageName), "STAGES and StageName must name the same stages"


def _by_stage(value) -> str:
    """'pt 0.001, sft 2e-05, ...': a stage default for help texts, read from STAGES."""
    return ", ".join(f"{name} {value(stage)}" for name, stage in STAGES.items())


@dataclass(frozen=True)
class TrainConfig(RemoteConfig):       # + how a cache URL is reached: storage options, network, shard cache
    stage: StageName = field(metadata={"help": "Training stage: pt and sft learn from data, dpt and dft distill "
                                               "from a cache."})
    student: str = field(metadata={"help": "Student: checkpoint dir, hub id or preset."})
    out: str = field(metadata={"help": "Run directory (config, metrics, checkpoints, final/).", "local": True})
    cache: str | None = field(default=None, metadata={
        "help": "Cache written by `kdcache dump` (required for dpt/dft)."})
    data: str | None = field(default=None, metadata={"help": "LLaVA JSON/JSONL for pt/sft without a cache."})
    images: str | None = field(default=None, metadata={
        "help": "Image folder for --data, or for a cache dumped with --no-embed-images."})
    cache_dataset: str | None = field(default=None, metadata={
        "help": "The dataset file a --no-embed-images cache was dumped from, where the path its manifest "
                "records is not readable here (checked against the manifest's fingerprint)."})
    template: TemplateName | None = field(default=None, metadata={
        "help": "Conversation template.", "shown_default": f"the stage's: {_by_stage(lambda s: s.template)}"})
    max_length: int = field(default=2048, metadata={"help": "Longest sequence allowed, in tokens.", "ge": 1})
    lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate.", "shown_default": f"the stage's: {_by_stage(lambda s: f'{s.lr:g}')}", "gt": 0})
    global_batch: int | None = field(default=None, metadata={
        "help": "Global batch.", "shown_default": f"the stage's: {_by_stage(lambda s: s.global_batch)}", "ge": 1})
    batch_size: int = field(default=4, metadata={"help": "Per-device batch.", "ge": 1})
    grad_accum: int | None = field(default=None, metadata={
        "help": "Gradient accumulation steps.", "shown_default": "global_batch / (batch_size x world size)", "ge": 1})
    epochs: int = field(default=1, metadata={"help": "Epochs.", "ge": 1})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after N optimizer steps.", "ge": 1})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the steps spent warming up the lr.",
                                                        "ge": 0, "le": 1})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", "ge": 0})
    clip_grad: float | None = field(default=None, metadata={
        "help": "Clip the gradient norm to this value.", "shown_default": "off, as in the paper's code", "gt": 0})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the response-token KL.", "ge": 0})
    beta: float = field(default=1.0, metadata={"help": "Weight of the visual-token KL.", "ge": 0})
    gamma: float = field(default=0.5, metadata={"help": "Weight of the relation loss.", "ge": 0})
    tail: Literal["bucket", "renorm"] = field(default="bucket", metadata={
        "help": "Teacher mass outside the top-k: one extra bucket, or renormalise the top-k."})
    loss_norm: Literal["token", "sample"] = field(default="token", metadata={
        "help": "Average the losses over tokens or over samples."})
    chunk_rows: int = field(default=512, metadata={"help": "Rows per LM-head chunk in the losses.", "ge": 1})
    grad_checkpointing: bool = field(default=False, metadata={"help": "Recompute LLM activations in backward."})
    fsdp: bool = field(default=False, metadata={"help": "Shard the student with FSDP instead of DDP."})
    dtype: TrainDTypeName = field(default="auto", metadata={
        "help": "Compute dtype of the forward and backward (autocast; on CUDA also the LM-head GEMMs, float32 "
                "accumulated); weights and optimizer state stay float32. auto: bfloat16 on a GPU that supports it, "
                "float32 elsewhere."})
    seed: int = field(default=0, metadata={"help": "Seed for init and data order.", "ge": 0, "le": 2**64 - 1})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda.", "pattern": DEVICE_PATTERN,
                                                  "pattern_help": "auto, cpu, cuda or cuda:N"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers.", "ge": 0})
    max_image_mb: float = field(default=MAX_IMAGE_MB, metadata={
        "help": "Largest image read (dataset file or cache-embedded), in MB; a larger one stops the run.", "gt": 0})
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={
        "help": "Most pixels (width x height) an image may have; a larger one stops the run.", "ge": 1})
    save_every: int = field(default=500, metadata={
        "help": "Optimizer steps between checkpoints (and one at the end).", "ge": 1})
    log_every: int = field(default=1, metadata={"help": "Optimizer steps between metric lines.", "ge": 1})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --out."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        check_fields(self)  # first: the stage name must be valid before STAGES is read
        if self.distills and self.cache is None:
            raise KdcacheError(f"stage {self.stage} distills from a cache: pass --cache (dump one with `kdcache dump`)")
        if (self.cache is None) == (self.data is None):
            raise KdcacheError("pass exactly one of --cache or --data")

    @property
    def trainable(self) -> tuple[str, ...]:
        return STAGES[self.stage].trainable

    @property
    def distills(self) -> bool:
        return STAGES[self.stage].distills

    def resolve(self, world_size: int) -> TrainConfig:
        """This config with every stage default filled in: lr, global_batch, template and grad_accum.

        grad_accum defaults to global_batch / (batch_size * world_size), at least 1.
        """
        if world_size < 1:
            raise KdcacheError(f"world_size must be >= 1, got {world_size}")
        stage = STAGES[self.stage]
        global_batch = self.global_batch if self.global_batch is not None else stage.global_batch
        grad_accum = (self.grad_accum if self.grad_accum is not None
                      else max(1, global_batch // (self.batch_size * world_size)))
        return dataclasses.replace(
            self, lr=self.lr if self.lr is not None else stage.lr, global_batch=global_batch,
            template=self.template if self.template is not None else stage.template, grad_accum=grad_accum)
