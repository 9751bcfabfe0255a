"""Helpers of the CLI tests: a dump's arguments on the toy data, and the one `error:` line of a failed command."""

from __future__ import annotations


def dump_args(teacher, data, images, out, *extra: str) -> list[str]:
    return ["dump", "--teacher", str(teacher), "--data", str(data), "--images", str(images), "--out", str(out),
            "--device", "cpu", "--no-progress", "--batch-size", "2", *extra]


def error_line(result) -> str:
    """The one `error:` line of a failed command, with no traceback anywhere."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]
