"""What absorbed MLA decode attention must cost on this CPU, from its two products alone.

    python bench/decode_attention_floor.py                 # V2-Lite attention shapes, float32
    python bench/decode_attention_floor.py --filled 256,3000,8000 --layers 2

One decode step of absorbed MLA attends each head's latent query (rank 512 + rope 64) to every
filled latent slot, then sums the latents by those weights: per layer and batch row a
[16, 576] × [576, S] product and a [16, S] × [S, 512] one, 2 · 16 · 1,088 FLOPs per filled
slot. This times those two products written plainly (with the softmax between them, jitted,
the caches of ``--layers`` layers read in turn so they are not all in cache) at each filled
length, and the machine's float32 matmul rate on a large square product; the FLOPs that the
longer contexts add, at that rate, are a floor under the decode-step growth that
``bench/generate_vs_hf.py --attention v2lite`` measures for the whole model (no kernel does
these FLOPs faster than the machine's best matmul).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--filled", default="256,3000,8000", help="filled cache slots, comma-separated")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    d = args.rank + args.rope

    @jax.jit
    def attend(q, cache):  # q [nh, rank + rope], cache [S, rank + rope] -> [nh, rank]
        s = jax.lax.dot_general(q, cache, (((1,), (1,)), ((), ()))) * d ** -0.5
        w = jax.nn.softmax(s, axis=-1)
        # over all 576 columns, the rope ones dropped after: slicing the cache first copies it
        return jnp.dot(w, cache)[:, : args.rank]

    big = jnp.asarray(rng.standard_normal((2048, 2048)).astype(np.float32))
    square = jax.jit(lambda a: a @ a)
    jax.block_until_ready(square(big))
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(square(big))
        t.append(time.perf_counter() - t0)
    peak = 2 * 2048 ** 3 / float(np.median(t))

    rows = []
    for filled in (int(f) for f in args.filled.split(",")):
        q = jnp.asarray(rng.standard_normal((args.heads, d)).astype(np.float32))
        caches = [jnp.asarray(rng.standard_normal((filled, d)).astype(np.float32)) for _ in range(args.layers)]
        for c in caches:
            jax.block_until_ready(attend(q, c))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for c in caches:  # one step: every layer once
                out = attend(q, c)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
        step = float(np.median(times))
        flops = 2 * args.heads * (d + args.rank) * filled * args.layers  # the FLOPs decode needs
        rows.append((filled, step, flops))
    print(f"machine: {os.cpu_count()} CPUs; {args.heads} heads, latent {args.rank} + rope {args.rope}, "
          f"{args.layers} layers, float32, batch 1; medians of {args.reps}")
    print(f"float32 matmul rate (2048^3 product): {peak / 1e9:.1f} GFLOP/s")
    base, base_flops = rows[0][1], rows[0][2]
    for filled, step, flops in rows:
        print(f"filled {filled:6d}: {flops / 1e6:7.1f} MFLOP per step; plain products {step * 1e3:6.2f} ms "
              f"({flops / step / 1e9:5.1f} GFLOP/s), {(step - base) * 1e3:+6.2f} ms over {rows[0][0]} filled; "
              f"at the matmul rate at least {(flops - base_flops) / peak * 1e3:+5.2f} ms over {rows[0][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
