"""What a run records: one JSON line per step, TensorBoard events, PNG plots, reflection words."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The paper tracks these as a sign of reflective long-CoT behaviour.
REFLECTION_WORDS = ("wait", "recheck", "retry", "alternatively", "however")
_REFLECTION_RE = {w: re.compile(rf"\b{w}\b", re.IGNORECASE) for w in REFLECTION_WORDS}


def reflection_counts(texts: Iterable[str]) -> dict[str, float]:
    """Mean occurrences per response of each reflection word (whole words, any case)."""
    texts = list(texts)
    if not texts:
        return {f"reflection/{w}": 0.0 for w in REFLECTION_WORDS}
    return {
        f"reflection/{w}": sum(len(rx.findall(t)) for t in texts) / len(texts)
        for w, rx in _REFLECTION_RE.items()
    }


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` (and TensorBoard when installed and enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, keep_rows: int | None = None, write: bool = True):
        """``keep_rows``: continue an existing metrics.jsonl from its first ``keep_rows`` rows,
        dropping the rest (a resumed run logs the steps after its checkpoint again). ``write``:
        False keeps the rows in memory only (the ranks other than 0 of a distributed run)."""
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.write = write
        if not write:
            tensorboard = False
            if keep_rows is not None:
                self.rows = [{} for _ in range(keep_rows)]
        elif keep_rows is not None:
            lines = self.path.read_text().splitlines()[:keep_rows] if self.path.exists() else []
            self.rows = [json.loads(line) for line in lines]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, self.path)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                tb_dir = run_dir / "tensorboard"
                if keep_rows is not None:
                    # Event files cannot be cut back to a row: rebuild them from the rows kept,
                    # so that the steps after the checkpoint are not in them twice.
                    shutil.rmtree(tb_dir, ignore_errors=True)
                self._tb = SummaryWriter(str(tb_dir))
                for i, row in enumerate(self.rows):
                    self._to_tensorboard(row, i + 1)

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in row.items()}
        self.rows.append(clean)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        self._to_tensorboard(clean, len(self.rows))

    def _to_tensorboard(self, row: dict[str, Any], index: int) -> None:
        if self._tb is None:
            return
        step = int(row.get("step", index))
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self._tb.add_scalar(f"{row.get('phase', 'rl')}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


PLOTS = {
    "reward": ("reward/mean", "mean reward"),
    "accuracy": ("accuracy", "train accuracy (sampled)"),
    "length": ("response_length/mean", "mean response length (tokens)"),
    "kl": ("kl", "KL to the reference"),
}


def save_plots(rows: list[dict[str, Any]], out_dir: Path, evals: list[dict[str, Any]] | None = None) -> list[Path]:
    """One PNG per curve in PLOTS over the RL steps; held-out accuracy joins the accuracy plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = [r for r in rows if r.get("phase") == "rl"]
    written = []
    for name, (key, title) in PLOTS.items():
        points = [(r["step"], r[key]) for r in rl if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points), label=key)
        if name == "accuracy" and evals:
            ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="held-out (greedy)")
            ax.legend()
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
