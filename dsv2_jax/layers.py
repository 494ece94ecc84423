"""Basic layers: RMSNorm, the embedding, and the linear seam.

Model code calls ``Linear`` (and ``expert_weights.ExpertWeights`` for the stacked routed
experts) whatever the storage: dense ``[in, out]`` arrays, or AWQ 4-bit packed weights that
stay packed on the device and are dequantized inside the jitted step (docs/awq.md). Only
these two modules know about ``quant``; MLA, the MoE and the model never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import backend
from .errors import ConfigError
from .quant.awq import AWQWeight, dequantize, empty_awq_arrays
from .quant.ops import awq_linear

DTypeLike = jnp.dtype | str | type


def as_dtype(dtype: DTypeLike | None, default=jnp.float32) -> jnp.dtype:
    """Accept 'float32'/'bfloat16'/'float16' or a jnp dtype; a clear error otherwise."""
    if dtype is None:
        return jnp.dtype(default)
    names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
             "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(names)} or a jnp dtype")
        return jnp.dtype(names[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    return d


def tie_to(x: jax.Array, a: jax.Array) -> jax.Array:
    """``a`` plus a zero computed from ``x``: the same values, but data-dependent on ``x``.

    Tying a layer's packed AWQ words to its input keeps XLA from unpacking every layer's
    weights before the first layer runs (or out of a decode loop, as loop-invariant code)
    and holding them all at once; ``optimization_barrier`` is stripped by XLA's CPU
    pipeline. Float ``x * 0`` is not folded away, as it would change NaN/Inf semantics.

    A CPU-only fix: on a GPU the kernels read packed words straight from the parameter
    buffers, and the add would make XLA copy every packed weight before each kernel reads it
    (tests/test_gpu_compile.py checks the compiled decode loop), so the GPU paths skip it.
    """
    if backend.on_gpu():
        return a
    zero = jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32) * 0.0
    return a + zero.astype(a.dtype)


def check_group_size(group_size: int, in_features: int, name: str) -> None:
    if in_features % group_size:
        raise ConfigError(f"quantization_config.group_size = {group_size} does not divide the "
                          f"input size {in_features} of {name or 'a linear layer'}")


class QuantizedWeight(nnx.Variable):
    """Packed integer weights and their scales: loaded, never trained."""


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32, cast back, then scale: the reference's order of rounding.
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * y


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32, init_std: float = 0.02):
        self.dtype = dtype
        self.embedding = nnx.Param(normal_init(rngs, (vocab, dim), init_std, param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        if table.dtype.itemsize == 2:
            # Gather 16-bit rows as integers: XLA's CPU backend otherwise widens the whole
            # table to float32 for the gather (and hoists that copy out of decode loops).
            rows = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
            return jax.lax.bitcast_convert_type(rows, table.dtype).astype(self.dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class Linear(nnx.Module):
    """y = x @ W with W stored [in, out] (hub checkpoints store [out, in]).

    With ``quant`` (a :class:`dsv2_jax.config.QuantConfig`) the weight is held as AWQ
    ``qweight``/``qzeros``/``scales`` and dequantized per call by the AWQ kernels. ``lora`` (set
    by :func:`dsv2_jax.lora.add_lora`) is an adapter added to the output, over either storage.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, dtype=jnp.float32, init_std: float = 0.02,
                 quant=None, name: str = ""):
        if quant is not None and not quant.applies_to(name):
            quant = None
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.quantized = quant is not None
        self.lora = nnx.data(None)  # a dsv2_jax.lora.LoRA adapter, when one is attached
        if quant is None:
            self.weight = nnx.Param(normal_init(rngs, (in_features, out_features), init_std, param_dtype))
        else:
            check_group_size(quant.group_size, in_features, name)
            q, z, s = empty_awq_arrays(in_features, out_features, quant.group_size)
            self.group_size = quant.group_size
            self.qweight, self.qzeros, self.scales = (
                QuantizedWeight(q), QuantizedWeight(z), QuantizedWeight(s))

    def awq_weight(self, after=None):
        """The packed weight; with ``after`` (an array), tied so it is unpacked only once
        ``after`` exists: otherwise XLA may unpack every layer's weights up front and keep
        them all alive at once."""
        qweight = self.qweight[...] if after is None else tie_to(after, self.qweight[...])
        return AWQWeight(qweight, self.qzeros[...], self.scales[...], group_size=self.group_size,
                         in_features=self.in_features, out_features=self.out_features)

    def dense_weight(self, dtype, after=None) -> jax.Array:
        """The weight as a dense ``[in, out]`` array in ``dtype`` (AWQ: dequantized through
        float32, tied to ``after`` as in :meth:`awq_weight`), its adapter's update included."""
        if self.quantized:
            w = dequantize(self.awq_weight(after=after), jnp.float32)
        else:
            w = self.weight[...]
        if self.lora is not None:
            return (w.astype(jnp.float32) + self.lora.delta()).astype(dtype)
        return w.astype(dtype)

    def folds_into_weight(self) -> bool:
        """Whether ``x @ dense_weight()`` computes this layer: not while its adapter drops its
        input (LoRA dropout in a training step), which only a call sees row by row."""
        return self.lora is None or not self.lora.dropping

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = self._base(x)
        return y if self.lora is None else y + self.lora(x)

    def _base(self, x: jax.Array) -> jax.Array:
        if self.quantized:
            return awq_linear(x, self.awq_weight(after=x)).astype(self.dtype)
        w = self.weight[...].astype(self.dtype)
        if x.dtype != jnp.float32 and w.size * 4 > _CPU_UPCAST_LIMIT and not backend.on_gpu():
            return _dot_in_column_chunks(x, w)
        return rows_dot(x, w)


def rows_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] as one 2-D product over the flattened rows. The same values as
    ``jnp.dot(x, w)``, but the weight gradient contracts a single row axis: XLA's CPU backend
    runs the [B, T, in] form's backward 2.6x slower (bench/train_vs_hf.py, docs/figures.md)."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


# XLA's CPU backend converts a bf16/fp16 dot's weight to float32 first: a full-size temporary
# (800 MiB for V2-Lite's lm_head). Past this many bytes, multiply column chunks in turn.
_CPU_UPCAST_LIMIT = 256 << 20


def _dot_in_column_chunks(x: jax.Array, w: jax.Array) -> jax.Array:
    n = w.shape[1]
    chunk = next((c for c in (8192, 4096, 2048, 1024, 512, 256, 128) if n % c == 0), n)

    def one(i):
        # Tying w to the loop index keeps XLA from hoisting a float32 copy of all of w.
        i, wi = jax.lax.optimization_barrier((i, w))
        return jnp.dot(x, jax.lax.dynamic_slice_in_dim(wi, i * chunk, chunk, axis=1))

    y = jax.lax.map(one, jnp.arange(n // chunk))  # [chunks, ..., chunk]
    return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], n)
