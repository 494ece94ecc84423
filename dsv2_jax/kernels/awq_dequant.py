"""Pallas (Triton) kernel: dequantize AWQ packed weights to a dense bf16/fp32 matrix.

Reference: :func:`dsv2_jax.quant.awq.dequantize` (bit-exact: the same fp32 ops).
Used for large-M matmuls on the GPU (dequantize once, then a dense tensor-core matmul)
and for ``kv_b_proj`` when MLA absorbs it. Backend choice: see ``_common.py``.

Grid ``(E, K tiles, N tiles)``; each program unpacks a ``[block_k, block_n/8]`` tile of
words, subtracts the tile's single zero row (block_k divides the group size) and scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv2_jax.kernels import _common
from dsv2_jax.quant.awq import PACK, AWQWeight, dequantize


def _dequant_kernel(qw_ref, qz_ref, s_ref, o_ref, *, block_k, block_n, group_size, n_out):
    e, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bw = block_n // PACK
    k0 = kt * block_k
    g = k0 // group_size
    wcol = nt * bw + jnp.arange(bw)
    wmask = (wcol < n_out // PACK)[None, :]
    col = nt * block_n + jnp.arange(block_n)
    cmask = (col < n_out)[None, :]

    words = plgpu.load(qw_ref.at[e, pl.ds(k0, block_k), pl.ds(nt * bw, bw)], mask=wmask, other=0)
    zwords = plgpu.load(qz_ref.at[e, pl.ds(g, 1), pl.ds(nt * bw, bw)], mask=wmask, other=0)
    s = plgpu.load(s_ref.at[e, pl.ds(g, 1), pl.ds(nt * block_n, block_n)], mask=cmask, other=0)
    q = _common.unpack_tile(words) - _common.unpack_tile(zwords)  # [bk, bn] in [-15, 15]
    w = q.astype(jnp.float32) * s.astype(jnp.float32)
    plgpu.store(o_ref.at[e, pl.ds(k0, block_k), pl.ds(nt * block_n, block_n)],
                w.astype(o_ref.dtype), mask=cmask)


def awq_dequant(w: AWQWeight, dtype=jnp.bfloat16, *, block_k: int | None = None,
                block_n: int = 128, num_warps: int | None = None, num_stages: int | None = None,
                interpret: bool = False, implementation: str = "auto") -> jax.Array:
    """Dequantize ``w`` (stacked or not) to ``[..., in, out]`` of ``dtype``.

    ``implementation``: 'auto' (Triton on GPU, XLA reference elsewhere), 'triton', 'xla'.
    ``interpret=True`` runs the Pallas kernel on the CPU (tests).
    """
    interpret = interpret or _common.interpreting()
    impl = _common.resolve_implementation(implementation, interpret, "awq_dequant")
    if impl == "xla":
        return dequantize(w, dtype)
    block_k = _common.pick_block_k(w.group_size, block_k, "awq_dequant")
    block_n = _common.check_block_n(block_n, "awq_dequant")
    lead = tuple(w.qweight.shape[:-2])
    e = 1 if not lead else lead[0]
    if len(lead) > 1:
        raise ValueError(f"awq_dequant: at most one stack axis, got qweight {tuple(w.qweight.shape)}")
    k, n = w.in_features, w.out_features
    qw, qz, s = (a.reshape((e,) + a.shape[-2:]) for a in (w.qweight, w.qzeros, w.scales))
    kernel = functools.partial(_dequant_kernel, block_k=block_k, block_n=block_n,
                               group_size=w.group_size, n_out=n)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, k, n), dtype),
        grid=(e, k // block_k, pl.cdiv(n, block_n)),
        compiler_params=_common.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="awq_dequant",
    )(qw, qz, s)
    return out.reshape(lead + (k, n))
