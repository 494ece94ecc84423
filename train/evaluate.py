"""Held-out loss and expert load of a model folder: ``python -m train.evaluate``.

    python -m train.evaluate dsv2_jax/demo/shakespeare --text data/shakespeare.txt.gz \
        --heldout-fraction 0.05 --seq-len 256 --dtype float32

Tokenizes the text with the model's tokenizer, takes the last ``--heldout-fraction`` of the
tokens (all of them by default), cuts it into windows of ``--seq-len`` + 1 tokens and reports
the mean next-token cross-entropy (nats), the perplexity, and per MoE layer the fraction of
tokens each expert received relative to the mean (1.0 = perfectly balanced): a table, or one
JSON object with ``--json``.
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
        raise ValueError(f"--text: {len(held)} tokens to score; one window needs --seq-len + 1 = "
                         f"{seq_len + 1} (pass a smaller --seq-len)")
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
    for i in range(0, len(windows), batch):  # the last batch may be smaller (one more compile)
        s, n, l = step(state, jnp.asarray(windows[i:i + batch]))
        total, count, loads = total + float(s), count + float(n), loads + np.asarray(l)
    if count == 0:
        raise ValueError("no windows to score")
    loss = total / count
    load = loads / count  # [layers, E], sums to K per layer
    relative = load / (cfg.num_experts_per_tok / cfg.n_routed_experts)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count),
            "expert_load_relative": relative.round(3).tolist(),
            "max_relative_load": float(relative.max()), "min_relative_load": float(relative.min())}


def _table(result: dict, args) -> str:
    lines = [f"{args.model} on {args.text} ({result['tokens']:,} tokens, {args.seq_len}-token windows"
             + (f", last {args.heldout_fraction:g} of the text" if args.heldout_fraction < 1 else "")
             + ")",
             f"  loss        {result['loss']:.4f} nats",
             f"  perplexity  {result['perplexity']:.2f}"]
    if result["expert_load_relative"]:
        lines.append(f"  expert load {result['min_relative_load']:.2f}x .. "
                     f"{result['max_relative_load']:.2f}x of a balanced router (per MoE layer: "
                     "min .. max)")
        for i, row in enumerate(result["expert_load_relative"]):
            lines.append(f"    MoE layer {i}: {min(row):.2f} .. {max(row):.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model folder or hub repo id (with tokenizer files)")
    p.add_argument("--text", required=True, help="text file to score (.txt or .txt.gz)")
    p.add_argument("--heldout-fraction", type=float, default=1.0,
                   help="score only the last fraction of the text's tokens (e.g. 0.05 for the "
                        "part a training run held out); 1 scores all of it")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per scored window")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
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
        result = evaluate(model, windows, args.batch)
        print(json.dumps(result) if args.json else _table(result, args))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
