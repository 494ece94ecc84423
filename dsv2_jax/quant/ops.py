"""The AWQ matmuls behind ``layers.Linear`` and ``expert_weights``: picks a kernel by backend
and row count (docs/awq.md).

- GPU, rows <= FUSED_MAX_ROWS (decode): the fused W4A16 kernel (reads packed weights once).
- GPU, more rows (prefill, training-free eval): dequantize once to ``x.dtype`` with the
  Pallas dequant kernel, then a dense tensor-core matmul with fp32 accumulation; at these
  sizes the matmul is compute-bound and the extra ``[in, out]`` write is cheap.
- GPU, routed experts: always the grouped Pallas kernel (``ragged_dot`` on GPU has been
  seen to fall back to a padded dense matmul, docs/platform.md).
- Any other backend (CPU): the pure-jnp references in ``awq.py``, so the model runs anywhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsv2_jax import backend, kernels
from dsv2_jax.quant.awq import (
    AWQWeight,
    awq_grouped_matmul_reference,
    awq_matmul_reference,
)

# Largest row count that takes the fused kernel. Past it the fused kernel's tiles of
# <= 64 rows re-read and re-unpack the weights once per row tile, and a dense bf16
# matmul on the dequantized weight wins. Retune with bench/gpu_kernels.py.
FUSED_MAX_ROWS = 64


def _use_kernels(w: AWQWeight) -> bool:
    # The Triton kernels tile K by a power of two dividing the group size (docs/awq.md:
    # real checkpoints use 64); anything else, or a non-GPU backend, takes the reference.
    g = w.group_size
    return backend.on_gpu() and g >= 16 and g & (g - 1) == 0


def awq_linear(x: jax.Array, w: AWQWeight) -> jax.Array:
    """``x [..., in] @ W -> [..., out]`` in ``x.dtype`` for an unstacked AWQWeight.

    Example::

        w = AWQWeight.quantize(np.random.randn(2048, 576).astype(np.float32), group_size=64)
        y = awq_linear(jnp.ones((1, 4, 2048), jnp.bfloat16), w)   # [1, 4, 576]
    """
    if w.stacked or x.shape[-1] != w.in_features:
        raise ValueError(f"awq_linear: x {tuple(x.shape)} must be [..., in={w.in_features}] and "
                         f"w unstacked; got qweight {tuple(w.qweight.shape)}")
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if not _use_kernels(w) or rows == 0:
        return awq_matmul_reference(x, w)
    y = _kernel_linear(x.reshape(rows, w.in_features), w)
    return y.reshape(lead + (w.out_features,))


# The kernel paths are differentiable in x (QLoRA trains adapters through the frozen packed
# base): the backward dequantizes the weight once, on the device, and multiplies by its
# transpose. The packed weight gets no gradient (it is never trained).


@jax.custom_vjp
def _kernel_linear(x2: jax.Array, w: AWQWeight) -> jax.Array:
    if x2.shape[0] <= FUSED_MAX_ROWS:
        return kernels.awq_matmul(x2, w, implementation="triton")
    wd = kernels.awq_dequant(w, x2.dtype, implementation="triton")
    return jnp.dot(x2, wd, preferred_element_type=jnp.float32).astype(x2.dtype)


def _kernel_linear_fwd(x2, w):
    return _kernel_linear(x2, w), w


def _kernel_linear_bwd(w, dy):
    wd = kernels.awq_dequant(w, dy.dtype, implementation="triton")
    return jnp.dot(dy, wd.T, preferred_element_type=jnp.float32).astype(dy.dtype), None


_kernel_linear.defvjp(_kernel_linear_fwd, _kernel_linear_bwd)


def awq_grouped_linear(x_sorted: jax.Array, w: AWQWeight, group_sizes: jax.Array) -> jax.Array:
    """Routed experts: ``x_sorted [M, in]`` rows grouped by expert, ``w`` stacked
    ``[E, in, out/8]``, ``group_sizes`` int32 ``[E]`` -> ``[M, out]`` in ``x.dtype``."""
    if not _use_kernels(w):
        return awq_grouped_matmul_reference(x_sorted, w, group_sizes)
    return _kernel_grouped(x_sorted, w, group_sizes)


@jax.custom_vjp
def _kernel_grouped(x, w, group_sizes):
    return kernels.awq_grouped_matmul(x, w, group_sizes, implementation="triton")


def _kernel_grouped_fwd(x, w, group_sizes):
    return _kernel_grouped(x, w, group_sizes), (w, group_sizes)


def _kernel_grouped_bwd(res, dy):
    w, group_sizes = res
    wd = kernels.awq_dequant(w, dy.dtype, implementation="triton")  # [E, in, out], one projection
    return kernels.grouped_matmul_transposed(dy, wd, group_sizes, implementation="triton"), None, None


_kernel_grouped.defvjp(_kernel_grouped_fwd, _kernel_grouped_bwd)
