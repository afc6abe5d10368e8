"""Run metrics: one JSON object per line, appended and fsync'ed; optional TensorBoard; a PNG plot.

On resume from a checkpoint at step s, records logged after s (by the killed run) are dropped, so the log of a
resumed run equals the log of an uninterrupted one. A torn last line (killed mid-write) is dropped as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import write_jsonl


class MetricsLog:
    def __init__(self, path, *, resume_step: int | None, tensorboard_dir=None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.writer = None
        if not enabled:
            return
        kept = [r for r in self.records() if resume_step is not None and r.get("step", 0) <= resume_step]
        write_jsonl(self.path, kept)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("tensorboard: true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(
                str(tensorboard_dir), purge_step=None if resume_step is None else resume_step + 1
            )

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line
        return records

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "iteration"):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_training(records: list[dict], path, *, title: str) -> Path:
    """Two panels over optimiser steps: training loss, and the MI lower bound (training batches and held-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    held = [r for r in records if r.get("kind") == "heldout"]
    fig, (ax_loss, ax_mi) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker="o", label="training loss")
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_ylabel("InfoNCE loss (nats)")
    ax_mi.plot([r["step"] for r in train], [r["mi"] for r in train], marker="o", label="training batch")
    ax_mi.plot([r["step"] for r in held], [r["mi"] for r in held], marker="s", label="held-out")
    ax_mi.set_xlabel("optimiser step")
    ax_mi.set_ylabel("MI lower bound log N - L (nats)")
    for ax in (ax_loss, ax_mi):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
