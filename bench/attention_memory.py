"""Compiled temporary memory of one V2-Lite decoder layer, forward + backward, in training.

    python bench/attention_memory.py [--tokens 4096 16384]

Layer 0 of the full-size V2-Lite (MLA + the dense FFN), bfloat16 compute, one packed row, built
abstractly (nothing allocated) and compiled for this machine's CPU: XLA's memory analysis of
the dense-mask (materialised scores [B, 16, T, T] in float32) and the blockwise form.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax import DeepseekV2Config
    from dsv2_jax.attention import SegmentMask
    from dsv2_jax.model import DecoderLayer
    from dsv2_jax.rope import cos_sin

    cfg = DeepseekV2Config.v2_lite()
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, 0, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                                                dtype=jnp.bfloat16))
    graphdef, params = nnx.split(layer)
    for t in args.tokens:
        x = jax.ShapeDtypeStruct((1, t, cfg.hidden_size), jnp.bfloat16)
        seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
        for name in ("dense mask", "blockwise"):
            def loss(params, x, seg, name=name):
                lay = nnx.merge(graphdef, params)
                pos = jnp.broadcast_to(jnp.arange(t), (1, t))
                cos, sin = cos_sin(cfg, pos)
                mask = SegmentMask(seg) if name == "blockwise" else SegmentMask(seg).dense()
                y, _, _ = lay(x, cos, sin, mask)
                return jnp.sum(y.astype(jnp.float32))

            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, seg).compile()
            mem = compiled.memory_analysis()
            print(f"T = {t:6d} {name:10s}: temporaries {mem.temp_size_in_bytes / 2**30:7.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
