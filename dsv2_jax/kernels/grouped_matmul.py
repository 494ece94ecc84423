"""Pallas (Triton) kernels: grouped matmul of dense (bf16 / fp32) routed experts, with its VJP.

Reference: ``jax.lax.ragged_dot``. On a GPU, XLA rewrites ``ragged_dot`` into a product of
every row with every expert, padded to ``[E, M, ...]`` (64 times the work and 18 GiB of
temporaries for one V2-Lite MoE layer's forward and backward over 4,096 tokens,
docs/platform.md); these kernels do the work of the M rows only.

Rows of ``x [M, K]`` are sorted by expert, ``group_sizes [E]`` says how many rows each expert
owns (rows past their sum belong to no expert and come out zero, as in ``ragged_dot``).

- forward ``y = x @ w[e]`` and ``dx = dy @ w[e]^T``: one kernel. XLA builds the tile
  schedule of the AWQ grouped kernel (``awq_grouped_matmul.tile_schedule``: row tiles of one
  expert each); grid ``(tiles, out tiles)``; each program loops over the contraction in tiles
  and reads only its expert's weights. ``dx`` reads the weight tile transposed.
- ``dw[e] = x_e^T @ dy_e``: grid ``(E, K tiles, N tiles)``; each program loops over its expert's
  rows (a trip count known only on the device) and writes its tile once, zero for an expert
  with no rows: no atomics, so the result does not vary from run to run.

All accumulation is float32; fp32 operands multiply at full precision (no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv2_jax.kernels import _common
from dsv2_jax.kernels.awq_grouped_matmul import tile_schedule


def _rows_kernel(sched_ref, x_ref, w_ref, o_init_ref, o_ref, *, n_contract, n_out, block_m, block_n,
                 block_c, transpose_w, precision):
    """o[rows of tile t, out tile j] = x[rows, :] @ w[e] (or w[e]^T), one expert per row tile."""
    del o_init_ref  # aliased to o_ref: rows that no tile covers stay zero
    t, j = pl.program_id(0), pl.program_id(1)
    expert, row_start, row_end = sched_ref[0, t], sched_ref[1, t], sched_ref[2, t]

    @pl.when(row_end > row_start)
    def _():
        rmask = (row_start + jnp.arange(block_m) < row_end)[:, None]
        omask = j * block_n + jnp.arange(block_n) < n_out

        def body(i, acc):
            c0 = i * block_c
            cmask = c0 + jnp.arange(block_c) < n_contract
            x = plgpu.load(x_ref.at[pl.ds(row_start, block_m), pl.ds(c0, block_c)],
                           mask=rmask & cmask[None, :], other=0)
            if transpose_w:  # w[e] is [out, contract]
                w = plgpu.load(w_ref.at[expert, pl.ds(j * block_n, block_n), pl.ds(c0, block_c)],
                               mask=omask[:, None] & cmask[None, :], other=0)
                return acc + plgpu.dot(x, w, trans_b=True, precision=precision)
            w = plgpu.load(w_ref.at[expert, pl.ds(c0, block_c), pl.ds(j * block_n, block_n)],
                           mask=cmask[:, None] & omask[None, :], other=0)
            return acc + plgpu.dot(x, w, precision=precision)

        acc = jax.lax.fori_loop(0, pl.cdiv(n_contract, block_c), body,
                                jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(o_ref.at[pl.ds(row_start, block_m), pl.ds(j * block_n, block_n)],
                    acc.astype(o_ref.dtype), mask=rmask & omask[None, :])


def _dw_kernel(starts_ref, sizes_ref, x_ref, dy_ref, o_ref, *, k_in, n_out, block_m, block_k, block_n,
               precision):
    """o[e, k tile, n tile] = x[rows of e, k tile]^T @ dy[rows of e, n tile]."""
    e, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, size = starts_ref[e], sizes_ref[e]
    kmask = kt * block_k + jnp.arange(block_k) < k_in
    nmask = nt * block_n + jnp.arange(block_n) < n_out

    def body(i, acc):
        r0 = start + i * block_m
        rmask = (r0 + jnp.arange(block_m) < start + size)[:, None]
        x = plgpu.load(x_ref.at[pl.ds(r0, block_m), pl.ds(kt * block_k, block_k)],
                       mask=rmask & kmask[None, :], other=0)
        dy = plgpu.load(dy_ref.at[pl.ds(r0, block_m), pl.ds(nt * block_n, block_n)],
                        mask=rmask & nmask[None, :], other=0)
        return acc + plgpu.dot(x, dy, trans_a=True, precision=precision)

    acc = jax.lax.fori_loop(0, (size + block_m - 1) // block_m, body,
                            jnp.zeros((block_k, block_n), jnp.float32))
    plgpu.store(o_ref.at[e, pl.ds(kt * block_k, block_k), pl.ds(nt * block_n, block_n)],
                acc.astype(o_ref.dtype), mask=kmask[:, None] & nmask[None, :])


def _block_m(m: int, e: int, block_m: int | None) -> int:
    if block_m is None:  # the expected rows per expert, clamped to [16, 64]
        block_m = min(64, max(16, _common.next_pow2(pl.cdiv(m, max(1, min(e, m))))))
    if not (_common.is_pow2(block_m) and block_m >= 16):
        raise ValueError(f"grouped_matmul: block_m={block_m} must be a power of two >= 16")
    return block_m


def _rows_call(x, w, group_sizes, *, transpose_w, cfg):
    block_m, block_n, block_c, num_warps, num_stages, interpret = cfg
    m, c = x.shape
    n = w.shape[1] if transpose_w else w.shape[2]
    bm = _block_m(m, w.shape[0], block_m)
    sched = tile_schedule(group_sizes, m, bm)
    kernel = functools.partial(_rows_kernel, n_contract=c, n_out=n, block_m=bm, block_n=block_n,
                               block_c=block_c, transpose_w=transpose_w,
                               precision=_common.dot_precision(x.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(sched.shape[1], pl.cdiv(n, block_n)),
        input_output_aliases={3: 0},
        compiler_params=_common.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul_dx" if transpose_w else "grouped_matmul",
    )(sched, x, w.astype(x.dtype), jnp.zeros((m, n), x.dtype))


def _dw_call(x, dy, group_sizes, e, w_dtype, cfg):
    block_m, block_n, block_k, num_warps, num_stages, interpret = cfg
    m, k = x.shape
    n = dy.shape[1]
    bm = _block_m(m, e, block_m)
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    kernel = functools.partial(_dw_kernel, k_in=k, n_out=n, block_m=bm, block_k=block_k, block_n=block_n,
                               precision=_common.dot_precision(x.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, k, n), w_dtype),
        grid=(e, pl.cdiv(k, block_k), pl.cdiv(n, block_n)),
        compiler_params=_common.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul_dw",
    )(starts, sizes, x, dy.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, group_sizes, cfg):
    return _rows_call(x, w, group_sizes, transpose_w=False, cfg=cfg)


def _grouped_fwd(x, w, group_sizes, cfg):
    return _grouped(x, w, group_sizes, cfg), (x, w, group_sizes)


def _grouped_bwd(cfg, res, dy):
    x, w, group_sizes = res
    dx = _rows_call(dy.astype(x.dtype), w, group_sizes, transpose_w=True, cfg=cfg)
    dw = _dw_call(x, dy, group_sizes, w.shape[0], w.dtype, cfg)
    return dx, dw, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, block_m: int | None = None,
                   block_n: int = 128, block_k: int = 64, num_warps: int | None = None,
                   num_stages: int | None = None, interpret: bool = False,
                   implementation: str = "auto") -> jax.Array:
    """``y[r] = x[r] @ w[e(r)]`` for rows sorted by expert -> ``[M, N]`` in ``x.dtype``;
    differentiable in ``x`` and ``w`` (``jax.grad`` runs the two backward kernels).

    ``w`` is ``[E, K, N]`` (cast to ``x.dtype``), ``group_sizes`` int32 ``[E]`` with
    ``sum(group_sizes) <= M``. ``block_m`` defaults to the expected rows per expert, clamped
    to [16, 64]; ``block_k`` tiles the contraction, ``block_n`` the output columns.
    ``implementation``: 'auto' (Triton on GPU, ``ragged_dot`` elsewhere), 'triton', 'xla'.
    """
    impl, cfg = _checked("grouped_matmul", x, w.shape[1], w, group_sizes, implementation, interpret,
                         (block_m, block_n, block_k, num_warps, num_stages))
    if impl == "xla":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[2]), x.dtype)
    return _grouped(x, w, group_sizes.astype(jnp.int32), cfg)


def _checked(fn, rows, contract, w, group_sizes, implementation, interpret, tiles):
    """The implementation to run and the kernels' static config, after checking the shapes
    (``rows [M, contract]`` against ``w [E, K, N]``) and the tile sizes."""
    interpret = interpret or _common.interpreting()
    impl = _common.resolve_implementation(implementation, interpret, fn)
    if rows.ndim != 2 or w.ndim != 3 or rows.shape[1] != contract or group_sizes.shape != (w.shape[0],):
        want = "x [M, K]" if fn == "grouped_matmul" else "dy [M, N]"
        raise ValueError(f"{fn}: need {want}, w [E, K, N] and group_sizes [E]; got {want.split()[0]} "
                         f"{tuple(rows.shape)}, w {tuple(w.shape)}, group_sizes {tuple(group_sizes.shape)}")
    block_m, block_n, block_k, num_warps, num_stages = tiles
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if not (_common.is_pow2(b) and b >= 16):
            raise ValueError(f"{fn}: {name}={b} must be a power of two >= 16")
    return impl, (block_m, block_n, block_k, num_warps, num_stages, interpret)


def grouped_matmul_transposed(dy: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                              block_m: int | None = None, block_n: int = 128, block_k: int = 64,
                              num_warps: int | None = None, num_stages: int | None = None,
                              interpret: bool = False, implementation: str = "auto") -> jax.Array:
    """``dx[r] = dy[r] @ w[e(r)]^T`` -> ``[M, K]`` for ``dy [M, N]``, ``w [E, K, N]``: the input
    gradient of :func:`grouped_matmul` alone (QLoRA's backward through dequantized experts)."""
    impl, cfg = _checked("grouped_matmul_transposed", dy, w.shape[2], w, group_sizes, implementation,
                         interpret, (block_m, block_n, block_k, num_warps, num_stages))
    if impl == "xla":
        return jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2).astype(dy.dtype), group_sizes)
    if dy.shape[0] == 0:
        return jnp.zeros((0, w.shape[1]), dy.dtype)
    return _rows_call(dy, w, group_sizes.astype(jnp.int32), transpose_w=True, cfg=cfg)
