"""What a run logs, on the main rank: `metrics.jsonl` (one JSON object per logged step), TensorBoard when
it is installed, and the `loss.png` curve at the end. (`metrics.py` is something else: BLEU and CIDEr.)

A resumed run first drops the records the interrupted one wrote after its last saved state, so the file
reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmgpt.training")

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard when installed; main rank only."""

    def __init__(self, out: Path, enabled: bool, start_step: int):
        self.path = Path(out) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        # A resumed run drops what the interrupted one logged after its last saved state.
        kept = []
        if start_step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", self.path)
        else:
            self.tb = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_losses(out: Path, title: str) -> Path | None:
    records = read_metrics(out)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / LOSS_PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
