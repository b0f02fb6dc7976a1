"""What a run logs: one JSON line per logged step (stats.jsonl) and TensorBoard, the loss curve, throughput."""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from get import dist
from get.io import atomic_write_bytes


class StatsLogger:
    """Appends one JSON line per call to stats.jsonl and the scalars to TensorBoard; rank 0 only.

    On resume from step S, lines after S (written after the checkpoint by the interrupted run) are dropped and
    TensorBoard purges events after S, so the logs read as one uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "stats.jsonl"
        self.enabled = dist.is_main()
        self.writer = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        """Writes {"step": step, **stats}; values must be numbers (lists are written to JSON only)."""
        if not self.enabled:
            return
        record = {"step": step, **stats}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> float:
    # A line cut short by a crash, or blank, sorts after every step so that a resume drops it.
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def read_stats(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's stats.jsonl."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: str | os.PathLike, keys: Iterable[str] = ("loss", "loss_last"),
                    path: str | os.PathLike | None = None) -> Path | None:
    """Plots the given stats.jsonl series against the step (log-scale y) to loss.png; None when nothing is logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_stats(run_dir)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    plotted = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key]) and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=key)
            plotted = True
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if plotted:  # nothing positive and finite to plot yet (e.g. only skipped updates): an empty chart, no legend
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path) if path is not None else Path(run_dir) / "loss.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


class Throughput:
    """Images per second between calls of `rate()` (call it where the loop already synchronises)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def update(self, n: int) -> None:
        self.count += n

    def rate(self, reset: bool = True) -> float:
        elapsed = time.perf_counter() - self.start
        value = self.count / elapsed if elapsed > 0 else 0.0
        if reset:
            self.reset()
        return value
