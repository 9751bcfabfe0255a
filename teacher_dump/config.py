"""The dump job's configuration: one frozen dataclass, defaults from the paper's real run.

Each field is declared once, here: `kdcache dump` derives its flags, help and defaults from these
fields and their ``metadata`` (``help``; ``ge`` / ``gt`` ranges checked by `kdcache.config.check_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcache.codecs import CodecName
from kdcache.config import DEVICE_PATTERN, MAX_IMAGE_MB, MAX_IMAGE_PIXELS, DTypeName, TargetKind, check_fields
from kdcache.errors import KdcacheError
from kdcache.templates import TemplateName


@dataclass(frozen=True)
class DumpConfig:
    teacher: str = field(metadata={"help": "Teacher: checkpoint dir, hub id or preset (qwen1.5-4b, ...)."})
    data: str = field(metadata={"help": "LLaVA JSON or JSONL dataset."})
    out: str = field(metadata={"help": "Cache directory to write (resumed if partial, see --resume).", "local": True})
    images: str | None = field(default=None, metadata={
        "help": "Folder the dataset's image paths are relative to (none: text-only data)."})
    template: TemplateName = field(default="qwen2_base", metadata={"help": "Conversation template."})
    topk_response: int = field(default=64, metadata={"help": "k at response rows.", "ge": 1})
    topk_visual: int = field(default=64, metadata={"help": "k at visual rows.", "ge": 1})
    temperature_response: float = field(default=1.0, metadata={
        "help": "Softmax temperature at response rows.", "gt": 0})
    temperature_visual: float = field(default=1.0, metadata={"help": "Softmax temperature at visual rows.", "gt": 0})
    response_targets: TargetKind = field(default="topk", metadata={
        "help": "What response rows store: the teacher's top-k, or --draws tokens sampled from its full "
                "distribution (RS-KD, trained with the unbiased KL estimate)."})
    visual_targets: TargetKind = field(default="topk", metadata={
        "help": "What visual rows store: topk or sampled (as --response-targets)."})
    draws: int = field(default=16, metadata={
        "help": "Tokens sampled per row (with replacement) for a role with sampled targets.", "ge": 1})
    seed: int = field(default=0, metadata={
        "help": "Seed of the sampled targets' draws (with each sample id: reproducible and resumable).", "ge": 0})
    relation: bool = field(default=True, metadata={"help": "Store relation matrices."})
    embed_images: bool = field(default=True, metadata={"help": "Embed image bytes in the cache."})
    codec: CodecName = field(default="lossless", metadata={
        "help": "Shard encoding: lossless (format 2, bit-exact values, smaller), compact (format 2, quantised "
                "log-probs and relation, smallest; error bounds in docs/design.md) or v1 (format 1, for older "
                "readers)."})
    fidelity_sample: int = field(default=0, metadata={
        "help": "Measure the cache's fidelity on the first N samples dumped (per role, the loss's KL of a student "
                "equal to the teacher against its full distribution, after the codec; the relation's cosine to "
                "the exact one) into the manifest; 0: off.", "ge": 0})
    batch_size: int = field(default=8, metadata={"help": "Samples per teacher forward.", "ge": 1})
    max_samples: int | None = field(default=None, metadata={"help": "Dump only the first N samples.", "ge": 1})
    max_length: int = field(default=2048, metadata={"help": "Longest sequence allowed, in tokens.", "ge": 1})
    shard_size_mb: float = field(default=512.0, metadata={"help": "Target shard size in MB.", "gt": 0})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N.", "pattern": DEVICE_PATTERN,
                                                  "pattern_help": "auto, cpu, cuda or cuda:N"})
    dtype: DTypeName = field(default="auto", metadata={
        "help": "Teacher dtype; auto is bfloat16 on a GPU that supports it, float32 elsewhere."})
    chunk_rows: int = field(default=256, metadata={"help": "Rows per LM-head chunk in top-k extraction.", "ge": 1})
    skip_bad: bool = field(default=False, metadata={"help": "Skip bad samples, listing them in the manifest."})
    max_image_mb: float = field(default=MAX_IMAGE_MB, metadata={
        "help": "Largest image file read, in MB; a larger one is a bad sample.", "gt": 0})
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={
        "help": "Most pixels (width x height) an image may have; a larger one is a bad sample.", "ge": 1})
    allow_untrained: bool = field(default=False, metadata={
        "help": "Dump a teacher whose projector was never trained."})
    resume: bool = field(default=True, metadata={
        "help": "Resume a partial cache at --out; --no-resume refuses a non-empty --out."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        check_fields(self)
        sampled = [role for role in ("response", "visual") if self.target_kind(role) == "sampled"]
        if sampled and self.codec == "v1":
            raise KdcacheError(f"--{sampled[0]}-targets sampled needs --codec lossless or compact: a sampled cache "
                               "is format_version 3, and --codec v1 writes format 1 for older readers, which would "
                               "train sampled rows with the top-k loss")

    def target_kind(self, role: str) -> str:
        """"topk" or "sampled": what the role's rows store."""
        return self.response_targets if role == "response" else self.visual_targets

    def row_width(self, role: str) -> int:
        """Entries per row of the role (the manifest's `topk`): its k for top-k, --draws for sampled targets."""
        if self.target_kind(role) == "sampled":
            return self.draws
        return self.topk_response if role == "response" else self.topk_visual
