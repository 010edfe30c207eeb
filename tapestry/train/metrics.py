"""What a run tells the person watching it: a progress bar, metrics.jsonl, optional TensorBoard.

Only the main process writes. `metrics.jsonl` holds one JSON object per logged step; on resume
the lines after the checkpoint's step are dropped first, so the file reads as one uninterrupted
run (the steps after the checkpoint are trained, and logged, again).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            from tapestry.atomic import atomic_write_text

            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tapestry.train.config import TrainConfigError

                raise TrainConfigError("log.tensorboard = true needs the tensorboard package: "
                                       "pip install tensorboard") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar (step, loss, tokens/s, ETA) on a terminal; a plain line per log step
    elsewhere (CI logs, files); nothing with quiet."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.live = not quiet and sys.stderr.isatty()
        self.bar = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", speed="-")
            self.bar.start()
        self.started = time.perf_counter()
        self.start_step = start

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if self.bar is not None:
            fields = {}
            if record is not None:
                fields = {"loss": f"{record['loss']:.4f}", "speed": f"{record['tokens_per_s']:.0f}"}
            self.bar.update(self.task, completed=step, **fields)
        elif not self.quiet and record is not None:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / done * (self.total - step) if done else 0.0
            # (+ 0.0: a part a frozen stage skips sums to -0.0, which would print as "-0.0000")
            parts = "".join(f"  {key.removesuffix('_loss')} {value + 0.0:.4f}" for key, value in record.items()
                            if key.endswith("_loss") and not key.startswith("val_"))
            print(f"step {step}/{self.total}  loss {record['loss']:.4f}{parts}  lr {record['lr']:.2e}  "
                  f"{record['tokens_per_s']:.0f} tok/s  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
