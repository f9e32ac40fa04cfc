"""Training telemetry: train_log.jsonl, loss.png, the overfitting warning, early stopping."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.runs.layout import append_jsonl, read_jsonl

log = logging.getLogger(__name__)


@dataclass
class Monitor:
    """Appends rows to the training log and tracks validation loss for early stopping and overfitting."""

    path: Path
    patience: int | None = None
    best_val: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    train_hist: list[tuple[int, float]] = field(default_factory=list)
    val_hist: list[tuple[int, float]] = field(default_factory=list)
    warned_overfit: bool = False

    def log(self, row: dict) -> None:
        append_jsonl(self.path, row)
        if "loss" in row:
            self.train_hist.append((row["step"], row["loss"]))

    def replay(self) -> None:
        """Rebuild loss history and early-stopping state from an existing training log (on resume)."""
        if not self.path.exists():
            return
        train, val = read_metrics(self.path)
        self.train_hist = list(train)
        for step, loss in val:
            self._record(step, loss)

    def validation(self, step: int, val_loss: float) -> bool:
        """Record a validation loss; return True when early stopping says stop."""
        self.log({"step": step, "val_loss": val_loss})
        return self._record(step, val_loss)

    def _record(self, step: int, val_loss: float) -> bool:
        self.val_hist.append((step, val_loss))
        self._check_overfit()
        if val_loss < self.best_val - 1e-4:
            self.best_val, self.best_step, self.bad_evals = val_loss, step, 0
            return False
        self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def _check_overfit(self) -> None:
        if len(self.val_hist) < 3 or self.warned_overfit:
            return
        (s0, v0), (s1, v1), (s2, v2) = self.val_hist[-3:]
        train_then = [loss for s, loss in self.train_hist if s0 - 10 <= s <= s0]
        train_now = [loss for s, loss in self.train_hist if s2 - 10 <= s <= s2]
        if v2 > v1 > v0 and train_then and train_now and _mean(train_now) < _mean(train_then):
            self.warned_overfit = True
            log.warning(f"warning: validation loss rose {v0:.4f} -> {v2:.4f} while train loss fell: the model is "
                        "overfitting. Use fewer epochs, more data or more regularisation (validation.patience "
                        "stops early).")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) loss series from a training log (a torn last line is skipped)."""
    train, val = [], []
    for row in read_jsonl(path, skip_bad=True):
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    return train, val


def plot_losses(metrics_path: Path, out_png: Path) -> Path:
    """Write loss.png with train and validation curves from the training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weighted loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
