"""The training job's configuration: one frozen dataclass; stage defaults from the paper (DESIGN §6)."""

from __future__ import annotations

from dataclasses import dataclass

# stage -> (trainable parts, learning rate, global batch, template, distils from a cache)
STAGES: dict[str, tuple[tuple[str, ...], float, int, str, bool]] = {
    "pt":  (("projector",), 1e-3, 256, "plain", False),
    "sft": (("projector", "llm"), 2e-5, 128, "qwen2_base", False),
    "dpt": (("projector",), 1e-3, 256, "plain", True),
    "dft": (("projector", "llm"), 2e-5, 128, "qwen2_base", True),
}


@dataclass(frozen=True)
class TrainConfig:
    stage: str                          # pt | sft | dpt | dft
    student: str                        # checkpoint dir, hub id or preset name
    out: str                            # run directory
    cache: str | None = None            # kdcache cache (required for dpt / dft)
    data: str | None = None             # LLaVA JSON / JSONL (pt / sft without a cache)
    images: str | None = None           # image folder for --data, or for a cache dumped with --no-embed-images
    template: str | None = None         # default: the stage's (plain for pt/dpt, qwen2_base for sft/dft)
    max_length: int = 2048
    lr: float | None = None             # default: the stage's (1e-3 pt/dpt, 2e-5 sft/dft)
    global_batch: int | None = None     # default: the stage's (256 pt/dpt, 128 sft/dft)
    batch_size: int = 4                 # per device
    grad_accum: int | None = None       # default: global_batch / (batch_size * world_size)
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    clip_grad: float | None = None      # off, as in the paper's code
    alpha: float = 1.0                  # weight of the response-token KL
    beta: float = 1.0                   # weight of the visual-token KL
    gamma: float = 0.5                  # weight of the relation loss
    tail: str = "bucket"                # bucket | renorm
    loss_norm: str = "token"            # token | sample
    chunk_rows: int = 512
    grad_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    save_every: int = 500               # optimizer steps between checkpoints (and at the end)
    log_every: int = 1
    resume: bool = False
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from kdcache.errors import KdcacheError

        if self.stage not in STAGES:
            raise KdcacheError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if STAGES[self.stage][4] and self.cache is None:
            raise KdcacheError(f"stage {self.stage} distils from a cache: pass --cache (dump one with `kdcache dump`)")
        if (self.cache is None) == (self.data is None):
            raise KdcacheError("pass exactly one of --cache or --data")
        if self.tail not in ("bucket", "renorm"):
            raise KdcacheError(f"unknown tail {self.tail!r}; choose bucket or renorm")
        if self.loss_norm not in ("token", "sample"):
            raise KdcacheError(f"unknown loss_norm {self.loss_norm!r}; choose token or sample")
        if self.template is not None and self.template not in ("plain", "qwen2_base"):
            raise KdcacheError(f"unknown template {self.template!r}; choose plain or qwen2_base")

    @property
    def trainable(self) -> tuple[str, ...]:
        return STAGES[self.stage][0]

    @property
    def distils(self) -> bool:
        return STAGES[self.stage][4]

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else STAGES[self.stage][1]

    @property
    def resolved_global_batch(self) -> int:
        return self.global_batch if self.global_batch is not None else STAGES[self.stage][2]

    @property
    def resolved_template(self) -> str:
        return self.template if self.template is not None else STAGES[self.stage][3]
