"""The DeepSeek-V2 causal language model in Flax NNX.

Example (a tiny random model; ``dsv2_jax.load`` reads a real checkpoint)::

    import jax.numpy as jnp
    from flax import nnx
    from dsv2_jax import DeepseekV2, DeepseekV2Config

    cfg = DeepseekV2Config.v2_lite(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=128,
                                   moe_intermediate_size=32, n_routed_experts=4,
                                   num_experts_per_tok=2, kv_lora_rank=32,
                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    model = DeepseekV2(cfg, rngs=nnx.Rngs(0))
    logits = model(jnp.array([[1, 2, 3]]))   # [1, 3, 256] float32
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import SlotMask
from .cache import KVCache
from .config import DeepseekV2Config
from .layers import Embed, Linear, RMSNorm, as_dtype
from .mla import MLA, AttentionMode
from .moe import MLP, MoE, Routing
from .rope import cos_sin


@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, V] float32
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings, then each layer's output
    routings: tuple[Routing, ...] = ()  # one per MoE layer
    cache: KVCache | None = None  # updated KV cache when one was passed


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, layer: int, *, rngs, param_dtype, dtype, quant=None,
                 mesh=None):
        self.is_moe = cfg.is_moe_layer(layer)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, quant=quant)
        prefix = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MLA(cfg, prefix=f"{prefix}.self_attn", mesh=mesh, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if self.is_moe:
            self.mlp = MoE(cfg, prefix=f"{prefix}.mlp", mesh=mesh, **kw)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, prefix=f"{prefix}.mlp", **kw)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, mode=AttentionMode.SELF,
                 attend_len=None, kv_b=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, mode,
                                     attend_len, kv_b)
        x = x + attn
        h = self.post_attention_layernorm(x)
        routing = None
        if self.is_moe:
            h, routing = self.mlp(h)
        else:
            h = self.mlp(h)
        return x + h, routing, cache


class DeepseekV2(nnx.Module):
    """DeepSeek-V2 / V2-Lite causal LM. ``model(ids)`` gives float32 logits [B, T, vocab].

    ``mesh`` (``dsv2_jax.sharding.make_mesh``) with an ``expert`` axis of size P > 1 splits
    the routed experts P ways (expert parallelism); the variables are placed on it by
    ``sharding.create_sharded`` / ``shard_model`` or ``dsv2_jax.load(..., mesh=)``.
    """

    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs, param_dtype="float32",
                 dtype=None, mesh=None):
        self.config = cfg
        param_dtype = as_dtype(param_dtype)
        dtype = as_dtype(dtype, default=param_dtype)
        self.dtype = dtype
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([
            DecoderLayer(cfg, i, quant=cfg.quantization, mesh=mesh, **kw)
            for i in range(cfg.num_hidden_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        # lm_head stays unquantized (AutoAWQ never converts it); the last matmul runs in
        # the compute dtype and the logits are returned in float32.
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, **kw)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits float32 [B, T, vocab] for int ids [B, T] (positions default to 0..T-1)."""
        return self.forward(input_ids, positions, attention_mask).logits

    def absorbed_weights(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Every layer's ``kv_b_proj`` as absorbed decode uses it (``MLA.absorbed_kv_b``: W_UK
        [nh, nope, r] and W_UV [nh, r, v], dequantized if AWQ, its adapter folded in), for
        ``forward(kv_b=)``: a decode loop computes them once, not at every step. V2-Lite: 4 MiB
        per layer in bf16."""
        return tuple(layer.self_attn.absorbed_kv_b() for layer in self.layers)

    def forward(self, input_ids, positions=None, attention_mask=None, *,
                cache: KVCache | None = None, cache_index=None, mask=None,
                mode: AttentionMode | None = None, attend_len: int | None = None,
                output_hidden_states=False, logits_slice: slice | None = None,
                kv_b: Sequence[jax.Array] | None = None) -> ModelOutput:
        """The full forward pass.

        input_ids [B, T] int; positions [B, T] (default 0..T-1, or from ``cache_index``);
        attention_mask [B, T] (or [B, S] with a cache) marks real tokens. With ``cache`` (a
        :class:`~dsv2_jax.cache.KVCache`) the new entries go to slots ``cache_index + [0, T)``.
        ``mode`` (an :class:`~dsv2_jax.mla.AttentionMode`) says what the tokens attend to:
        ``SELF`` (the default without a cache), ``CACHE`` (the default with one) or ``LATENT``
        (decode); ``mask`` is [B, T, T] for ``SELF`` and [B, T, S] otherwise, built causally
        when not given; ``attend_len`` (static) makes S the first ``attend_len`` cache slots.
        ``kv_b`` (``LATENT``): :meth:`absorbed_weights`, computed once for a whole decode loop.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected [batch, seq] integers, got shape {input_ids.shape}")
        b, t = input_ids.shape
        if mode is None:
            mode = AttentionMode.SELF if cache is None else AttentionMode.CACHE
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if mask is None:
            if mode is AttentionMode.SELF:
                mask = causal_mask(b, t, attention_mask=attention_mask)
            else:  # rebuilt block by block where the attention runs blockwise
                mask = slot_mask(b, t, cache, cache_index, attention_mask, attend_len)
        cos, sin = cos_sin(self.config, positions)
        x = self.embed_tokens(input_ids)
        hidden = [x] if output_hidden_states else None
        routings = []
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, routing, layer_cache = layer(x, cos, sin, mask, layer_cache, cache_index, mode, attend_len,
                                            None if kv_b is None else kv_b[i])
            if routing is not None:
                routings.append(routing)
            new_cache.append(layer_cache)
            if hidden is not None:
                hidden.append(x)
        if logits_slice is not None:
            x = x[:, logits_slice]
        x = self.norm(x)
        logits = self.lm_head(x).astype(jnp.float32)
        return ModelOutput(
            logits=logits,
            hidden_states=tuple(hidden) if hidden is not None else None,
            routings=tuple(routings),
            cache=KVCache(tuple(new_cache)) if cache is not None else None,
        )


def slot_mask(b, t, cache: KVCache, cache_index, attention_mask=None, attend_len=None) -> SlotMask:
    """Over the cache (or its first ``attend_len`` slots): the query at slot
    ``cache_index + i`` sees slot j <= it, and only real tokens (``attention_mask`` [B, S])."""
    s = attend_len or cache.max_len
    q_slot = (cache_index + jnp.arange(t)).astype(jnp.int32)
    real = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    if real is not None and real.shape != (b, s):
        raise ValueError(f"attention_mask: expected [batch, cache slots] = {(b, s)}, got {real.shape}")
    return SlotMask(q_slot, real, b, s)


def causal_mask(b, t, cache=None, cache_index=None, attention_mask=None, attend_len=None) -> jax.Array:
    """[B, T, S] bool: query slot i sees key slot j <= i (and only real tokens)."""
    if cache is not None:
        return slot_mask(b, t, cache, cache_index, attention_mask, attend_len).dense()
    return SlotMask(jnp.arange(t), None if attention_mask is None else jnp.asarray(attention_mask, bool),
                    b, t).dense()
