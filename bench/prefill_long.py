"""Prefill time of a long prompt on a small model with V2-Lite's attention shapes (CPU).

    python bench/prefill_long.py [--prompt 3000] [--max-new 2048] [--repeat 2]
    python bench/prefill_long.py --prompt 32000 --max-new 32 --repeat 1   # a 32K-token prompt

Prints the prefill time of each pass, the decode rate, and the process's peak RSS.

16 heads, latent 512, rope 64, nope/v 128, two layers (a dense one, then 8 experts top-2),
float32. The first pass compiles; the others show the steady prefill time. Run it on two
commits side by side to compare.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=3000, help="prompt tokens")
    p.add_argument("--max-new", type=int, default=2048, help="max_new_tokens (sizes the cache)")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    import jax.numpy as jnp
    from flax import nnx

    import dsv2_jax
    from dsv2_jax import DeepseekV2, DeepseekV2Config
    from dsv2_jax.cache import cache_bytes_per_token

    cfg = DeepseekV2Config.v2_lite(vocab_size=1024, hidden_size=256, num_hidden_layers=2,
                                   intermediate_size=512, moe_intermediate_size=64, n_routed_experts=8,
                                   num_experts_per_tok=2, n_shared_experts=1,
                                   max_position_embeddings=4 * (args.prompt + args.max_new))
    model = DeepseekV2(cfg, rngs=nnx.Rngs(0))
    ids = [int(x) for x in np.random.default_rng(0).integers(2, 1024, args.prompt)]
    for _ in range(args.repeat):
        out = dsv2_jax.generate(model, prompt_ids=[ids], max_new_tokens=args.max_new, ignore_eos=True)
        print(f"prefill {args.prompt} tokens: {out.prefill_s:.2f} s ({out.prefill_tokens_per_s:.0f} tok/s)"
              f"{' (includes compilation)' if out.compiled else ''}; decode {len(out.token_ids[0])} tokens "
              f"at {out.decode_tokens_per_s:.1f} tok/s", flush=True)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    cache = cache_bytes_per_token(cfg, jnp.float32) * (args.prompt + args.max_new) / 2**30
    print(f"peak RSS {peak:.2f} GiB (the float32 latent cache of the context: {cache:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
