"""Errors that the CLI reports as one clean line (set KDCACHE_DEBUG=1 for the traceback)."""


class KdcacheError(Exception):
    """A known, user-facing failure: bad input, incompatible cache, refused model."""


class SampleError(KdcacheError):
    """A bad input sample. `sample_id` names it; `reason` is one short line.

    DataLoader workers re-raise an error in the main process as `type(message)`, so a single
    argument is accepted as the whole message.
    """

    def __init__(self, sample_id: str, reason: str | None = None):
        super().__init__(sample_id if reason is None else f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason if reason is not None else sample_id


class CacheError(KdcacheError):
    """A cache that cannot be read or trusted: unknown version, bad checksum, unsafe path."""
