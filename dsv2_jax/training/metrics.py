"""Training metrics: RUN_DIR/metrics.jsonl (one JSON object per logged step), TensorBoard event
files in RUN_DIR/tb, and a tqdm progress bar on stderr.

A line of metrics.jsonl::

    {"step": 20, "loss": 3.1, "ce": 3.09, "balance_loss": 0.0021, "lr": 0.0004, "grad_norm": 0.8,
     "tokens_per_s": 9800.0, "step_time_s": 0.21, "target_tokens": 2040,
     "expert_load_max": {"1": 0.41, "2": 0.38}, "expert_load_min": {"1": 0.12, "2": 0.15}}

``lr`` is the learning rate of that step's update (step 1 runs at ``lr(0)``, 0 during a warm-up
from 0); ``loss`` = ``ce`` (mean over the step's target tokens) + ``balance_loss`` (summed over
MoE layers); ``grad_norm`` is the global norm before clipping; ``tokens_per_s`` counts every
input token (``global_batch x seq_len`` per step) over the steps since the last line.
``expert_load_*`` are keyed by decoder-layer index: the largest and smallest fraction of the
step's tokens routed to one expert of that MoE layer (a balanced router gives K/E to every
expert). Evaluation lines carry ``eval_loss`` instead.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop lines past ``step`` (a resumed run rewrites them)."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True):
        self.file = open(Path(run_dir) / METRICS_FILE, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
        self.bar = None
        if progress:
            from tqdm import tqdm

            # disable=None: a bar on a terminal; in a log file a line per logged step instead
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5, disable=None)
            if self.bar.disable:
                self.bar = None
        self.lines = progress and self.bar is None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, dict):
                    for layer, x in v.items():
                        self.tb.add_scalar(f"{k}/layer{layer}", x, step)
                elif isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
            self.tb.flush()
        if "loss" in record:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            elif self.lines:
                print(f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.3e} "
                      f"grad norm {record['grad_norm']:.3f} {record['tokens_per_s']:.0f} tok/s",
                      file=sys.stderr, flush=True)
        elif "eval_loss" in record and (self.bar is not None or self.lines):
            self.message(f"step {record['step']}: eval loss {record['eval_loss']:.4f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
