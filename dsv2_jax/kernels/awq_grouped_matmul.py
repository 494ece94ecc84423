"""Pallas (Triton) kernel: grouped W4A16 matmul for the routed experts.

Reference: :func:`dsv2_jax.quant.awq.awq_grouped_matmul_reference` (dequantize every
expert + ``jax.lax.ragged_dot``). Backend choice: see ``_common.py``.

Rows of ``x [M, K]`` are sorted by expert; ``group_sizes [E]`` says how many rows each
expert owns. XLA first builds a small tile schedule: each expert's rows are cut into
row tiles of ``block_m`` (a tile never straddles two experts), giving at most
``cdiv(M, block_m) + min(E, M) - 1`` tiles, each ``(expert, row_start, row_end)``.
Triton has no scalar prefetch, so the kernel reads its tile's entry with scalar loads
from an ordinary int32 input and then reads that expert's packed weights. Unused
tiles (the bound is static, the schedule is not) and experts with no rows do no work
and read no weights.

Grid ``(tiles, N tiles, split_k)``, tiles fastest, so the row tiles of one expert run
next to each other and share its weight tiles in L2. The inner loop is the one of
``awq_matmul.py``: ``acc += (x_tile @ (q - z)) * s`` per K tile. Output rows that no
tile covers (past ``sum(group_sizes)``) stay zero, as ``ragged_dot`` leaves them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv2_jax.kernels import _common
from dsv2_jax.quant.awq import PACK, AWQWeight, awq_grouped_matmul_reference


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int) -> jax.Array:
    """int32 ``[3, T]``: per row tile its expert, first row and end row (exclusive).

    ``T = cdiv(m, block_m) + min(E, m) - 1`` bounds ``sum_e cdiv(group_sizes[e], block_m)``
    whenever ``sum(group_sizes) <= m``. Unused tiles get ``row_end == row_start``.
    """
    e = group_sizes.shape[0]
    num_tiles = pl.cdiv(m, block_m) + min(e, m) - 1
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    tiles = (gs + block_m - 1) // block_m
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), e - 1).astype(jnp.int32)
    row_start = jnp.minimum(starts[expert] + (t - tile_starts[expert]) * block_m, m)
    row_end = jnp.minimum(ends[expert], m)
    row_end = jnp.where(t < tile_ends[-1], row_end, row_start)
    return jnp.stack([expert, row_start, row_end]).astype(jnp.int32)


def _grouped_kernel(sched_ref, x_ref, qw_ref, qz_ref, s_ref, o_init_ref, o_ref, *, n_out,
                    block_m, block_n, block_k, group_size, tiles_per_split, precision):
    del o_init_ref  # aliased to o_ref: only there so that uncovered rows start at zero
    t, nt, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert, row_start, row_end = sched_ref[0, t], sched_ref[1, t], sched_ref[2, t]
    bw = block_n // PACK

    @pl.when(row_end > row_start)
    def _():
        rmask = (row_start + jnp.arange(block_m) < row_end)[:, None]
        wmask = (nt * bw + jnp.arange(bw) < n_out // PACK)[None, :]
        cmask = (nt * block_n + jnp.arange(block_n) < n_out)[None, :]

        def body(i, acc):
            k0 = (sk * tiles_per_split + i) * block_k
            g = k0 // group_size
            x = plgpu.load(x_ref.at[pl.ds(row_start, block_m), pl.ds(k0, block_k)],
                           mask=rmask, other=0)
            words = plgpu.load(qw_ref.at[expert, pl.ds(k0, block_k), pl.ds(nt * bw, bw)],
                               mask=wmask, other=0)
            zwords = plgpu.load(qz_ref.at[expert, pl.ds(g, 1), pl.ds(nt * bw, bw)],
                                mask=wmask, other=0)
            s = plgpu.load(s_ref.at[expert, pl.ds(g, 1), pl.ds(nt * block_n, block_n)],
                           mask=cmask, other=0)
            w_int = _common.unpack_tile(words) - _common.unpack_tile(zwords)  # [bk, bn]
            part = jnp.dot(x, w_int.astype(x.dtype), precision=precision,
                           preferred_element_type=jnp.float32)
            return acc + part * s.astype(jnp.float32)

        acc = jax.lax.fori_loop(0, tiles_per_split, body,
                                jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(o_ref.at[sk, pl.ds(row_start, block_m), pl.ds(nt * block_n, block_n)],
                    acc.astype(o_ref.dtype), mask=rmask & cmask)


def awq_grouped_matmul(x: jax.Array, w: AWQWeight, group_sizes: jax.Array, *,
                       block_m: int | None = None, block_n: int = 128,
                       block_k: int | None = None, split_k: int | None = None,
                       num_warps: int | None = None, num_stages: int | None = None,
                       interpret: bool = False, implementation: str = "auto") -> jax.Array:
    """``y[r] = x[r] @ dequantize(w[e(r)])`` for rows sorted by expert -> ``[M, out]``.

    ``w`` is stacked ``[E, in, out/8]``; ``group_sizes`` int32 ``[E]`` with
    ``sum(group_sizes) <= M`` (rows past the sum come out zero). ``block_m`` defaults to
    the expected rows per active expert, clamped to [16, 64]; ``split_k`` to a divisor of
    the K tiles that fills the GPU when there are few row tiles (decode).
    ``implementation``: 'auto' (Triton on GPU, XLA reference elsewhere), 'triton', 'xla'.
    ``interpret=True`` runs the Pallas kernel on the CPU (tests).
    """
    interpret = interpret or _common.interpreting()
    impl = _common.resolve_implementation(implementation, interpret, "awq_grouped_matmul")
    e = w.qweight.shape[0] if w.stacked else 0
    if (not w.stacked or x.ndim != 2 or x.shape[1] != w.in_features
            or group_sizes.shape != (e,)):
        raise ValueError(f"awq_grouped_matmul: need x [M, in={w.in_features}], stacked w "
                         f"[E, in, out/8] and group_sizes [E]; got x {tuple(x.shape)}, qweight "
                         f"{tuple(w.qweight.shape)}, group_sizes {tuple(group_sizes.shape)}")
    if impl == "xla":
        return awq_grouped_matmul_reference(x, w, group_sizes)
    m, k = x.shape
    n = w.out_features
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    block_k = _common.pick_block_k(w.group_size, block_k, "awq_grouped_matmul")
    block_n = _common.check_block_n(block_n, "awq_grouped_matmul")
    if block_m is None:
        block_m = min(64, max(16, _common.next_pow2(pl.cdiv(m, min(e, m)))))
    if not (_common.is_pow2(block_m) and block_m >= 16):
        raise ValueError(f"awq_grouped_matmul: block_m={block_m} must be a power of two >= 16")
    sched = tile_schedule(group_sizes, m, block_m)
    num_tiles = sched.shape[1]
    k_tiles, n_tiles = k // block_k, pl.cdiv(n, block_n)
    split_k = _common.pick_split_k(k_tiles, num_tiles * n_tiles, split_k)
    out_dtype = x.dtype if split_k == 1 else jnp.float32
    kernel = functools.partial(
        _grouped_kernel, n_out=n, block_m=block_m, block_n=block_n, block_k=block_k,
        group_size=w.group_size, tiles_per_split=k_tiles // split_k,
        precision=_common.dot_precision(x.dtype))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split_k, m, n), out_dtype),
        grid=(num_tiles, n_tiles, split_k),
        input_output_aliases={5: 0},
        compiler_params=_common.compiler_params(num_warps, num_stages, block_m),
        interpret=interpret,
        name="awq_grouped_matmul",
    )(sched, x, w.qweight, w.qzeros, w.scales, jnp.zeros((split_k, m, n), out_dtype))
    return out[0] if split_k == 1 else out.sum(axis=0).astype(x.dtype)
