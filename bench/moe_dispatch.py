"""Routed-expert dispatch on the CPU: the three paths of ``moe._dispatch`` timed side by side.

    python bench/moe_dispatch.py                      # 16 experts top-4 and 64 top-6, N = 1 ... 512
    python bench/moe_dispatch.py --tokens 1,8 --dtype bfloat16

For N tokens (random routing, K distinct experts each), one MoE layer's routed experts
(forward only, jitted) through:

- ``gather``: each of the N·K pairs gathers a copy of its expert's weights;
- ``every``: every token through every expert (one batched matmul over the expert axis);
- ``sorted``: pairs sorted by expert, the tiled grouped matmul.

Each path is forced by patching ``moe._path``; ``chosen`` is the path it takes unpatched. The outputs of the three
are compared (max |Δ|). Medians of ``--repeat`` calls after a warm-up, in ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # experts, top-k, hidden, expert intermediate
    "16x4": (16, 4, 512, 256),
    "64x6": (64, 6, 512, 128),
    "v2lite": (64, 6, 2048, 1408),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="16x4,64x6", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsv2_jax import moe

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    dtype = jnp.dtype(args.dtype)
    choose = moe._path
    print(f"machine: {os.cpu_count()} CPUs, {jax.devices()[0].platform}; {args.dtype}; ms per call")
    for shape in args.shapes.split(","):
        e, k, h, i = SHAPES[shape]
        rng = np.random.default_rng(0)
        w = [jnp.asarray(rng.standard_normal(s) * 0.05, dtype) for s in ((e, h, i), (e, h, i), (e, i, h))]
        for n in (int(t) for t in args.tokens.split(",")):
            x = jnp.asarray(rng.standard_normal((n, h)), dtype)
            idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
            weight = jnp.asarray(rng.random((n, k)), jnp.float32)
            times, outs = {}, {}
            for name in ("gather", "every", "sorted"):
                moe._path = lambda *_, name=name: name
                f = jax.jit(lambda x, idx, wt, a, b, c: moe._dispatch(x, idx, wt, a, b, c, e))
                outs[name] = np.asarray(f(x, idx, weight, *w), np.float32)
                times[name] = timed(f, x, idx, weight, *w)
            moe._path = choose
            chosen = choose(n, k, e, w[0])
            diff = max(float(np.max(np.abs(outs[a] - outs["sorted"]))) for a in ("gather", "every"))
            best = min(times, key=times.get)
            print(f"{shape:6s} E {e:3d} K {k} N {n:4d}: " + "  ".join(f"{a} {t:8.3f}" for a, t in times.items())
                  + f"  | fastest {best:6s} chosen {chosen:6s} | max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
