"""The AutoAWQ "GEMM" 4-bit format, in one place (docs/awq.md).

A quantized linear ``in -> out`` with group size ``G`` is stored as

- ``qweight`` int32 ``[in, out/8]``: eight 4-bit values per word. Nibble ``i`` (bits
  ``4i..4i+3``) of word ``j`` holds output column ``8j + AWQ_ORDER[i]``.
- ``qzeros``  int32 ``[in/G, out/8]``: the zero points, packed the same way, stored raw.
- ``scales``  float ``[in/G, out]``.

``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]``. Words are often negative int32, so
unpacking uses a *logical* right shift then ``& 0xF``. Routed experts add a leading stack
axis ``[E, ...]`` to all three arrays.

This module holds the NumPy packer/quantizer (for tests and converters) and the pure-jnp
references that every Pallas kernel in ``dsv2_jax/kernels/`` is tested against. The model
calls :func:`dsv2_jax.quant.ops.awq_linear`, never these references directly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Nibble i of a packed word holds column 8j + AWQ_ORDER[i] (AutoAWQ's GEMM packer).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column 8j + c lives in nibble AWQ_REVERSE_ORDER[c]; the unpack shift is 4 * that.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
PACK = 8  # 4-bit values per int32 word

_SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _has_shape(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


@dataclasses.dataclass(frozen=True)
class AWQWeight:
    """One AWQ-quantized linear ``in -> out`` (or a stack of E of them), as a JAX pytree.

    The three arrays are pytree children (they pass through ``jit``/``vmap``/sharding);
    ``group_size``, ``in_features`` and ``out_features`` are static.

    Example::

        w = AWQWeight.quantize(np.random.randn(256, 576).astype(np.float32), group_size=64)
        w.shape        # (256, 576)
        y = dsv2_jax.quant.ops.awq_linear(jnp.ones((3, 256), jnp.bfloat16), w)  # [3, 576]
    """

    qweight: jax.Array  # int32 [..., in, out/8]
    qzeros: jax.Array  # int32 [..., in/G, out/8]
    scales: jax.Array  # fp16/bf16 [..., in/G, out]
    group_size: int
    in_features: int
    out_features: int

    def __post_init__(self):
        # Pytree machinery rebuilds instances with placeholder leaves (None, object());
        # only validate when the leaves are array-like.
        if all(_has_shape(a) for a in (self.qweight, self.qzeros, self.scales)):
            _validate(self.qweight, self.qzeros, self.scales, self.group_size,
                      self.in_features, self.out_features, name="AWQWeight")

    @classmethod
    def from_arrays(cls, qweight, qzeros, scales, group_size: int, *, name: str = "AWQWeight"):
        """Build from checkpoint arrays, deriving in/out; errors are prefixed with ``name``."""
        qweight, qzeros, scales = jnp.asarray(qweight), jnp.asarray(qzeros), jnp.asarray(scales)
        if qweight.ndim < 2:
            raise ValueError(f"{name}: qweight has shape {tuple(qweight.shape)}; "
                             "expected [..., in, out/8]")
        in_features, out_features = qweight.shape[-2], qweight.shape[-1] * PACK
        _validate(qweight, qzeros, scales, group_size, in_features, out_features, name=name)
        return cls(qweight, qzeros, scales, group_size, in_features, out_features)

    @classmethod
    def quantize(cls, w, group_size: int, *, scale_dtype=np.float16):
        """Round-to-nearest quantize a float ``[..., in, out]`` array (NumPy) into an AWQWeight."""
        w = np.asarray(w, np.float32)
        lead = w.shape[:-2]
        flat = w.reshape((-1,) + w.shape[-2:])
        parts = zip(*(quantize_rtn(m, group_size, scale_dtype=scale_dtype) for m in flat))
        q, z, s = (np.stack(p).reshape(lead + p[0].shape) for p in parts)
        return cls.from_arrays(q, z, s, group_size)

    @property
    def stacked(self) -> bool:
        """True for a stack of experts ``[E, in, out/8]``."""
        return len(self.qweight.shape) > 2

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the dequantized weight: ``(..., in, out)``."""
        return tuple(self.qweight.shape[:-2]) + (self.in_features, self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes held on device by qweight + qzeros + scales."""
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                   for a in (self.qweight, self.qzeros, self.scales))


jax.tree_util.register_dataclass(
    AWQWeight,
    data_fields=["qweight", "qzeros", "scales"],
    meta_fields=["group_size", "in_features", "out_features"],
)


def _validate(qweight, qzeros, scales, group_size, in_features, out_features, *, name):
    qs, zs, ss = tuple(qweight.shape), tuple(qzeros.shape), tuple(scales.shape)
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(f"{name}: group_size={group_size!r}; expected a positive int")
    if out_features % PACK:
        raise ValueError(f"{name}: out_features={out_features} is not a multiple of {PACK}")
    if in_features % group_size:
        raise ValueError(f"{name}: in_features={in_features} is not a multiple of "
                         f"group_size={group_size}")
    lead = qs[:-2]
    want = {
        "qweight": (qs, lead + (in_features, out_features // PACK), jnp.int32),
        "qzeros": (zs, lead + (in_features // group_size, out_features // PACK), jnp.int32),
        "scales": (ss, lead + (in_features // group_size, out_features), None),
    }
    for tensor, (got, expected, dtype) in want.items():
        if got != expected:
            raise ValueError(
                f"{name}: {tensor} has shape {got}; expected {expected} for in={in_features}, "
                f"out={out_features}, group_size={group_size}, stack={lead or 'none'}")
    for tensor, arr in (("qweight", qweight), ("qzeros", qzeros)):
        if jnp.dtype(arr.dtype) != jnp.dtype(jnp.int32):
            raise ValueError(f"{name}: {tensor} has dtype {arr.dtype}; expected int32")
    if jnp.dtype(scales.dtype) not in _SCALE_DTYPES:
        raise ValueError(f"{name}: scales has dtype {scales.dtype}; expected float16, "
                         "bfloat16 or float32")


def empty_awq_arrays(in_features: int, out_features: int, group_size: int, *,
                     stack: int | None = None, scale_dtype=jnp.float16):
    """Zero-filled ``(qweight, qzeros, scales)`` of the right shapes, for module init."""
    _validate(jax.ShapeDtypeStruct((in_features, out_features // PACK), jnp.int32),
              jax.ShapeDtypeStruct((in_features // group_size, out_features // PACK), jnp.int32),
              jax.ShapeDtypeStruct((in_features // group_size, out_features), scale_dtype),
              group_size, in_features, out_features, name="empty_awq_arrays")
    lead = () if stack is None else (stack,)
    return (jnp.zeros(lead + (in_features, out_features // PACK), jnp.int32),
            jnp.zeros(lead + (in_features // group_size, out_features // PACK), jnp.int32),
            jnp.zeros(lead + (in_features // group_size, out_features), scale_dtype))


# --------------------------------------------------------------------------- NumPy


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack ``[..., n]`` values in 0..15 into int32 ``[..., n/8]`` in AutoAWQ's nibble order."""
    q = np.asarray(q)
    if q.shape[-1] % PACK:
        raise ValueError(f"pack_int4: last axis {q.shape[-1]} is not a multiple of {PACK}")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"pack_int4: values must lie in 0..15, found [{q.min()}, {q.max()}]")
    groups = q.astype(np.uint32).reshape(q.shape[:-1] + (-1, PACK))
    words = np.zeros(groups.shape[:-1], np.uint32)
    for nibble, col in enumerate(AWQ_ORDER):
        words |= groups[..., col] << np.uint32(4 * nibble)
    return words.view(np.int32)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int32 ``[..., n/8]`` -> uint8 ``[..., n]``."""
    words = np.asarray(packed, np.int32).view(np.uint32)
    out = np.empty(words.shape + (PACK,), np.uint8)
    for nibble, col in enumerate(AWQ_ORDER):
        out[..., col] = (words >> np.uint32(4 * nibble)) & np.uint32(0xF)
    return out.reshape(words.shape[:-1] + (-1,))


def quantize_rtn(w: np.ndarray, group_size: int, *, scale_dtype=np.float16):
    """Round-to-nearest asymmetric 4-bit quantization of ``w [in, out]`` per ``group_size`` rows.

    Returns ``(qweight, qzeros, scales)`` in the AWQ GEMM layout. Each group's range is
    widened to include 0 so the zero point is representable (AutoAWQ clamps the zero
    instead; the two agree on any group that spans 0), and the scale is rounded *up* to
    its stored dtype, so ``|W - dequantize| <= scale / 2`` holds for every element.
    """
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_rtn: w has shape {w.shape}; expected [in, out]")
    n_in, n_out = w.shape
    if n_in % group_size or n_out % PACK:
        raise ValueError(f"quantize_rtn: w [{n_in}, {n_out}] needs in % group_size({group_size}) "
                         f"== 0 and out % {PACK} == 0")
    g = w.reshape(n_in // group_size, group_size, n_out)
    lo = np.minimum(g.min(axis=1), 0.0)
    hi = np.maximum(g.max(axis=1), 0.0)
    s32 = np.maximum((hi - lo) / 15.0, 1e-5).astype(np.float32)
    s = s32.astype(scale_dtype)
    low = s.astype(np.float32) < s32
    s[low] = np.nextafter(s[low], np.asarray(np.inf, scale_dtype))
    sf = s.astype(np.float32)
    z = np.clip(np.round(-lo / sf), 0, 15)
    q = np.clip(np.round(g / sf[:, None, :]) + z[:, None, :], 0, 15).astype(np.uint8)
    return pack_int4(q.reshape(n_in, n_out)), pack_int4(z.astype(np.uint8)), s


def dequantize_np(qweight, qzeros, scales, group_size: int) -> np.ndarray:
    """NumPy dequantization to float32 ``[..., in, out]`` (fp32 arithmetic)."""
    q = unpack_int4(qweight).astype(np.float32)
    z = np.repeat(unpack_int4(qzeros).astype(np.float32), group_size, axis=-2)
    s = np.repeat(np.asarray(scales).astype(np.float32), group_size, axis=-2)
    return (q - z) * s


# --------------------------------------------------------------------------- jnp references


def unpack_int4_jnp(packed: jax.Array) -> jax.Array:
    """int32 ``[..., n/8]`` -> int32 ``[..., n]`` values 0..15, in logical column order."""
    shifts = 4 * jnp.asarray(AWQ_REVERSE_ORDER, jnp.int32)  # [8], one per column 8j + c
    words = jnp.broadcast_to(packed[..., None], packed.shape + (PACK,))
    nib = jax.lax.shift_right_logical(words, jnp.broadcast_to(shifts, words.shape)) & 0xF
    return nib.reshape(packed.shape[:-1] + (packed.shape[-1] * PACK,))


def dequantize(w: AWQWeight, dtype=jnp.float32) -> jax.Array:
    """Dequantize to ``[..., in, out]`` of ``dtype``; arithmetic in fp32, cast at the end.

    Reference for :mod:`dsv2_jax.kernels.awq_dequant`.
    """
    lead = tuple(w.qweight.shape[:-2])
    n_groups = w.in_features // w.group_size
    q = unpack_int4_jnp(w.qweight).reshape(lead + (n_groups, w.group_size, w.out_features))
    z = unpack_int4_jnp(w.qzeros)[..., :, None, :]  # [..., in/G, 1, out]
    s = w.scales.astype(jnp.float32)[..., :, None, :]
    deq = (q - z).astype(jnp.float32) * s
    return deq.reshape(lead + (w.in_features, w.out_features)).astype(dtype)


def _check_x(x, w: AWQWeight, fn: str, *, stacked: bool):
    if w.stacked != stacked:
        want = "a stacked [E, in, out/8]" if stacked else "an unstacked [in, out/8]"
        raise ValueError(f"{fn}: expected {want} AWQWeight, got qweight {tuple(w.qweight.shape)}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}; expected last axis "
                         f"in_features={w.in_features}")


def awq_matmul_reference(x: jax.Array, w: AWQWeight) -> jax.Array:
    """``x [..., in] @ dequantize(w) -> [..., out]`` in fp32 (exact products), cast to x.dtype.

    Reference for :mod:`dsv2_jax.kernels.awq_matmul`.
    """
    _check_x(x, w, "awq_matmul_reference", stacked=False)
    y = jnp.einsum("...k,kn->...n", x.astype(jnp.float32), dequantize(w, jnp.float32),
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def awq_grouped_matmul_reference(x: jax.Array, w: AWQWeight, group_sizes: jax.Array) -> jax.Array:
    """Rows of ``x [M, in]`` sorted by expert; rows of expert e use ``w[e]``. -> ``[M, out]``.

    ``group_sizes`` int32 ``[E]``; rows past ``sum(group_sizes)`` come out zero. Dequantizes
    every expert (fp32) then ``jax.lax.ragged_dot``. Reference for
    :mod:`dsv2_jax.kernels.awq_grouped_matmul`.
    """
    _check_x(x, w, "awq_grouped_matmul_reference", stacked=True)
    if x.ndim != 2 or group_sizes.shape != (w.qweight.shape[0],):
        raise ValueError(f"awq_grouped_matmul_reference: x {tuple(x.shape)} must be [M, in] and "
                         f"group_sizes {tuple(group_sizes.shape)} must be [E={w.qweight.shape[0]}]")
    y = jax.lax.ragged_dot(x.astype(jnp.float32), dequantize(w, jnp.float32),
                           group_sizes.astype(jnp.int32), precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
