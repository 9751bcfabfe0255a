"""Errors that the CLI reports as one clean line (set KDCACHE_DEBUG=1 for the traceback).

A DataLoader worker re-raises an error in the main process as ``type(text)``, where `text` is
"Caught SampleError in DataLoader worker process 0.\\nOriginal Traceback (most recent call last): ..."
(`torch._utils.ExceptionWrapper`). These classes recognise that text and keep only the original
message, so a re-raised error reads (and, for SampleError, names its sample) exactly as the
worker's did.
"""

from __future__ import annotations

import ast
import re

_CAUGHT = re.compile(r"Caught (\w+) ")
_TRACEBACK = "Traceback (most recent call last):"
# str(SampleError(sample_id, reason)): "sample 'id': reason" (the id as Python's repr writes it).
_SAMPLE_MESSAGE = re.compile(r"""sample ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"): (.*)""", re.DOTALL)


def original_message(text: str) -> str:
    """The original exception's message of a traceback re-raised from a worker; `text` itself otherwise.

    The final exception of a formatted traceback is the first unindented line after its last
    "Traceback (most recent call last):" header that names the caught type ("kdcache.errors.SampleError:
    ..."); its message runs from there to the end, over as many lines as it has.
    """
    if "Original Traceback" not in text or _TRACEBACK not in text:
        return text
    caught = _CAUGHT.match(text)
    name = re.escape(caught.group(1)) if caught else r"\w+"
    last = text[text.rindex(_TRACEBACK) + len(_TRACEBACK):]
    match = re.search(rf"^(?:[A-Za-z_][\w.]*\.)?{name}(?:: |$)", last, re.MULTILINE)
    return last[match.end():].strip() if match else text


def one_line(error: BaseException | str, *, limit: int | None = None) -> str:
    """An error's text (a worker's re-raise unwrapped to its original message) with its lines joined by
    spaces: the exception's type name when it has no text, cut to `limit` characters when given."""
    text = " ".join(line.strip() for line in original_message(str(error)).splitlines() if line.strip())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


class KdcacheError(Exception):
    """A known, user-facing failure: bad input, incompatible cache, refused model."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (original_message(args[0]),)
        super().__init__(*args)


class SampleError(KdcacheError):
    """A bad input sample. `sample_id` names it; `reason` is one short line.

    DataLoader workers re-raise an error in the main process as `type(message)`, so a single
    argument is accepted as the whole message: the worker's original ``sample 'id': reason`` is
    recovered from it (sample_id and reason included) when it is there.
    """

    def __init__(self, sample_id: str, reason: str | None = None):
        if reason is None:
            message = original_message(str(sample_id))
            parsed = _parse_sample_message(message)
            sample_id, reason = parsed if parsed is not None else (message, message)
            super().__init__(message)
        else:
            super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason

    def __reduce__(self):
        # Pickling (multiprocessing) rebuilds from (sample_id, reason), not from the formatted message.
        return type(self), (self.sample_id, self.reason)


def _parse_sample_message(message: str) -> tuple[str, str] | None:
    match = _SAMPLE_MESSAGE.fullmatch(message.strip())
    if match is None:
        return None
    try:
        sample_id = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None
    return (sample_id, match.group(2)) if isinstance(sample_id, str) else None


class CacheError(KdcacheError):
    """A cache that cannot be read or trusted: unknown version, bad checksum, unsafe path."""
