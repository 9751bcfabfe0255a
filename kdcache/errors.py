"""Errors that the CLI reports as one clean line (set KDCACHE_DEBUG=1 for the traceback)."""


class KdcacheError(Exception):
    """A known, user-facing failure: bad input, incompatible cache, refused model."""


class SampleError(KdcacheError):
    """A bad input sample. `sample_id` names it; `reason` is one short line."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class CacheError(KdcacheError):
    """A cache that cannot be read or trusted: unknown version, bad checksum, unsafe path."""
