"""Pieces shared by the AWQ Pallas kernels: backend choice, tiling, in-register unpacking.

All three AWQ kernels use the Pallas **Triton** backend (selected by passing
``jax.experimental.pallas.triton.CompilerParams``), not Mosaic GPU, because:

- the work is integer shifts/masks on packed words feeding a small ``dot``; Triton
  lowers these, masked loads for ragged N tails, and ``dot`` on tiles of 16 rows,
  which decode (M = 1..64) needs;
- Mosaic GPU wants warpgroup-sized (64-row) WGMMA tiles, TMA-friendly block shapes and
  explicit register layouts for the int4 -> bf16 conversion; 1-row decode and the
  N = 576 / 10944 tails fit it badly;
- the grouped kernel needs no scalar prefetch (which Triton lacks): its tile -> expert
  map is an ordinary int32 input read with scalar loads.

Triton's rules shape the kernels: every loaded block is a power of two in each
dimension (ragged tails are masked, not sliced), ``dot`` operands are >= 16 in each
dimension, and there is no scalar prefetch or dynamic grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from dsv2_jax import backend

IMPLEMENTATIONS = ("auto", "triton", "xla")

# Pallas Triton runs blocks of 4 warps well for these memory-bound tiles; 3 stages lets
# Triton prefetch the next K tile of packed weights while the current one is unpacked.
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
# About two waves of programs on an H200 (132 SMs) before split-K stops paying.
TARGET_PROGRAMS = 264


def resolve_implementation(implementation: str, interpret: bool, fn: str) -> str:
    """'triton' or 'xla'. ``interpret=True`` runs the Pallas code on any backend;
    'auto' picks Triton on a GPU backend and the XLA reference elsewhere; an explicit
    'triton' is honoured even on CPU so that ``.lower(lowering_platforms=("cuda",))`` works."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{fn}: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if interpret:
        if implementation == "xla":
            raise ValueError(f"{fn}: interpret=True runs the Pallas kernel; it cannot be "
                             "combined with implementation='xla'")
        return "triton"
    if implementation == "auto":
        return "triton" if backend.on_gpu() else "xla"
    return implementation


def interpreting() -> bool:
    """Kernels run interpreted inside ``backend.target("gpu", interpret=True)``."""
    return backend.interpreting()


# 16-row tiles (decode) of the fused W4A16 kernels: with 4 warps and 3 stages ptxas caps them at
# 96 registers and spills 36-56 B per thread (H200 compile, docs/figures.md#gpu-compile); 8 warps
# and 2 stages keep the same tile shape in 80 registers with no spill.
SMALL_M_NUM_WARPS, SMALL_M_NUM_STAGES = 8, 2


def compiler_params(num_warps: int | None, num_stages: int | None,
                    block_m: int | None = None) -> plgpu.CompilerParams:
    small = block_m is not None and block_m <= 16
    return plgpu.CompilerParams(
        num_warps=num_warps if num_warps is not None else SMALL_M_NUM_WARPS if small else DEFAULT_NUM_WARPS,
        num_stages=num_stages if num_stages is not None else SMALL_M_NUM_STAGES if small else DEFAULT_NUM_STAGES,
    )


def unpack_tile(words: jax.Array) -> jax.Array:
    """int32 ``[R, C]`` packed words -> int32 ``[R, 8C]`` nibbles 0..15 in column order.

    Each word is repeated 8 times along the columns (broadcast + reshape, Triton's
    ``interleave`` idiom) and column ``8j + c`` is shifted right by ``4 * REVERSE[c]``;
    ``REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]`` is ``(c >> 1) + 4 * (c & 1)`` (see
    ``dsv2_jax.quant.awq.AWQ_REVERSE_ORDER``). The shift is logical: words may be negative.
    """
    r, c = words.shape
    rep = jnp.broadcast_to(words[:, :, None], (r, c, 8)).reshape(r, 8 * c)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, 8 * c), 1) & 7
    shift = ((col >> 1) + ((col & 1) << 2)) << 2
    return jax.lax.shift_right_logical(rep, jnp.broadcast_to(shift, (r, 8 * c))) & 0xF


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_block_k(group_size: int, block_k: int | None, fn: str) -> int:
    """K tile: a power of two dividing the group size, so each tile has one scale row."""
    if block_k is None:
        block_k = min(group_size, 64)
    if not (is_pow2(block_k) and block_k >= 16 and group_size % block_k == 0):
        raise ValueError(f"{fn}: block_k={block_k} must be a power of two >= 16 dividing "
                         f"group_size={group_size} (the Triton kernels need a power-of-two "
                         "group size >= 16; use implementation='xla' otherwise)")
    return block_k


def check_block_n(block_n: int, fn: str) -> int:
    if not (is_pow2(block_n) and block_n >= 32):
        raise ValueError(f"{fn}: block_n={block_n} must be a power of two >= 32")
    return block_n


def pick_split_k(k_tiles: int, other_programs: int, split_k: int | None, *,
                 min_tiles_per_split: int = 2) -> int:
    """Largest divisor of ``k_tiles`` that keeps the grid near TARGET_PROGRAMS programs.

    Split-K fills the GPU when M is small and N has few tiles (e.g. kv_a: N = 576 is 5
    tiles of 128); partial sums go to an fp32 ``[split, M, N]`` buffer summed afterwards,
    which keeps the result deterministic (no atomics).
    """
    if split_k is not None:
        if split_k < 1 or k_tiles % split_k:
            raise ValueError(f"split_k={split_k} must divide the {k_tiles} K tiles")
        return split_k
    best = 1
    for d in range(1, k_tiles + 1):
        if (k_tiles % d == 0 and k_tiles // d >= min_tiles_per_split
                and other_programs * d <= TARGET_PROGRAMS):
            best = d
    return best


def dot_precision(dtype):
    # fp32 operands would otherwise run as TF32 on the GPU; keep them IEEE so the
    # kernel agrees with the fp32 reference. bf16/fp16 operands are exact here anyway
    # (products of a 16-bit activation with an integer in [-15, 15]).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None

