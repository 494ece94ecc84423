"""Full-size DeepSeek-V2-Lite in AWQ 4-bit (group 64) on this CPU: memory and speed.

    python bench/awq_memory.py [--prompt 64] [--new 16] [--group-size 64]

Builds the real V2-Lite architecture with random packed weights directly in memory (no
checkpoint on disk), one tensor at a time, then runs a prefill of ``--prompt`` tokens and
``--new`` decode tokens. Prints parameter bytes (packed), peak RSS and tokens/s. The point is
that packed weights stay packed: the whole model is never dequantized.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_gib() -> tuple[float, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return now, peak


def build(cfg, dtype, seed=0):
    """The model with random weights, filled variable by variable."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsv2_jax import DeepseekV2

    abstract = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        spec = var.get_value()
        name = str(path[-1])
        if spec.dtype == jnp.int32:  # packed nibbles: any 32-bit pattern is a valid word
            arr = rng.integers(0, 2**32, spec.shape, dtype=np.uint32).view(np.int32)
        elif name == "scales":
            arr = rng.uniform(0.5e-3, 2e-3, spec.shape).astype(spec.dtype)
        elif "norm" in "/".join(map(str, path)):
            arr = np.ones(spec.shape, spec.dtype)
        else:
            arr = (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(spec.dtype)
        var.set_value(jnp.asarray(arr))
        del arr
    return nnx.merge(graphdef, state)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    import jax
    import numpy as np

    import dsv2_jax
    from dsv2_jax.config import QuantConfig

    cfg = dsv2_jax.DeepseekV2Config.v2_lite(quantization=QuantConfig(group_size=args.group_size))
    t0 = time.perf_counter()
    model = build(cfg, args.dtype)
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model))
    n_bytes = sum(x.nbytes for x in leaves)
    packed = sum(x.nbytes for path, x in nnx.to_flat_state(nnx.state(model))
                 if str(path[-1]) in ("qweight", "qzeros", "scales"))
    now, peak = rss_gib()
    print(f"built V2-Lite AWQ g{args.group_size} in {time.perf_counter() - t0:.0f} s: parameters "
          f"{n_bytes / 2**30:.2f} GiB ({packed / 2**30:.2f} GiB packed linears); RSS {now:.2f} GiB, "
          f"peak {peak:.2f} GiB")
    prompt = np.random.default_rng(1).integers(2, 100000, args.prompt).tolist()
    t0 = time.perf_counter()
    out = dsv2_jax.generate(model, prompt_ids=[prompt], max_new_tokens=args.new, ignore_eos=True)
    first = time.perf_counter() - t0
    out2 = dsv2_jax.generate(model, prompt_ids=[prompt], max_new_tokens=args.new, ignore_eos=True)
    now, peak = rss_gib()
    print(f"first call (with compilation) {first:.0f} s; second call: prefill {args.prompt} tokens "
          f"{out2.prefill_tokens_per_s:.1f} tok/s, decode {args.new} tokens {out2.decode_tokens_per_s:.2f} tok/s")
    print(f"peak RSS {peak:.2f} GiB (now {now:.2f} GiB); same tokens both calls: "
          f"{out.token_ids == out2.token_ids}; {os.cpu_count()} CPUs, backend {jax.default_backend()}")


if __name__ == "__main__":
    main()
