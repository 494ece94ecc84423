"""Pallas (Triton) kernel: fused W4A16 matmul ``x [M, K] @ W -> [M, N]`` for few rows.

Reference: :func:`dsv2_jax.quant.awq.awq_matmul_reference`. Backend choice: see
``_common.py``. Meant for decode (M = 1..64): the packed weights are read once from HBM
and unpacked in registers, never written back dequantized.

Per K tile (``block_k`` divides the group size, so the tile has one zero and one scale
row) the kernel computes ``x_tile @ (q - z)`` and only then scales the ``[M, block_n]``
partial by ``s``::

    y = sum_g s_g * (x_g @ (q_g - z_g))

``q - z`` is an integer in [-15, 15], exact in bf16/fp16, and a 16-bit activation times
it is exact in fp32, so with fp32 accumulation this matches the fp32 reference to fp32
rounding, and it multiplies ``M * block_n`` scales per tile instead of ``block_k * block_n``.

Grid ``(N tiles, M tiles, split_k)``. With split-K each program sums a contiguous range
of K tiles into its own slice of an fp32 ``[split_k, M, N]`` buffer, reduced by XLA.
M is padded to a block of >= 16 rows (Triton's smallest ``dot``) with masked loads;
the N tail (N = 576, 10944, ...) is masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv2_jax.kernels import _common
from dsv2_jax.quant.awq import PACK, AWQWeight, awq_matmul_reference

MAX_BLOCK_M = 64


def _matmul_kernel(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, m, n_out, block_m, block_n,
                   block_k, group_size, tiles_per_split, precision):
    nt, mt, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bw = block_n // PACK
    rows = mt * block_m + jnp.arange(block_m)
    rmask = (rows < m)[:, None]
    wmask = (nt * bw + jnp.arange(bw) < n_out // PACK)[None, :]
    cmask = (nt * block_n + jnp.arange(block_n) < n_out)[None, :]

    def body(t, acc):
        k0 = (sk * tiles_per_split + t) * block_k
        g = k0 // group_size
        x = plgpu.load(x_ref.at[pl.ds(mt * block_m, block_m), pl.ds(k0, block_k)],
                       mask=rmask, other=0)
        words = plgpu.load(qw_ref.at[pl.ds(k0, block_k), pl.ds(nt * bw, bw)], mask=wmask, other=0)
        zwords = plgpu.load(qz_ref.at[pl.ds(g, 1), pl.ds(nt * bw, bw)], mask=wmask, other=0)
        s = plgpu.load(s_ref.at[pl.ds(g, 1), pl.ds(nt * block_n, block_n)], mask=cmask, other=0)
        w_int = _common.unpack_tile(words) - _common.unpack_tile(zwords)  # [bk, bn]
        part = jnp.dot(x, w_int.astype(x.dtype), precision=precision,
                       preferred_element_type=jnp.float32)  # [bm, bn]
        return acc + part * s.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, tiles_per_split, body,
                            jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[sk, pl.ds(mt * block_m, block_m), pl.ds(nt * block_n, block_n)],
                acc.astype(o_ref.dtype), mask=rmask & cmask)


def awq_matmul(x: jax.Array, w: AWQWeight, *, block_m: int | None = None, block_n: int = 128,
               block_k: int | None = None, split_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               interpret: bool = False, implementation: str = "auto") -> jax.Array:
    """Fused ``x [M, in] @ dequantize(w) -> [M, out]`` in ``x.dtype``, fp32 accumulation.

    ``block_m`` defaults to the next power of two >= max(M, 16), capped at 64; ``split_k``
    defaults to a divisor of the K tiles that fills the GPU (see ``_common.pick_split_k``).
    ``implementation``: 'auto' (Triton on GPU, XLA reference elsewhere), 'triton', 'xla'.
    ``interpret=True`` runs the Pallas kernel on the CPU (tests).
    """
    interpret = interpret or _common.interpreting()
    impl = _common.resolve_implementation(implementation, interpret, "awq_matmul")
    if w.stacked or x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"awq_matmul: x {tuple(x.shape)} must be [M, in={w.in_features}] and "
                         f"w unstacked, got qweight {tuple(w.qweight.shape)}")
    if impl == "xla":
        return awq_matmul_reference(x, w)
    m, k = x.shape
    n = w.out_features
    block_k = _common.pick_block_k(w.group_size, block_k, "awq_matmul")
    block_n = _common.check_block_n(block_n, "awq_matmul")
    if block_m is None:
        block_m = min(MAX_BLOCK_M, max(16, _common.next_pow2(m)))
    if not (_common.is_pow2(block_m) and block_m >= 16):
        raise ValueError(f"awq_matmul: block_m={block_m} must be a power of two >= 16")
    k_tiles, n_tiles, m_tiles = k // block_k, pl.cdiv(n, block_n), pl.cdiv(m, block_m)
    split_k = _common.pick_split_k(k_tiles, n_tiles * m_tiles, split_k)
    out_dtype = x.dtype if split_k == 1 else jnp.float32
    kernel = functools.partial(
        _matmul_kernel, m=m, n_out=n, block_m=block_m, block_n=block_n, block_k=block_k,
        group_size=w.group_size, tiles_per_split=k_tiles // split_k,
        precision=_common.dot_precision(x.dtype))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split_k, m, n), out_dtype),
        grid=(n_tiles, m_tiles, split_k),
        compiler_params=_common.compiler_params(num_warps, num_stages, block_m),
        interpret=interpret,
        name="awq_matmul",
    )(x, w.qweight, w.qzeros, w.scales)
    return out[0] if split_k == 1 else out.sum(axis=0).astype(x.dtype)
