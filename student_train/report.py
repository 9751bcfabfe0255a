"""RUN/loss.png: the loss components of metrics.jsonl against step."""

from __future__ import annotations

import json
from pathlib import Path

COMPONENTS = ("loss", "ce", "kl_response", "kl_visual", "relation")


def plot_metrics(metrics: Path, out: Path, *, title: str = "") -> Path | None:
    """Plot each non-zero loss component; returns the PNG path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
    return Path(out)
