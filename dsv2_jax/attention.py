"""Blockwise (flash-style) attention for training and scoring: memory O(T · block), not O(T²).

The materialised MLA form builds float32 scores [B, heads, T, T]: 1 GiB per sequence and layer
at T = 4,096 for V2-Lite, 16 GiB at 16,384. For causal attention inside packed documents the
mask is a function of two [B, T] arrays, the document (segment) ids and the positions in the
row, so nothing of size T × T needs to exist: :func:`blockwise_attention` walks the keys in
blocks with an online softmax (running max ``m``, normaliser ``l`` and output ``acc`` per
query, rescaled as each block arrives) and rebuilds each block's mask from the segment ids.
The scan body is rematerialised, so the backward pass too holds one block at a time. Equal to
the materialised form within float rounding (tests/test_attention.py).

The same online softmax (:func:`online_init`, :func:`online_update`, :func:`online_finish`)
serves the cache: a prefill chunk walks the filled cache slots block by block, and a decode
step walks only the blocks filled so far (``mla.py``). Over cache slots the mask is a
:class:`SlotMask`, two small arrays from which any block of the [B, T, S] mask is rebuilt.

Example::

    mask = SegmentMask(segments)                 # [B, T] document number of each token
    out = blockwise_attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale, block=512)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, as in mla.py: a fully masked row gives the mean of the values, not NaN


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Causal attention within each packed document: query t sees key s when s <= t and both
    belong to the same segment. ``segments`` [B, T] int (document number within the row)."""

    segments: jax.Array

    def dense(self) -> jax.Array:
        """The same mask as a [B, T, T] bool array (what the materialised form takes)."""
        t = self.segments.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None]
        return causal & (self.segments[:, :, None] == self.segments[:, None, :])


jax.tree_util.register_dataclass(SegmentMask, data_fields=["segments"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class SlotMask:
    """Causal attention over ``length`` cache slots: query t (written at slot ``q_slot[t]``)
    sees slot j when j <= q_slot[t] and ``real[b, j]`` (False for left padding; None: every
    slot is real). Nothing of size B × T × S is built until :meth:`dense` is asked for."""

    q_slot: jax.Array  # [T] int32
    real: jax.Array | None  # [B, S] bool
    batch: int
    length: int

    def block(self, start, size: int) -> jax.Array:
        """The [B, T, size] bool mask of slots ``start + [0, size)`` (``start`` may be traced)."""
        keys = start + jnp.arange(size)
        causal = keys[None, :] <= self.q_slot[:, None]  # [T, size]
        mask = jnp.broadcast_to(causal, (self.batch, *causal.shape))
        if self.real is not None:
            mask = mask & jax.lax.dynamic_slice_in_dim(self.real, start, size, axis=1)[:, None, :]
        return mask

    def dense(self) -> jax.Array:
        """The whole [B, T, S] bool mask."""
        return self.block(0, self.length)

    def filled(self) -> jax.Array:
        """Slots any query may see: ``[0, filled)`` (int32 scalar, traced)."""
        return self.q_slot.max() + 1


jax.tree_util.register_dataclass(SlotMask, data_fields=["q_slot", "real"], meta_fields=["batch", "length"])


def online_init(b: int, nh: int, t: int, dv: int):
    """The online-softmax carry before any key block: running max, normaliser, output (float32)."""
    f32 = jnp.float32
    return (jnp.full((b, nh, t), -jnp.inf, f32), jnp.zeros((b, nh, t), f32), jnp.zeros((b, nh, t, dv), f32))


def online_update(carry, s, values, spec: str):
    """Fold one key block in: ``s`` [B, nh, T, block] float32 scores (scaled, masked to
    NEG_INF), ``values`` of that block, ``spec`` the einsum of probabilities and values that
    gives [B, nh, T, dv]. Earlier blocks are rescaled by exp(old max - new max)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = l * correction + p.sum(axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(spec, p.astype(values.dtype), values,
                                                   preferred_element_type=jnp.float32)
    return m_new, l, acc


def online_finish(carry) -> jax.Array:
    """The attended values [B, nh, T, dv] (float32) once every key block is in."""
    _, l, acc = carry
    return acc / l[..., None]


def blockwise_attention(q_nope, q_pe, k_nope, k_pe, v, mask: SegmentMask, scale: float,
                        block: int = 512, dtype=None) -> jax.Array:
    """softmax((q_nope·k_nopeᵀ + q_pe·k_peᵀ) · scale, masked) · v, one key block at a time.

    q_nope [B, T, nh, dn], q_pe [B, T, nh, dr], k_nope [B, T, nh, dn], k_pe [B, T, dr] (one
    head shared by all), v [B, T, nh, dv] -> [B, T, nh, dv] in ``dtype`` (default v's).
    Scores and the softmax are float32, as in the materialised form.
    """
    b, t, nh, _ = q_nope.shape
    dtype = dtype or v.dtype
    n_blocks = -(-t // block)
    pad = n_blocks * block - t
    seg = mask.segments.astype(jnp.int32)
    key_seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)  # padding joins no document
    key_pos = jnp.arange(n_blocks * block)

    def blocks(a, axis=1):  # [B, S, ...] -> [n_blocks, B, block, ...]
        a = jnp.pad(a, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (a.ndim - axis - 1))
        a = a.reshape(a.shape[:axis] + (n_blocks, block) + a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    f32 = jnp.float32
    q_pos = jnp.arange(t)

    @jax.checkpoint
    def step(carry, xs):
        kn, kp, vb, ks, kpos = xs
        s = jnp.einsum("btnd,bsnd->bnts", q_nope, kn, preferred_element_type=f32)
        s += jnp.einsum("btnd,bsd->bnts", q_pe, kp, preferred_element_type=f32)
        allowed = (kpos[None, None, :] <= q_pos[None, :, None]) & (seg[:, :, None] == ks[:, None, :])
        s = jnp.where(allowed[:, None], s * scale, NEG_INF)  # [B, nh, T, block]
        return online_update(carry, s, vb, "bnts,bsnd->bntd"), None

    xs = (blocks(k_nope), blocks(k_pe), blocks(v), jnp.moveaxis(key_seg.reshape(b, n_blocks, block), 1, 0),
          key_pos.reshape(n_blocks, block))
    carry, _ = jax.lax.scan(step, online_init(b, nh, t, v.shape[-1]), xs)
    return jnp.moveaxis(online_finish(carry), 1, 2).astype(dtype)  # [B, T, nh, dv]
