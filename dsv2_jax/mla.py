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
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from . import backend, kernels
from .attention import (
    NEG_INF,
    SegmentMask,
    SlotMask,
    blockwise_attention,
    online_finish,
    online_init,
    online_update,
)
from .cache import LayerCache
from .config import DeepseekV2Config
from .layers import Linear, RMSNorm, rows_dot
from .rope import apply_rope
from .sharding import batch_spec

BLOCK = 512  # key block of the blockwise form; shorter sequences take the materialised one
DECODE_BLOCK = 1024  # cache slots per step of the filled-slots decode loop (CPU)
DENSE_ABOVE_FILLED = 2  # CPU decode reads every slot in one pass once the filled part is over 1/2
GPU_KEY_SLICES = (4096, 2048, 1024, 512, 256, 128)  # slots per Pallas attention call (GPU prefill chunk)


def _heads_first(a: jax.Array) -> jax.Array:
    """[B, L, nh, d] -> [B, nh, L, d]."""
    return jnp.swapaxes(a, 1, 2)


def _over_filled_blocks(mask: SlotMask, block: int, fold, init):
    """Loop over the key blocks of ``block`` slots that hold a slot some query may see (a traced
    trip count): ``fold(start, block_mask [B, T, block], carry) -> carry``. ``block`` need not
    divide S: the last block is moved back to end at S, and its slots before ``i * block``,
    already seen by block i - 1, are masked out."""

    def body(i, carry):
        start = jnp.minimum(i * block, mask.length - block)
        seen = mask.block(start, block) & (start + jnp.arange(block) >= i * block)
        return fold(start, seen, carry)

    return jax.lax.fori_loop(0, (mask.filled() + block - 1) // block, body, init)


class AttentionMode(enum.Enum):
    """What the T new tokens attend to, and in which form.

    With a cache the new entries are always written first (slots ``cache_index + [0, T)``).
    """

    SELF = "self"  # the T tokens themselves, materialised: training, scoring, a first prefill chunk
    CACHE = "cache"  # the cache slots, materialised: later prefill chunks (mask [B, T, S] / SlotMask)
    LATENT = "latent"  # the cache slots in latent space, absorbed: decode (mask [B, T, S] / SlotMask)


class MLA(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs, param_dtype, dtype, quant=None,
                 prefix: str = "self_attn", mesh=None):
        self.cfg = cfg
        self.dtype = dtype
        # The mesh whose batch axes split the sequences (None: one device). Only the GPU flash
        # kernel needs it: XLA cannot partition a Pallas call (see _flash).
        self.batch_mesh = mesh
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

    def absorbed_kv_b(self, after=None) -> tuple[jax.Array, jax.Array]:
        """:meth:`kv_b_weight` split as absorbed decode multiplies it, heads leading: ``W_UK``
        [nh, nope, r] (folded into the query) and ``W_UV`` [nh, r, v] (applied to the attended
        latents). In this layout the per-head products need no transpose of the weights, so a
        decode loop that gets them once (``kv_b=``) copies nothing per step."""
        cfg = self.cfg
        w = self.kv_b_weight(after=after)
        w_uk = jnp.transpose(w[..., : cfg.qk_nope_head_dim], (1, 2, 0))
        return w_uk, jnp.swapaxes(w[..., cfg.qk_nope_head_dim:], 0, 1)

    # ---- attention -----------------------------------------------------
    def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None, cache_index=None,
                 mode: AttentionMode = AttentionMode.SELF, attend_len: int | None = None, kv_b=None):
        """x [B, T, H]; cos/sin [B, T, d/2]; mask [B, T, T] (``SELF``) or [B, T, S] (``CACHE``,
        ``LATENT``) bool, True = attend. ``attend_len`` (static) limits ``CACHE`` / ``LATENT`` to
        the first slots, those filled so far: a prefill chunk then expands and attends over them
        alone, not over the whole allocated cache (S = ``attend_len``). ``kv_b``: this layer's
        :meth:`absorbed_kv_b`, computed once before a decode loop, for ``LATENT`` (else computed
        here). Returns (output [B, T, H], the updated cache or None).
        """
        out, cache = self.heads(x, cos, sin, mask, cache, cache_index, mode, attend_len, kv_b)
        return self.o_proj(out), cache

    def heads(self, x, cos, sin, mask, cache: LayerCache | None = None, cache_index=None,
              mode: AttentionMode = AttentionMode.SELF, attend_len: int | None = None, kv_b=None):
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
        if mode is AttentionMode.LATENT:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, kv_b)
        elif isinstance(mask, SlotMask) and mask.length > BLOCK:
            out = self._materialised_blocks(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            out = self._materialised(q_nope, q_pe, c_kv, k_pe, mask)
        return out.reshape(*x.shape[:2], -1), cache  # out: [B, T, nh, v]

    def _softmax(self, scores, mask):
        scores = jnp.where(mask[:, None], scores * self.cfg.softmax_scale, NEG_INF)
        return jax.nn.softmax(scores, axis=-1).astype(self.dtype)

    def _flash(self, q_nope, q_pe, k_nope, k_pe, v, segments):
        """The Pallas flash-attention kernel over [B, T, ...] operands. With a mesh, it runs
        in ``shard_map`` over the batch axes, each device on its own sequences: XLA's SPMD
        partitioner has no rule for a Pallas call, so it would gather every device's sequences
        and run the whole batch's attention on each device (the V2-Lite training step on 8
        H100s held ``bf16[8, 4096, 16, 128]`` operands per layer)."""
        call = functools.partial(kernels.mla_attention, scale=self.cfg.softmax_scale, implementation="triton")
        spec = None if self.batch_mesh is None else batch_spec(self.batch_mesh, q_nope.shape[0])
        if spec:
            call = jax.shard_map(call, mesh=self.batch_mesh, in_specs=spec, out_specs=spec, check_vma=False)
        return call(q_nope, q_pe, k_nope, k_pe, v, segments).astype(self.dtype)

    def _materialised(self, q_nope, q_pe, c_kv, k_pe, mask):
        """mask: [B, T, S] bool, or a SegmentMask (causal within packed documents, training):
        past ``BLOCK`` tokens that one runs blockwise, never holding [B, nh, T, T] scores (on
        GPU in the Pallas kernel ``kernels.mla_attention``, elsewhere as a scan in JAX)."""
        cfg = self.cfg
        heads = (cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        if not self.kv_b_proj.folds_into_weight():  # LoRA dropout: each token's c_kv its own mask
            kv = self.kv_b_proj(c_kv).astype(self.dtype).reshape(*c_kv.shape[:2], *heads)
        else:
            w = self.kv_b_weight(after=c_kv)
            kv = rows_dot(c_kv, w.reshape(w.shape[0], -1)).reshape(*c_kv.shape[:2], *heads)  # [B, S, nh, 256]
        k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        if isinstance(mask, SegmentMask):
            if q_nope.shape[1] > BLOCK:
                if backend.on_gpu():  # flash attention in Pallas: forward and backward kernels
                    return self._flash(q_nope, q_pe, k_nope, k_pe.astype(q_pe.dtype), v, mask.segments)
                return blockwise_attention(q_nope, q_pe, k_nope, k_pe, v, mask, cfg.softmax_scale,
                                           BLOCK, self.dtype)
            mask = mask.dense()
        elif isinstance(mask, SlotMask):
            mask = mask.dense()
        # Heads first, nope and rope parts in one 192-wide product: with the head axis leading,
        # XLA's CPU backend runs these batched products and their gradients ~2x faster than
        # over [B, T, nh, d] operands (bench/train_vs_hf.py, docs/figures.md#training-speed).
        k_pe = jnp.broadcast_to(k_pe[:, :, None].astype(k_nope.dtype), (*k_nope.shape[:3], k_pe.shape[-1]))
        q = _heads_first(jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1))
        k = _heads_first(jnp.concatenate([k_nope, k_pe], axis=-1))
        scores = jnp.einsum("bntd,bnsd->bnts", q, k, preferred_element_type=jnp.float32)
        # softmax with the normalisation after the product with v ([T, v] divisions, not
        # [T, S]) and the mask as an additive bias (shared by the layers): a layer's attention
        # forward 2.9 vs 6.1 ms, forward and backward unchanged (8 x 4 heads x 256 x 256,
        # bench/train_parts.py)
        bias = jnp.where(mask, 0.0, NEG_INF)[:, None]
        s = scores * self.cfg.softmax_scale + bias
        e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))  # [B, nh, T, S]
        out = jnp.einsum("bnts,bnsd->bntd", e.astype(self.dtype), _heads_first(v),
                         preferred_element_type=jnp.float32)
        out = out / jnp.sum(e, axis=-1, keepdims=True)
        return _heads_first(out.astype(self.dtype))  # [B, T, nh, v]

    def _materialised_blocks(self, q_nope, q_pe, c_kv, k_pe, mask: SlotMask):
        """A prefill chunk over the filled cache slots, one key block of ``BLOCK`` slots at a
        time (online softmax), in a loop over
        the blocks filled so far only (a traced trip count): each block's latents are expanded
        through ``kv_b_proj`` as the block arrives and dropped after it, so memory is
        O(T · block) per head, not O(T · S), and no [B, T, S] mask exists.

        Why re-expand rather than attend to the cached prefix in latent space (absorbed)? Per
        query-key pair, V2-Lite's materialised scores and values cost 2 · 16 · (192 + 128) =
        10.2 kFLOP and the absorbed ones 2 · 16 · (576 + 512) = 34.8 kFLOP; expanding a cached
        latent costs 2 · 512 · 16 · 256 = 4.2 MFLOP, shared by the chunk's T queries (8.2 kFLOP
        per pair at T = 512). So expanding again is cheaper than absorbing for any chunk of
        more than ~170 tokens, and keeping the expanded keys would cost 7× the latent cache's
        memory. A whole prompt in one chunk (the first chunk, ``SELF``) expands nothing twice.
        """
        if backend.on_gpu():
            return self._prefill_kernel(q_nope, q_pe, c_kv, k_pe, mask)
        cfg = self.cfg
        b, t, nh, _ = q_nope.shape
        w = self.kv_b_weight(after=c_kv)
        w = w.reshape(w.shape[0], -1)
        q = _heads_first(jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1))  # [B, nh, T, 192]
        block = BLOCK

        def fold(start, seen, carry):
            ck = jax.lax.dynamic_slice_in_dim(c_kv, start, block, axis=1)
            kp = jax.lax.dynamic_slice_in_dim(k_pe, start, block, axis=1).astype(q.dtype)
            kv = rows_dot(ck, w).reshape(b, block, nh, -1)  # [B, block, nh, 256]
            k = jnp.concatenate([kv[..., : cfg.qk_nope_head_dim],
                                 jnp.broadcast_to(kp[:, :, None], (b, block, nh, kp.shape[-1]))], axis=-1)
            s = jnp.einsum("bntd,bnsd->bnts", q, _heads_first(k), preferred_element_type=jnp.float32)
            s = jnp.where(seen[:, None], s * cfg.softmax_scale, NEG_INF)
            return online_update(carry, s, _heads_first(kv[..., cfg.qk_nope_head_dim:]), "bnts,bnsd->bntd")

        carry = _over_filled_blocks(mask, block, fold, online_init(b, nh, t, cfg.v_head_dim))
        return jnp.moveaxis(online_finish(carry), 1, 2).astype(self.dtype)  # [B, T, nh, v]

    def _prefill_kernel(self, q_nope, q_pe, c_kv, k_pe, mask: SlotMask):
        """GPU form of :meth:`_materialised_blocks`: the filled slots in slices of the first of
        ``GPU_KEY_SLICES`` dividing S (else all of S), each expanded through ``kv_b_proj`` and given to the
        Pallas kernel (``kernels.mla_attention_partial``), the partial results merged by their
        log-sum-exp. Few loop steps of large kernels, where an XLA loop over 512-slot blocks
        would launch several kernels per block."""
        cfg = self.cfg
        b, t, nh, _ = q_nope.shape
        size = next((n for n in GPU_KEY_SLICES if mask.length % n == 0), mask.length)
        w = self.kv_b_weight(after=c_kv)
        w = w.reshape(w.shape[0], -1)
        real = jnp.ones((b, mask.length), bool) if mask.real is None else mask.real
        k_seg = jnp.where(real, 0, -1).astype(jnp.int32)  # left padding: seen by no query
        q_seg = jnp.zeros((b, t), jnp.int32)

        def body(i, carry):
            start = i * size
            ck = jax.lax.dynamic_slice_in_dim(c_kv, start, size, axis=1)
            kp = jax.lax.dynamic_slice_in_dim(k_pe, start, size, axis=1).astype(q_nope.dtype)
            kv = rows_dot(ck, w).reshape(b, size, nh, -1)  # [B, size, nh, 256]
            part = kernels.mla_attention_partial(
                q_nope, q_pe.astype(q_nope.dtype), kv[..., : cfg.qk_nope_head_dim], kp,
                kv[..., cfg.qk_nope_head_dim:], mask.q_slot, start, q_seg,
                jax.lax.dynamic_slice_in_dim(k_seg, start, size, axis=1), scale=cfg.softmax_scale)
            return kernels.merge_partials(carry, part)

        n_slices = (mask.filled() + size - 1) // size
        init = (jnp.zeros((b, t, nh, cfg.v_head_dim), jnp.float32), jnp.full((b, nh, t), -jnp.inf, jnp.float32))
        out, _ = jax.lax.fori_loop(0, n_slices, body, init)
        return out.astype(self.dtype)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, w=None):
        """Attention in latent space. With a :class:`SlotMask` on the CPU, while at most half the
        cache is filled, only the blocks filled so far are read (a loop over blocks of
        ``DECODE_BLOCK`` slots whose trip count is traced), each once for both scores and values:
        a decode step costs what its context holds, not what the cache has room for. Past half,
        one pass over every slot is faster (the loop copies each block out of the cache). On GPU
        the one fused pass always: each loop step there would be a few kernel launches of
        microseconds, while a V2-Lite layer's whole 32K-slot cache is 37 MB, ~8 µs of H200
        bandwidth (reasoned, not measured on a GPU).

        ``w``, :meth:`absorbed_kv_b` computed by the caller: a decode loop computes it once for
        all its steps (an AWQ ``kv_b_proj`` is then not dequantized in full every step)."""
        w_uk, w_uv = self.absorbed_kv_b(after=q_nope) if w is None else w
        f32 = jnp.float32
        q_lat = jnp.einsum("btnd,ndr->btnr", q_nope, w_uk, preferred_element_type=f32)
        q_lat = q_lat.astype(self.dtype)  # [B, T, nh, r]
        if isinstance(mask, SlotMask) and not backend.on_gpu() and mask.length > DECODE_BLOCK:
            blocks = lambda: self._latent_blocks(q_lat, q_pe, c_kv, k_pe, mask, DECODE_BLOCK)  # noqa: E731
            whole = lambda: self._latent_pass(q_lat, q_pe, c_kv, k_pe, mask.dense())  # noqa: E731
            o_lat = jax.lax.cond(mask.filled() * DENSE_ABOVE_FILLED < mask.length, blocks, whole)
        else:
            o_lat = self._latent_pass(q_lat, q_pe, c_kv, k_pe, mask.dense() if isinstance(mask, SlotMask) else mask)
        return jnp.einsum("btnr,nrd->btnd", o_lat, w_uv)  # [B, T, nh, v]

    def _latent_pass(self, q_lat, q_pe, c_kv, k_pe, mask):
        """Absorbed attention over every slot in one pass: [B, T, nh, r] attended latents."""
        f32 = jnp.float32
        scores = jnp.einsum("btnr,bsr->bnts", q_lat, c_kv, preferred_element_type=f32)
        scores += jnp.einsum("btnd,bsd->bnts", q_pe, k_pe, preferred_element_type=f32)
        p = self._softmax(scores, mask)
        # Spelled [B, nh, T, r] then transposed: XLA's CPU backend rejects the bf16 x bf16 -> f32
        # dot of "bnts,bsr->btnr" for batch > 1 ("Unsupported element type for DotThunk").
        o_lat = jnp.einsum("bnts,bsr->bntr", p, c_kv, preferred_element_type=f32)
        return jnp.swapaxes(o_lat, 1, 2).astype(self.dtype)

    def _latent_blocks(self, q_lat, q_pe, c_kv, k_pe, mask: SlotMask, block: int):
        """Absorbed attention over slots ``[0, mask.filled())`` only, ``block`` slots per step
        of a loop with a traced trip count: [B, T, nh, r] attended latents (compute dtype)."""
        b, t, nh, r = q_lat.shape
        f32 = jnp.float32

        def fold(start, seen, carry):
            ck = jax.lax.dynamic_slice_in_dim(c_kv, start, block, axis=1)
            kp = jax.lax.dynamic_slice_in_dim(k_pe, start, block, axis=1)
            s = jnp.einsum("btnr,bsr->bnts", q_lat, ck, preferred_element_type=f32)
            s += jnp.einsum("btnd,bsd->bnts", q_pe, kp, preferred_element_type=f32)
            s = jnp.where(seen[:, None], s * self.cfg.softmax_scale, NEG_INF)
            return online_update(carry, s, ck, "bnts,bsr->bntr")

        carry = _over_filled_blocks(mask, block, fold, online_init(b, nh, t, r))
        return jnp.swapaxes(online_finish(carry), 1, 2).astype(self.dtype)
