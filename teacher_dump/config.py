"""The dump job's configuration: one frozen dataclass, defaults from the paper's real run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DumpConfig:
    teacher: str                       # checkpoint dir, hub id or preset name
    data: str                          # LLaVA JSON / JSONL
    out: str                           # cache directory
    images: str | None = None          # image folder (None: text-only data)
    template: str = "qwen2_base"       # plain | qwen2_base
    topk_response: int = 64
    topk_visual: int = 64
    temperature_response: float = 1.0
    temperature_visual: float = 1.0
    relation: bool = True
    embed_images: bool = True
    batch_size: int = 8
    max_samples: int | None = None
    max_length: int = 2048
    shard_size_mb: float = 512.0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16
    chunk_rows: int = 256              # rows per LM-head chunk in top-k extraction
    skip_bad: bool = False
    allow_untrained: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        from kdcache.errors import KdcacheError

        if self.template not in ("plain", "qwen2_base"):
            raise KdcacheError(f"unknown template {self.template!r}; choose plain or qwen2_base")
        for name in ("topk_response", "topk_visual", "batch_size", "max_length", "chunk_rows"):
            if getattr(self, name) < 1:
                raise KdcacheError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature_response", "temperature_visual", "shard_size_mb"):
            if getattr(self, name) <= 0:
                raise KdcacheError(f"{name} must be > 0, got {getattr(self, name)}")
