"""The latent KV cache of MLA (docs/model.md#latent-kv-cache-and-absorbed-decode).

Per layer and token only the normalised latent ``c_kv`` (kv_lora_rank values) and the rotated
shared key ``k_pe`` (qk_rope_head_dim values) are kept: 576 values for V2-Lite, i.e.
27 × 576 × 2 B = 31,104 B per token in bfloat16. Nothing per head is cached.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import DeepseekV2Config


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's cache: ``c_kv`` [B, S, kv_lora_rank] and ``k_pe`` [B, S, qk_rope_head_dim]."""

    c_kv: jax.Array
    k_pe: jax.Array

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[1]

    def write(self, c_kv: jax.Array, k_pe: jax.Array, index) -> LayerCache:
        """The cache with T new entries ``c_kv`` [B, T, r], ``k_pe`` [B, T, d] at slots
        ``index + [0, T)``."""
        return LayerCache(jax.lax.dynamic_update_slice_in_dim(self.c_kv, c_kv, index, axis=1),
                          jax.lax.dynamic_update_slice_in_dim(self.k_pe, k_pe, index, axis=1))


@dataclasses.dataclass(frozen=True)
class KVCache:
    """The whole model's cache: one :class:`LayerCache` per decoder layer."""

    layers: tuple[LayerCache, ...]

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len


jax.tree_util.register_dataclass(LayerCache, data_fields=["c_kv", "k_pe"], meta_fields=[])
jax.tree_util.register_dataclass(KVCache, data_fields=["layers"], meta_fields=[])


def init_cache(cfg: DeepseekV2Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """A zeroed cache for ``batch`` rows of up to ``max_len`` tokens."""
    return KVCache(tuple(
        LayerCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
                   jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype))
        for _ in range(cfg.num_hidden_layers)
    ))


def cache_bytes_per_token(cfg: DeepseekV2Config, dtype=jnp.bfloat16) -> int:
    """Bytes one token occupies in the cache, measured on the abstract cache (no allocation)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
