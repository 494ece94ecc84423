"""Draw a run's curves to PNG: ``python -m train.plot RUN_DIR [--out FOLDER]``.

Writes loss.png (training loss, cross-entropy and held-out loss), lr.png, grad_norm.png and
expert_load.png (per MoE layer, the largest and smallest fraction of tokens one expert got; the
dashed line is the balanced K/E) into FOLDER (default RUN_DIR/plots).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsv2_jax.training.metrics import read_metrics


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _schedule_of(run_dir: Path, last_step: int):
    """(steps 1..last_step, the LR each ran at) from the run's config.yaml, or None."""
    path = run_dir / "config.yaml"
    if not path.exists() or last_step < 1:
        return None
    import numpy as np
    import yaml

    from dsv2_jax.training import lr_schedule
    from dsv2_jax.training.config import from_dict

    cfg = from_dict(yaml.safe_load(path.read_text()))
    s = cfg.schedule
    lr = lr_schedule(s.peak_lr, s.warmup_steps, cfg.total_steps, decay_points=s.decay_points,
                     decay_factor=s.decay_factor)
    steps = np.arange(1, last_step + 1)
    return steps, np.asarray(lr(steps - 1))  # step s runs at lr(s - 1)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (or it is empty)")
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    # CE first; the total (CE + a balance loss of ~1e-3) dashed on top, or it hides under CE.
    styles = {"ce": dict(lw=2.2, zorder=2), "loss": dict(ls="--", lw=1.2, zorder=3),
              "eval_loss": dict(marker="o", ms=3, zorder=4)}
    for key, label in (("ce", "cross-entropy"), ("loss", "loss (CE + balance)"),
                       ("eval_loss", "held-out cross-entropy")):
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, label=label, **styles[key])
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    # The learning rate of every step from the run's own schedule (logged values are only every
    # logging.every steps, and a line through them turns each step decay into a slope).
    x, y = _series(records, "lr")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    every = _schedule_of(run_dir, max(x) if x else 0)
    if every is not None:
        ax.step(every[0], every[1], where="post", label="schedule (every step)")
    ax.plot(x, y, "o", ms=3, label="logged")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    x, y = _series(records, "grad_norm")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, y)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient global norm (before clipping)")
    ax.grid(alpha=0.3)
    save(fig, "grad_norm.png")

    loads = [r for r in records if "expert_load_max" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted({k for r in loads for k in r["expert_load_max"]}, key=int)
    for i, layer in enumerate(layers):
        color = f"C{i % 10}"
        steps = [r["step"] for r in loads if layer in r["expert_load_max"]]
        ax.plot(steps, [r["expert_load_max"][layer] for r in loads if layer in r["expert_load_max"]],
                color=color, label=f"layer {layer} max")
        ax.plot(steps, [r["expert_load_min"][layer] for r in loads if layer in r["expert_load_min"]],
                color=color, ls=":", label=f"layer {layer} min")
    cfg_path = run_dir / "model_config.json"
    if cfg_path.exists():
        c = json.loads(cfg_path.read_text())
        if c.get("n_routed_experts"):
            ax.axhline(c["num_experts_per_tok"] / c["n_routed_experts"], color="k", ls="--",
                       lw=1, label="balanced K/E")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tokens routed to one expert")
    if layers:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save(fig, "expert_load.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
