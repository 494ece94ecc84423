"""Pallas (Triton) flash attention for MLA's shapes, forward and backward, causal within segments.

MLA's materialised attention (training, scoring, a long first prefill chunk) has per head
queries and keys of 192 = 128 (``nope``) + 64 (``rope``) and values of 128, and the rope key
is one head shared by all. Neither of jax's own fused attentions fits as it is:

- ``jax.experimental.pallas.ops.gpu.attention.mha`` wants one head size for q, k and v (192 would
  be padded to 256 for q/k and v, 128, would have to be padded to 256 too: 1.3× and 2× the work)
  and a per-head key where MLA shares ``k_pe``;
- ``jax.nn.dot_product_attention(implementation="cudnn")`` accepts a value head size other than
  the query's on Hopper with cuDNN >= 9.10 (jax's ``check_is_flash_attention``), but packed
  documents need cuDNN's packed layout or a dense [T, T] mask, and its checks query a live GPU,
  so it cannot be compiled or tested on a machine without one.

So this kernel takes the two query parts, the per-head ``k_nope``, the shared ``k_pe`` and the
values as they are. Grid ``(B, heads, T / block_q)``; each program walks the key blocks up to
its last query (causal) with an online softmax and writes the output and the log-sum-exp. The
backward pass is FlashAttention-2's: ``dk/dv`` programs walk the query blocks that see their key
block, ``dq`` programs the key blocks their queries see; ``dk_pe`` comes out per head and is
summed over the heads outside the kernel (no atomics: the result does not vary run to run).

Mask: query t sees key s when s <= t and ``segments[b, s] == segments[b, t]`` (packed documents,
as :class:`dsv2_jax.attention.SegmentMask`). Reference: :func:`dsv2_jax.attention.blockwise_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv2_jax.kernels import _common

MASKED = -1e30  # finite: a block with no visible key for a row adds nothing once a visible one arrives
# 8 warps, 2 stages: no kernel spills at V2-Lite's shapes (H200 compile; with 4 warps the dk/dv
# kernel spills 100-120 B per thread, with 3 stages 8 B).
NUM_WARPS, NUM_STAGES = 8, 2


def _scores(qn, qp, kn, kp, q_seg, k_seg, q_idx, k_idx, scale, precision):
    """[block_q, block_k] float32 scaled scores, masked (causal, same segment) to MASKED."""
    s = plgpu.dot(qn, kn, trans_b=True, precision=precision)
    s += plgpu.dot(qp, kp, trans_b=True, precision=precision)
    allowed = (k_idx[None, :] <= q_idx[:, None]) & (k_seg[None, :] == q_seg[:, None])
    return jnp.where(allowed, s * scale, MASKED)


def _fwd_kernel(qpos_ref, kpos_ref, qseg_ref, kseg_ref, qn_ref, qp_ref, kn_ref, kp_ref, v_ref, o_ref,
                lse_ref, *, scale, block_k, precision):
    """One query block against the key blocks up to its last query's position. Positions:
    ``qpos`` [block_q] of the queries, ``kpos`` [S] of the keys (consecutive, increasing)."""
    qn, qp, q_seg, q_pos = qn_ref[...], qp_ref[...], qseg_ref[...], qpos_ref[...]

    def body(j, carry):
        m, l, acc = carry
        ks = pl.ds(j * block_k, block_k)
        s = _scores(qn, qp, kn_ref[ks, :], kp_ref[ks, :], q_seg, kseg_ref[ks], q_pos, kpos_ref[ks], scale,
                    precision)
        m_new = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[ks, :]
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l * correction + p.sum(axis=1), acc

    # key blocks holding a key at or before the block's last query (at least one)
    n_keys = jnp.clip((q_pos.max() - kpos_ref[0]) // block_k + 1, 1, kn_ref.shape[0] // block_k)
    m, l, acc = jax.lax.fori_loop(
        0, n_keys, body, (jnp.full((qn.shape[0],), -jnp.inf, jnp.float32), jnp.zeros((qn.shape[0],), jnp.float32),
                          jnp.zeros((qn.shape[0], o_ref.shape[-1]), jnp.float32)))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dkdv_kernel(qseg_ref, kseg_ref, qn_ref, qp_ref, kn_ref, kp_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dkn_ref, dkp_ref, dv_ref, *, scale, block_q, block_k, n_q_blocks, precision):
    j = pl.program_id(2)
    kn, kp, v, k_seg = kn_ref[...], kp_ref[...], v_ref[...], kseg_ref[...]
    k_idx = j * block_k + jnp.arange(block_k)

    def body(i, carry):
        dkn, dkp, dv = carry
        qs = pl.ds(i * block_q, block_q)
        qn, qp, do = qn_ref[qs, :], qp_ref[qs, :], do_ref[qs, :]
        s = _scores(qn, qp, kn, kp, qseg_ref[qs], k_seg, i * block_q + jnp.arange(block_q), k_idx, scale,
                    precision)
        p = jnp.exp(s - lse_ref[qs][:, None])  # [block_q, block_k]
        dv += plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = (p * (dp - delta_ref[qs][:, None]) * scale).astype(qn.dtype)
        dkn += plgpu.dot(ds, qn, trans_a=True, precision=precision)
        dkp += plgpu.dot(ds, qp, trans_a=True, precision=precision)
        return dkn, dkp, dv

    first = (j * block_k) // block_q  # the first query block with a query >= this block's first key
    zeros = lambda ref: jnp.zeros(ref.shape, jnp.float32)  # noqa: E731
    dkn, dkp, dv = jax.lax.fori_loop(first, n_q_blocks, body, (zeros(dkn_ref), zeros(dkp_ref), zeros(dv_ref)))
    dkn_ref[...] = dkn.astype(dkn_ref.dtype)
    dkp_ref[...] = dkp.astype(dkp_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(qseg_ref, kseg_ref, qn_ref, qp_ref, kn_ref, kp_ref, v_ref, do_ref, lse_ref, delta_ref,
               dqn_ref, dqp_ref, *, scale, block_q, block_k, precision):
    i = pl.program_id(2)
    qn, qp, do, q_seg = qn_ref[...], qp_ref[...], do_ref[...], qseg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_idx = i * block_q + jnp.arange(block_q)

    def body(j, carry):
        dqn, dqp = carry
        ks = pl.ds(j * block_k, block_k)
        kn, kp, v = kn_ref[ks, :], kp_ref[ks, :], v_ref[ks, :]
        s = _scores(qn, qp, kn, kp, q_seg, kseg_ref[ks], q_idx, j * block_k + jnp.arange(block_k), scale,
                    precision)
        p = jnp.exp(s - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = (p * (dp - delta[:, None]) * scale).astype(kn.dtype)
        return (dqn + plgpu.dot(ds, kn, precision=precision), dqp + plgpu.dot(ds, kp, precision=precision))

    n_keys = pl.cdiv((i + 1) * block_q, block_k)
    dqn, dqp = jax.lax.fori_loop(0, n_keys, body, (jnp.zeros(dqn_ref.shape, jnp.float32),
                                                   jnp.zeros(dqp_ref.shape, jnp.float32)))
    dqn_ref[...] = dqn.astype(dqn_ref.dtype)
    dqp_ref[...] = dqp.astype(dqp_ref.dtype)


def _specs(t, dn, dr, dv, block_q, block_k, rows: str):
    """BlockSpecs of (q segments, k segments, q_nope, q_pe, k_nope, k_pe, v) for a grid
    (B, heads, blocks); ``rows`` = 'q': the program's block is a query block and the keys come
    whole; 'k': the other way round."""
    bq, bk = (block_q, t) if rows == "q" else (t, block_k)
    q_at = (lambda b, h, i: (b, i, h, 0)) if rows == "q" else (lambda b, h, i: (b, 0, h, 0))
    k_at = (lambda b, h, i: (b, 0, h, 0)) if rows == "q" else (lambda b, h, i: (b, i, h, 0))
    seg_q = (lambda b, h, i: (b, i)) if rows == "q" else (lambda b, h, i: (b, 0))
    seg_k = (lambda b, h, i: (b, 0)) if rows == "q" else (lambda b, h, i: (b, i))
    kp_at = (lambda b, h, i: (b, 0, 0)) if rows == "q" else (lambda b, h, i: (b, i, 0))
    return [pl.BlockSpec((None, bq), seg_q), pl.BlockSpec((None, bk), seg_k),
            pl.BlockSpec((None, bq, None, dn), q_at), pl.BlockSpec((None, bq, None, dr), q_at),
            pl.BlockSpec((None, bk, None, dn), k_at), pl.BlockSpec((None, bk, dr), kp_at),
            pl.BlockSpec((None, bk, None, dv), k_at)]


def _row_specs(t, block, rows: str, d=None):
    """Spec of a per-query [B, T, nh, d] array (d given) or [B, nh, T] statistic."""
    size = block if rows == "q" else t
    if d is None:
        return pl.BlockSpec((None, None, size), (lambda b, h, i: (b, h, i)) if rows == "q" else
                            (lambda b, h, i: (b, h, 0)))
    return pl.BlockSpec((None, size, None, d), (lambda b, h, i: (b, i, h, 0)) if rows == "q" else
                        (lambda b, h, i: (b, 0, h, 0)))


def _params(num_warps, num_stages):
    return _common.compiler_params(NUM_WARPS if num_warps is None else num_warps,
                                   NUM_STAGES if num_stages is None else num_stages)


def _forward(q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos, q_seg, k_seg, cfg):
    """(o [B, T, nh, dv], lse [B, nh, T]) for T queries against S keys (each a multiple of its block)."""
    scale, block_q, block_k, num_warps, num_stages, interpret = cfg
    b, t, nh, dn = q_nope.shape
    s_len, dr, dv = k_nope.shape[1], q_pe.shape[-1], v.shape[-1]
    kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k,
                               precision=_common.dot_precision(q_nope.dtype))
    pos = [pl.BlockSpec((block_q,), lambda b, h, i: (i,)), pl.BlockSpec((s_len,), lambda b, h, i: (0,))]
    specs = _specs(t, dn, dr, dv, block_q, block_k, "q")
    specs[1] = pl.BlockSpec((None, s_len), lambda b, h, i: (b, 0))
    specs[4:] = [pl.BlockSpec((None, s_len, None, dn), lambda b, h, i: (b, 0, h, 0)),
                 pl.BlockSpec((None, s_len, dr), lambda b, h, i: (b, 0, 0)),
                 pl.BlockSpec((None, s_len, None, dv), lambda b, h, i: (b, 0, h, 0))]
    return pl.pallas_call(
        kernel,
        grid=(b, nh, t // block_q),
        in_specs=pos + specs,
        out_specs=[_row_specs(t, block_q, "q", dv), _row_specs(t, block_q, "q")],
        out_shape=[jax.ShapeDtypeStruct((b, t, nh, dv), v.dtype), jax.ShapeDtypeStruct((b, nh, t), jnp.float32)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="mla_attention_fwd",
    )(q_pos, k_pos, q_seg, k_seg, q_nope, q_pe, k_nope, k_pe, v)


def _backward(q_nope, q_pe, k_nope, k_pe, v, segments, o, lse, do, cfg):
    scale, block_q, block_k, num_warps, num_stages, interpret = cfg
    b, t, nh, dn = q_nope.shape
    dr, dv = q_pe.shape[-1], v.shape[-1]
    precision = _common.dot_precision(q_nope.dtype)
    delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(v.dtype)
    params = _params(num_warps, num_stages)
    stats_k = [_row_specs(t, block_q, "k", dv), _row_specs(t, block_q, "k"), _row_specs(t, block_q, "k")]
    dkn, dkp, dvv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, block_q=block_q, block_k=block_k,
                          n_q_blocks=t // block_q, precision=precision),
        grid=(b, nh, t // block_k),
        in_specs=_specs(t, dn, dr, dv, block_q, block_k, "k") + stats_k,
        out_specs=[pl.BlockSpec((None, block_k, None, dn), lambda b, h, j: (b, j, h, 0)),
                   pl.BlockSpec((None, block_k, None, dr), lambda b, h, j: (b, j, h, 0)),
                   pl.BlockSpec((None, block_k, None, dv), lambda b, h, j: (b, j, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k_nope.shape, k_nope.dtype),
                   jax.ShapeDtypeStruct((b, t, nh, dr), jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="mla_attention_dkdv",
    )(segments, segments, q_nope, q_pe, k_nope, k_pe, v, do, lse, delta)
    stats_q = [_row_specs(t, block_q, "q", dv), _row_specs(t, block_q, "q"), _row_specs(t, block_q, "q")]
    dqn, dqp = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k, precision=precision),
        grid=(b, nh, t // block_q),
        in_specs=_specs(t, dn, dr, dv, block_q, block_k, "q") + stats_q,
        out_specs=[_row_specs(t, block_q, "q", dn), _row_specs(t, block_q, "q", dr)],
        out_shape=[jax.ShapeDtypeStruct(q_nope.shape, q_nope.dtype), jax.ShapeDtypeStruct(q_pe.shape, q_pe.dtype)],
        compiler_params=params, interpret=interpret, name="mla_attention_dq",
    )(segments, segments, q_nope, q_pe, k_nope, k_pe, v, do, lse, delta)
    return dqn, dqp, dkn, dkp.sum(axis=2).astype(k_pe.dtype), dvv


def _aligned_forward(q_nope, q_pe, k_nope, k_pe, v, segments, cfg):
    pos = jnp.arange(q_nope.shape[1], dtype=jnp.int32)
    return _forward(q_nope, q_pe, k_nope, k_pe, v, pos, pos, segments, segments, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q_nope, q_pe, k_nope, k_pe, v, segments, cfg):
    return _aligned_forward(q_nope, q_pe, k_nope, k_pe, v, segments, cfg)[0]


def _attention_fwd(q_nope, q_pe, k_nope, k_pe, v, segments, cfg):
    o, lse = _aligned_forward(q_nope, q_pe, k_nope, k_pe, v, segments, cfg)
    return o, (q_nope, q_pe, k_nope, k_pe, v, segments, o, lse)


def _attention_bwd(cfg, res, do):
    *grads, = _backward(*res, do, cfg)
    return (*grads, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, segments, *, scale: float, block_q: int = 64,
                  block_k: int = 64, num_warps: int | None = None, num_stages: int | None = None,
                  interpret: bool = False, implementation: str = "auto") -> jax.Array:
    """Causal attention within segments -> [B, T, nh, dv] in ``v.dtype``; differentiable in the
    five arrays (the backward runs two more kernels).

    ``q_nope`` [B, T, nh, dn], ``q_pe`` [B, T, nh, dr], ``k_nope`` [B, T, nh, dn], ``k_pe`` [B, T, dr]
    (shared by the heads), ``v`` [B, T, nh, dv], ``segments`` int [B, T] (document of each token).
    T is padded to a multiple of the blocks (padding forms its own segment). ``implementation``:
    'auto' (Triton on GPU, :func:`~dsv2_jax.attention.blockwise_attention` elsewhere), 'triton', 'xla'.
    """
    from dsv2_jax.attention import SegmentMask, blockwise_attention

    interpret = interpret or _common.interpreting()
    impl = _common.resolve_implementation(implementation, interpret, "mla_attention")
    b, t, nh, dn = q_nope.shape
    want = {"q_pe": (b, t, nh), "k_nope": (b, t, nh, dn), "k_pe": (b, t), "v": (b, t, nh), "segments": (b, t)}
    got = {"q_pe": q_pe.shape[:3], "k_nope": k_nope.shape, "k_pe": k_pe.shape[:2], "v": v.shape[:3],
           "segments": segments.shape}
    bad = [f"{k} {tuple(got[k])} (expected {want[k]}...)" for k in want if tuple(got[k]) != want[k]]
    if bad or k_pe.shape[-1] != q_pe.shape[-1]:
        raise ValueError(f"mla_attention: q_nope is {tuple(q_nope.shape)}; mismatched: {', '.join(bad) or 'k_pe dim'}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not (_common.is_pow2(blk) and blk >= 16):
            raise ValueError(f"mla_attention: {name}={blk} must be a power of two >= 16")
    if impl == "xla":
        return blockwise_attention(q_nope, q_pe, k_nope, k_pe, v, SegmentMask(segments), scale,
                                   max(block_q, block_k), v.dtype)
    pad = -t % max(block_q, block_k)
    segments = segments.astype(jnp.int32)
    if pad:  # padded tokens: a segment of their own (-1), sliced off the output
        widen = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        q_nope, q_pe, k_nope, k_pe, v = map(widen, (q_nope, q_pe, k_nope, k_pe, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
    cfg = (float(scale), block_q, block_k, num_warps, num_stages, interpret)
    return _attention(q_nope, q_pe, k_nope, k_pe, v, segments, cfg)[:, :t]


def mla_attention_partial(q_nope, q_pe, k_nope, k_pe, v, q_pos, k_start, q_segments, k_segments, *,
                          scale: float, block_q: int = 64, block_k: int = 64, num_warps: int | None = None,
                          num_stages: int | None = None, interpret: bool = False):
    """Forward only: T queries at positions ``q_pos`` [T] against S keys at positions
    ``k_start + [0, S)``; query t sees key s when the key's position <= the query's and
    ``k_segments[b, s] == q_segments[b, t]``. Returns (o [B, T, nh, dv] in ``v.dtype``,
    lse [B, nh, T] float32): partial results over a slice of the keys, merged by the caller
    (:func:`merge_partials`). A prefill chunk against a slice of the cache, for instance."""
    b, t, nh, _ = q_nope.shape
    s_len = k_nope.shape[1]
    interpret = interpret or _common.interpreting()
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not (_common.is_pow2(blk) and blk >= 16):
            raise ValueError(f"mla_attention_partial: {name}={blk} must be a power of two >= 16")
    pad_q, pad_k = -t % block_q, -s_len % block_k
    q_pos, q_segments = q_pos.astype(jnp.int32), q_segments.astype(jnp.int32)
    k_segments = k_segments.astype(jnp.int32)
    if pad_q:  # padded queries: a segment no key has
        widen = lambda a: jnp.pad(a, [(0, 0), (0, pad_q)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        q_nope, q_pe = widen(q_nope), widen(q_pe)
        q_pos = jnp.pad(q_pos, (0, pad_q), mode="edge")
        q_segments = jnp.pad(q_segments, ((0, 0), (0, pad_q)), constant_values=-2)
    if pad_k:  # padded keys: a segment no query has
        widen = lambda a: jnp.pad(a, [(0, 0), (0, pad_k)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        k_nope, k_pe, v = widen(k_nope), widen(k_pe), widen(v)
        k_segments = jnp.pad(k_segments, ((0, 0), (0, pad_k)), constant_values=-3)
    k_pos = (k_start + jnp.arange(s_len + pad_k)).astype(jnp.int32)
    cfg = (float(scale), block_q, block_k, num_warps, num_stages, interpret)
    o, lse = _forward(q_nope, q_pe, k_nope, k_pe.astype(q_pe.dtype), v, q_pos, k_pos, q_segments, k_segments, cfg)
    return o[:, :t], lse[:, :, :t]


def merge_partials(a, b):
    """Two (o [B, T, nh, dv], lse [B, nh, T]) results over disjoint key sets -> the result over
    both (float32 o). ``lse = -inf`` (no keys yet) is the identity."""
    (oa, la), (ob, lb) = a, b
    m = jnp.maximum(la, lb)
    wa, wb = jnp.exp(la - m), jnp.exp(lb - m)
    to_rows = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # noqa: E731  [B, nh, T] -> [B, T, nh, 1]
    o = (oa.astype(jnp.float32) * to_rows(wa) + ob.astype(jnp.float32) * to_rows(wb)) / to_rows(wa + wb)
    return o, m + jnp.log(wa + wb)
