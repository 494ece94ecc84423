"""Parts of the training step timed alone, forward + backward, against the forms they replaced.

    python bench/train_parts.py            # the shapes of bench/train_vs_hf.py (8 x 256 tokens)

- head: lm_head + cross-entropy. ``losses.head_cross_entropy`` (chunked, gradients formed in
  the forward pass) against autodiff of ``cross_entropy(x @ W)`` and against torch
  (``F.cross_entropy`` of a ``Linear``, backward).
- experts: the routed FFN of one MoE layer on the CPU. ``moe._dispatch`` with the FFN in the
  tile layout (``expert_weights.tiled_ffn``) against three ``grouped_matmul`` calls.
- attention: one layer's materialised attention (8 x 4 heads x 256 x 256), the softmax
  normalised after the value product with an additive mask, against ``jax.nn.softmax`` of the
  masked scores.

Each pair is timed alternately in one process (medians); float32, this machine's CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fns: dict, args: dict, rounds: int = 5, reps: int = 5) -> dict:
    """Median seconds of each ``fns[name](*args[name])``, the names alternating round by round."""
    import jax
    import numpy as np

    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args[name]))
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def head(b, t, h, v):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from dsv2_jax.training.losses import cross_entropy, head_cross_entropy

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, h)).astype(np.float32))
    w = jnp.asarray((rng.standard_normal((h, v)) * 0.05).astype(np.float32))
    tg = jnp.asarray(rng.integers(0, v, (b, t)).astype(np.int32))
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    fused = grad(lambda x, w: head_cross_entropy(x, w, tg)[0])
    logits = grad(lambda x, w: cross_entropy(x @ w, tg)[0])
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    lin = torch.nn.Linear(h, v, bias=False)
    tt = torch.tensor(np.asarray(tg)).long()

    def theirs():
        loss = torch.nn.functional.cross_entropy(lin(tx).reshape(-1, v), tt.reshape(-1))
        loss.backward()
        tx.grad = lin.weight.grad = None
        return np.zeros(())

    a, c = fused(x, w), logits(x, w)
    err = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    s = timed({"fused": fused, "logits": logits, "torch": theirs}, {"fused": (x, w), "logits": (x, w), "torch": ()})
    return s, err


def experts(n, k, e, h, i):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsv2_jax import expert_weights as ew
    from dsv2_jax import moe

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h)).astype(np.float32))
    idx = jnp.asarray(np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32))
    wt = jnp.asarray(rng.random((n, k)).astype(np.float32))
    ws = [jnp.asarray((rng.standard_normal(s) * 0.1).astype(np.float32)) for s in ((e, h, i), (e, h, i), (e, i, h))]
    probe = jnp.asarray(rng.standard_normal((n, h)).astype(np.float32))

    def grad(tiled: bool):
        def loss(x, *w):
            fits = ew.tiled_ffn_fits
            ew.tiled_ffn_fits = fits if tiled else (lambda *_: False)
            try:
                return jnp.sum(moe._dispatch(x, idx, wt, *w, e) * probe)
            finally:
                ew.tiled_ffn_fits = fits
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    a, b = grad(True)(x, *ws), grad(False)(x, *ws)
    err = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    s = timed({"tile layout": grad(True), "grouped matmuls": grad(False)}, {"tile layout": (x, *ws), "grouped matmuls": (x, *ws)})
    return s, err


def attention(b, nh, t, d, dv):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((b, nh, t, d)).astype(np.float32)) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, nh, t, dv)).astype(np.float32))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    scale, neg = d ** -0.5, -1e30

    def softmax_first(q, k, v):  # the form replaced (mla._materialised before)
        s = jnp.where(mask[:, None], jnp.einsum("bntd,bnsd->bnts", q, k) * scale, neg)
        return jnp.einsum("bnts,bnsd->bntd", jax.nn.softmax(s, axis=-1), v)

    def normalise_after(q, k, v):  # mla._materialised now
        s = jnp.einsum("bntd,bnsd->bnts", q, k) * scale + jnp.where(mask, 0.0, neg)[:, None]
        e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        return jnp.einsum("bnts,bnsd->bntd", e, v) / jnp.sum(e, axis=-1, keepdims=True)

    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))  # noqa: E731
    err = max(float(jnp.max(jnp.abs(p - r))) for p, r in zip(grad(normalise_after)(q, k, v), grad(softmax_first)(q, k, v)))
    fns = {"normalise after": grad(normalise_after), "softmax first": grad(softmax_first),
           "fwd: normalise after": jax.jit(normalise_after), "fwd: softmax first": jax.jit(softmax_first)}
    return timed(fns, {name: (q, k, v) for name in fns}), err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    args = p.parse_args(argv)
    import os

    print(f"machine: {os.cpu_count()} CPUs; float32; ms, forward + backward unless marked fwd")
    n = args.batch * args.seq
    for name, (s, err) in [
        (f"head ({args.batch} x {args.seq} tokens, {args.hidden} -> {args.vocab})", head(args.batch, args.seq, args.hidden, args.vocab)),
        (f"experts ({n} tokens top-{args.topk} of {args.experts}, {args.hidden} x {args.hidden // 4})",
         experts(n, args.topk, args.experts, args.hidden, args.hidden // 4)),
        (f"attention ({args.batch} x 4 heads x {args.seq}^2)", attention(args.batch, 4, args.seq, 48, 32)),
    ]:
        cells = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in s.items())
        print(f"{name}: {cells}  (max |difference| {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
