"""The latent KV cache of MLA (DESIGN.md §3).

Per layer and token only the normalised latent ``c_kv`` (kv_lora_rank values) and the rotated
shared key ``k_pe`` (qk_rope_head_dim values) are kept: 576 values for V2-Lite, i.e.
27 × 576 × 2 B = 31,104 B per token in bfloat16. Nothing per head is cached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import DeepseekV2Config

KVCache = tuple  # one (c_kv [B, S, r], k_pe [B, S, d_rope]) pair per layer


def init_cache(cfg: DeepseekV2Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """A zeroed cache for ``batch`` rows of up to ``max_len`` tokens."""
    return tuple(
        (jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
         jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype))
        for _ in range(cfg.num_hidden_layers)
    )


def cache_bytes_per_token(cfg: DeepseekV2Config, dtype=jnp.bfloat16) -> int:
    """Bytes one token occupies in the cache, measured on the abstract cache (no allocation)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
