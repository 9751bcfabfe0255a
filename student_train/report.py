"""What a training run reports: RUN/metrics.jsonl (one line per optimizer step) and RUN/loss.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdcache.errors import KdcacheError

COMPONENTS = ("loss", "ce", "kl_response", "kl_visual", "relation")


class MetricsLog:
    """RUN/metrics.jsonl, appended one JSON line per logged optimizer step (rank 0 only).

    Opened at `step` (0, or the checkpoint a run resumes from), it first drops the lines a killed
    run wrote after that step, so a resumed run never has two lines for one step, and a last line the
    kill cut short (`kept_lines`). `samples_per_step` (global) gives the throughput since the run
    (re)started.
    """

    def __init__(self, path: Path, *, step: int, samples_per_step: int, enabled: bool = True):
        self.path, self.samples_per_step, self.enabled = Path(path), samples_per_step, enabled
        self.first_step, self.started = step, time.perf_counter()
        self.file = None
        if enabled:
            if self.path.exists():
                kept = kept_lines(self.path, step)
                self.path.write_text("".join(line + "\n" for line in kept))
            self.file = open(self.path, "a")

    def rate(self, step: int) -> float:
        """Samples per second (global) since the run (re)started."""
        return (step - self.first_step) * self.samples_per_step / max(time.perf_counter() - self.started, 1e-9)

    def write(self, step: int, losses: dict[str, float], *, lr: float, samples_seen: int) -> None:
        if self.file is None:
            return
        record = {"step": step, **{k: round(v, 6) for k, v in losses.items()}, "lr": lr,
                  "samples_seen": samples_seen, "samples_per_s": round(self.rate(step), 2)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def kept_lines(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl for steps <= `step`.

    A last line that is not a whole record (a run killed while writing it) is dropped; a bad line
    before the last is not something a kill leaves, and is refused naming it.
    """
    lines = Path(path).read_text(errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
            if not isinstance(record_step, int):
                raise TypeError(f"step {record_step!r} is not an int")
        except (ValueError, KeyError, TypeError) as e:
            if number == last:
                break                                   # cut short by a kill: the resumed run writes it again
            raise KdcacheError(f"{path} line {number} is not a metrics record ({' '.join(str(e).split())}); "
                               "delete that line, then resume again") from None
        if record_step <= step:
            kept.append(line)
    return kept


def plot_metrics(metrics: Path, out: Path, *, title: str = "") -> None:
    """Plot each non-zero loss component of `metrics` (metrics.jsonl) into the PNG `out`."""
    import matplotlib  # a dependency, imported here: only the end of a run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in COMPONENTS:
        values = [r.get(name, 0.0) for r in rows]
        if any(values):
            ax.plot([r["step"] for r in rows], values, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
