"""Multi-head Latent Attention (DeepSeek-V2 §2.1; docs/model.md#mla).

Two equivalent ways to attend:

* materialised (training, prefill): ``kv_b_proj`` expands the latent ``c_kv`` into per-head
  ``k_nope`` [.., 128] and ``v`` [.., 128]; scores = q_nope·k_nope + q_pe·k_pe.
* absorbed (decode): ``W_UK`` is folded into the query (``q_lat = q_nope · W_UK``, 512-dim per
  head) so attention runs directly over the cached latent ``c_kv`` and ``k_pe``; the attended
  latent is expanded once by ``W_UV`` before ``o_proj``. Nothing per head is ever cached.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import SegmentMask, blockwise_attention
from .cache import LayerCache
from .config import DeepseekV2Config
from .layers import Linear, RMSNorm
from .rope import apply_rope

_NEG_INF = -1e30  # finite so fully masked rows (padding) give zeros, not NaNs
BLOCK = 512  # key block of the blockwise form; shorter sequences take the materialised one


class AttentionMode(enum.Enum):
    """What the T new tokens attend to, and in which form.

    With a cache the new entries are always written first (slots ``cache_index + [0, T)``).
    """

    SELF = "self"  # the T tokens themselves, materialised: training, scoring, a first prefill chunk
    CACHE = "cache"  # every cache slot, materialised: later prefill chunks (mask [B, T, S])
    LATENT = "latent"  # every cache slot in latent space, absorbed: decode (mask [B, T, S])


class MLA(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs, param_dtype, dtype, quant=None,
                 prefix: str = "self_attn"):
        self.cfg = cfg
        self.dtype = dtype
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, quant=quant)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, nh * cfg.qk_head_dim, name=f"{prefix}.q_proj", **kw)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, name=f"{prefix}.q_a_proj", **kw)
            # q_a/kv_a layernorms use 1e-6 whatever rms_norm_eps says (as the reference does).
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, param_dtype=param_dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, name=f"{prefix}.q_b_proj", **kw)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                         name=f"{prefix}.kv_a_proj_with_mqa", **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, param_dtype=param_dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                name=f"{prefix}.kv_b_proj", **kw)
        self.o_proj = Linear(nh * cfg.v_head_dim, h, name=f"{prefix}.o_proj", **kw)

    # ---- pieces --------------------------------------------------------
    def query(self, x, cos, sin):
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)  # [B, T, nh, 192]
        q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x, cos, sin):
        """The per-token cache entries: c_kv [B, T, r] (normalised) and k_pe [B, T, d_rope] (rotated)."""
        cfg = self.cfg
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, r + d_rope]
        c_kv = self.kv_a_layernorm(ckv[..., : cfg.kv_lora_rank])
        k_pe = apply_rope(ckv[..., cfg.kv_lora_rank:], cos, sin)
        return c_kv.astype(self.dtype), k_pe.astype(self.dtype)

    def kv_b_weight(self, after=None) -> jax.Array:
        """kv_b_proj as [r, nh, nope + v] in the compute dtype (dequantized if AWQ)."""
        cfg = self.cfg
        w = self.kv_b_proj.dense_weight(self.dtype, after=after)
        return w.reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)

    # ---- attention -----------------------------------------------------
    def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None, cache_index=None,
                 mode: AttentionMode = AttentionMode.SELF, attend_len: int | None = None):
        """x [B, T, H]; cos/sin [B, T, d/2]; mask [B, T, T] (``SELF``) or [B, T, S] (``CACHE``,
        ``LATENT``) bool, True = attend. ``attend_len`` (static) limits ``CACHE`` / ``LATENT`` to
        the first slots, those filled so far: a prefill chunk then expands and attends over them
        alone, not over the whole allocated cache (S = ``attend_len``). Returns (output
        [B, T, H], the updated cache or None).
        """
        out, cache = self.heads(x, cos, sin, mask, cache, cache_index, mode, attend_len)
        return self.o_proj(out), cache

    def heads(self, x, cos, sin, mask, cache: LayerCache | None = None, cache_index=None,
              mode: AttentionMode = AttentionMode.SELF, attend_len: int | None = None):
        """As :meth:`__call__`, but the attended values of all heads before ``o_proj``:
        ([B, T, nh · v], the updated cache or None)."""
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is not None:
            cache = cache.write(c_kv, k_pe, cache_index)
        if mode is not AttentionMode.SELF:
            if cache is None:
                raise ValueError(f"MLA: attention mode {mode.name} needs a cache")
            c_kv, k_pe = cache.c_kv[:, :attend_len], cache.k_pe[:, :attend_len]
        attend = self._absorbed if mode is AttentionMode.LATENT else self._materialised
        out = attend(q_nope, q_pe, c_kv, k_pe, mask)  # [B, T, nh, v]
        return out.reshape(*x.shape[:2], -1), cache

    def _softmax(self, scores, mask):
        scores = jnp.where(mask[:, None], scores * self.cfg.softmax_scale, _NEG_INF)
        return jax.nn.softmax(scores, axis=-1).astype(self.dtype)

    def _materialised(self, q_nope, q_pe, c_kv, k_pe, mask):
        """mask: [B, T, S] bool, or a SegmentMask (causal within packed documents, training):
        past ``BLOCK`` tokens that one runs blockwise, never holding [B, nh, T, T] scores."""
        cfg = self.cfg
        kv = jnp.einsum("bsr,rnd->bsnd", c_kv, self.kv_b_weight(after=c_kv))  # [B, S, nh, 256]
        k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        if isinstance(mask, SegmentMask):
            if q_nope.shape[1] > BLOCK:
                return blockwise_attention(q_nope, q_pe, k_nope, k_pe, v, mask, cfg.softmax_scale,
                                           BLOCK, self.dtype)
            mask = mask.dense()
        f32 = jnp.float32
        scores = jnp.einsum("btnd,bsnd->bnts", q_nope, k_nope, preferred_element_type=f32)
        scores += jnp.einsum("btnd,bsd->bnts", q_pe, k_pe, preferred_element_type=f32)
        p = self._softmax(scores, mask)  # [B, nh, T, S]
        return jnp.einsum("bnts,bsnd->btnd", p, v)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        cfg = self.cfg
        w = self.kv_b_weight(after=q_nope)
        w_uk, w_uv = w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]
        f32 = jnp.float32
        q_lat = jnp.einsum("btnd,rnd->btnr", q_nope, w_uk, preferred_element_type=f32)
        q_lat = q_lat.astype(self.dtype)  # [B, T, nh, r]
        scores = jnp.einsum("btnr,bsr->bnts", q_lat, c_kv, preferred_element_type=f32)
        scores += jnp.einsum("btnd,bsd->bnts", q_pe, k_pe, preferred_element_type=f32)
        p = self._softmax(scores, mask)
        # Spelled [B, nh, T, r] then transposed: XLA's CPU backend rejects the bf16 x bf16 -> f32
        # dot of "bnts,bsr->btnr" for batch > 1 ("Unsupported element type for DotThunk").
        o_lat = jnp.einsum("bnts,bsr->bntr", p, c_kv, preferred_element_type=f32)
        o_lat = jnp.swapaxes(o_lat, 1, 2).astype(self.dtype)
        return jnp.einsum("btnr,rnd->btnd", o_lat, w_uv)  # [B, T, nh, v]
