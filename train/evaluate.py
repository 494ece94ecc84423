"""Held-out loss and expert load of a model folder: ``python -m train.evaluate``.

    python -m train.evaluate dsv2_jax/demo/shakespeare --text data/shakespeare.txt.gz \
        --heldout-fraction 0.05 --seq-len 256 --dtype float32

Tokenizes the text with the model's tokenizer, takes the last ``--heldout-fraction`` of the
tokens, cuts it into windows of ``--seq-len`` + 1 tokens and reports the mean next-token
cross-entropy (nats), the perplexity, and per MoE layer the fraction of tokens each expert
received relative to the mean (1.0 = perfectly balanced).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def heldout_windows(tok, text: str, fraction: float, seq_len: int, max_windows: int | None):
    ids = np.asarray(tok.encode(text), np.int32)
    start = int(len(ids) * (1 - fraction)) if fraction < 1 else 0
    held = ids[start:]
    n = (len(held) - 1) // seq_len
    if n < 1:
        raise ValueError(f"--text: only {len(held)} held-out tokens; need more than --seq-len {seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return np.stack([held[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def evaluate(model, windows: np.ndarray, batch: int = 8) -> dict:
    """Mean cross-entropy over all windows and per-layer expert load (relative to the mean)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax.training.losses import cross_entropy, expert_load

    graphdef, state = nnx.split(model)
    cfg = model.config

    @jax.jit
    def step(state, x):
        out = nnx.merge(graphdef, state).forward(x[:, :-1])
        loss, n = cross_entropy(out.logits, x[:, 1:])
        loads = jnp.stack([expert_load(r, cfg.n_routed_experts) for r in out.routings])
        return loss * n, n, loads * n

    total, count, loads = 0.0, 0.0, 0.0
    for i in range(0, len(windows) - batch + 1, batch):
        s, n, l = step(state, jnp.asarray(windows[i:i + batch]))
        total, count, loads = total + float(s), count + float(n), loads + np.asarray(l)
    if count == 0:
        raise ValueError(f"need at least {batch} windows, got {len(windows)}")
    loss = total / count
    load = loads / count  # [layers, E], sums to K per layer
    relative = load / (cfg.num_experts_per_tok / cfg.n_routed_experts)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count),
            "expert_load_relative": relative.round(3).tolist(),
            "max_relative_load": float(relative.max()), "min_relative_load": float(relative.min())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder or hub repo id (with tokenizer files)")
    p.add_argument("--text", required=True, help="text file to score (.txt or .txt.gz)")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    import dsv2_jax
    from dsv2_jax.training.data import open_text

    try:
        model = dsv2_jax.load(args.model, dtype=args.dtype)
        if model.tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer files")
        with open_text(Path(args.text)) as f:
            text = f.read()
        windows = heldout_windows(model.tokenizer, text, args.heldout_fraction, args.seq_len,
                                  args.max_windows)
        print(json.dumps(evaluate(model, windows, args.batch)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
