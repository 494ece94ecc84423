"""AWQ's two searches, as AutoAWQ defines them (docs/awq.md#the-awq-quantizer).

All weights here are in the model's layout, ``[..., in, out]`` (hub tensors are ``[out, in]``),
and every function is pure JAX so it runs jitted, on CPU or GPU.

- **Scale search** (:func:`search_scale`). Linears that share an input ``x`` are scaled
  together: each weight's input rows are multiplied by ``s`` and ``x`` divided by it (folded
  into the op that produces ``x``), which leaves the float model unchanged but moves
  quantization error away from the input channels that carry large activations. Candidates
  are AutoAWQ's "duo" scales ``s = x_mean^α / w_mean^(1-α)`` on the grid ``α = i / 20``,
  ``i = 0 … 19``, normalised so ``max(s) · min(s) = 1``; ``x_mean`` is the mean ``|x|`` per input
  channel over the calibration tokens, ``w_mean`` the mean over every output column of ``|W|``
  divided by the maximum of its quantization group. Each candidate is judged by the mean
  squared error of the block's output with the group's weights quantized (``Q(W·s)/s``)
  against the unquantized output; the caller supplies that loss.
- **Clip search** (:func:`search_clip`). Per output column and quantization group, the
  weights are clamped to ``±max·(1 − i/20)``, ``i = 0 … 9``, and the clamp whose quantized
  partial products ``Σ_k x_k W_kn`` over the group's ``k`` best match the unclamped ones on
  (up to 512 subsampled) calibration tokens is kept.

Quantization is :func:`fake_quantize`: exactly what ``awq.quantize_rtn`` stores (range
widened to include 0, scale rounded up to float16), so the searches judge the weights that
are written.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

N_GRID = 20  # α = i / N_GRID, i = 0 … N_GRID - 1; clip shrink = i / N_GRID
MAX_SHRINK = 0.5  # clip candidates shrink the max by up to (not including) half
CLIP_TOKENS = 512  # calibration tokens the clip search subsamples to (AutoAWQ's n_sample_token)


@functools.partial(jax.jit, static_argnames=("group_size", "bits"))
def fake_quantize(w: jax.Array, group_size: int, bits: int = 4) -> jax.Array:
    """Quantize and dequantize ``w [..., in, out]`` per group of ``group_size`` input rows and
    per output column: asymmetric round-to-nearest to ``bits`` bits, float32 result.

    For ``bits = 4`` this is ``dequantize(quantize_rtn(w))`` (docs/awq.md#the-awq-quantizer).
    """
    w = jnp.asarray(w, jnp.float32)
    *lead, n_in, n_out = w.shape
    if n_in % group_size:
        raise ValueError(f"fake_quantize: in = {n_in} is not a multiple of group_size {group_size}")
    qmax = float(2 ** bits - 1)
    g = w.reshape(*lead, n_in // group_size, group_size, n_out)
    lo = jnp.minimum(g.min(axis=-2), 0.0)
    hi = jnp.maximum(g.max(axis=-2), 0.0)
    s32 = jnp.maximum((hi - lo) / qmax, 1e-5)
    s16 = s32.astype(jnp.float16)
    s16 = jnp.where(s16.astype(jnp.float32) < s32, jnp.nextafter(s16, jnp.float16(jnp.inf)), s16)
    s = s16.astype(jnp.float32)[..., None, :]
    z = jnp.clip(jnp.round(-lo / s16.astype(jnp.float32)), 0.0, qmax)[..., None, :]
    q = jnp.clip(jnp.round(g / s) + z, 0.0, qmax)
    return ((q - z) * s).reshape(w.shape)


def scaled_fake_quantize(w: jax.Array, scales: jax.Array, group_size: int, bits: int = 4) -> jax.Array:
    """``Q(w · s) / s`` with ``s`` over the input rows: the weight as the scaled, quantized model
    applies it to the unscaled input."""
    s = scales.astype(jnp.float32)[:, None]
    return fake_quantize(w * s, group_size, bits) / s


def activation_mean(x) -> np.ndarray:
    """Mean ``|x|`` per input channel over every token: ``x [..., in]`` -> ``[in]`` float32
    (NumPy: host statistics, no compile per shape)."""
    x = np.asarray(x, np.float32)
    return np.mean(np.abs(x.reshape(-1, x.shape[-1])), axis=0, dtype=np.float64).astype(np.float32)


def weight_mean(weights, group_size: int) -> np.ndarray:
    """Per input channel, the mean over every output column of every weight in the group
    (``[..., in, out]`` each, stacks of experts too) of ``|W|`` divided by its group's max."""
    total, count = 0.0, 0
    for w in weights:
        w = np.abs(np.asarray(w, np.float32))
        *lead, n_in, n_out = w.shape
        g = w.reshape(*lead, n_in // group_size, group_size, n_out)
        g = g / (g.max(axis=-2, keepdims=True) + 1e-6)
        total = total + g.reshape(-1, n_in, n_out).sum(axis=(0, 2), dtype=np.float64)
        count += int(np.prod(lead, dtype=np.int64)) * n_out
    return (total / count).astype(np.float32)


@functools.partial(jax.jit, static_argnames="duo")
def candidate_scales(x_mean: jax.Array, w_mean: jax.Array, alpha: float, duo: bool = True) -> jax.Array:
    """The candidate for one ``α``, normalised to ``max · min = 1``: AutoAWQ's duo scaling
    ``x_mean^α / w_mean^(1-α)``, or (``duo=False``) activations alone, ``x_mean^α``."""
    if duo:
        s = jnp.maximum(x_mean ** alpha / (w_mean ** (1.0 - alpha) + 1e-4), 1e-4)
    else:
        s = jnp.maximum(x_mean ** alpha, 1e-4)
    s = s / jnp.sqrt(s.max() * s.min())
    return jnp.where(jnp.isfinite(s), s, 1.0)


DUO_SCALING = (True, False, "both")


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The result of one group's scale search."""

    alpha: float  # the chosen grid point
    scales: np.ndarray  # [in] float32
    losses: tuple[float, ...]  # the loss at every grid point, in order


def search_scale(x_mean, w_mean, loss: Callable[[jax.Array], jax.Array],
                 n_grid: int = N_GRID, duo_scaling: bool | str = True) -> ScaleSearch:
    """Try ``α = i / n_grid`` for ``i < n_grid``; keep the first least ``loss(scales)``.

    ``loss`` maps a candidate scale vector ``[in]`` to the group's output error (a scalar):
    typically a jitted function that applies :func:`scaled_fake_quantize` to the group's
    weights and compares the block's output with the unquantized one. ``duo_scaling`` as
    llm-compressor's AWQ: True (AutoAWQ's candidates), False (activations alone), or "both"
    (both grids, 2 · n_grid candidates; the activations-alone grid starts with ``s = 1``,
    plain rounding, so the search never picks worse than RTN on its own loss).
    """
    if duo_scaling not in DUO_SCALING:
        raise ValueError(f"duo_scaling = {duo_scaling!r}: expected one of {DUO_SCALING}")
    kinds = [True, False] if duo_scaling == "both" else [duo_scaling]
    best, losses = None, []
    for duo in kinds:
        for i in range(n_grid):
            alpha = i / n_grid
            s = candidate_scales(x_mean, w_mean, alpha, duo)
            value = float(loss(s))
            losses.append(value)
            if best is None or value < best[0]:
                best = (value, alpha, s)
    if best is None or not np.isfinite(best[0]):
        raise FloatingPointError(f"AWQ scale search: no finite loss on the grid ({losses})")
    return ScaleSearch(best[1], np.asarray(best[2], np.float32), tuple(losses))


def subsample_tokens(x: np.ndarray, n_tokens: int = CLIP_TOKENS) -> np.ndarray:
    """Every ``max(1, N // n_tokens)``-th row of ``x [N, in]`` (AutoAWQ's subsampling)."""
    x = np.asarray(x).reshape(-1, np.shape(x)[-1])
    return x[:: max(1, x.shape[0] // n_tokens)]


@functools.partial(jax.jit, static_argnames=("group_size", "bits", "n_grid", "max_shrink"))
def _clip_max(w, x, valid, group_size, bits, n_grid, max_shrink):
    n_in, n_out = w.shape
    n_groups = n_in // group_size
    xg = x.reshape(-1, n_groups, group_size)  # [N, G#, G]
    weight = valid.astype(jnp.float32) / jnp.maximum(valid.sum(), 1)  # mean over real tokens
    # Column blocks bound the [N, G#, block] partial products held at once.
    block = next(b for b in (256, 128, 64, 32, 16, 8, n_out) if n_out % b == 0)

    def one_block(wb):  # [in, block]
        g = wb.reshape(n_groups, group_size, -1)
        org_max = jnp.abs(g).max(axis=1)  # [G#, block]
        org = jnp.einsum("ngk,gkb->ngb", xg, g, precision=jax.lax.Precision.HIGHEST)
        best_err = jnp.full(org_max.shape, jnp.inf)
        best_max = org_max
        for i in range(int(max_shrink * n_grid)):
            m = org_max * (1.0 - i / n_grid)
            clamped = jnp.clip(g, -m[:, None], m[:, None]).reshape(n_in, -1)
            q = fake_quantize(clamped, group_size, bits).reshape(g.shape)
            out = jnp.einsum("ngk,gkb->ngb", xg, q, precision=jax.lax.Precision.HIGHEST)
            err = jnp.einsum("n,ngb->gb", weight, (out - org) ** 2)
            better = err < best_err
            best_err = jnp.where(better, err, best_err)
            best_max = jnp.where(better, m, best_max)
        return best_max

    blocks = w.reshape(n_in, n_out // block, block).transpose(1, 0, 2)
    best = jax.lax.map(one_block, blocks)  # [n_blocks, G#, block]
    return best.transpose(1, 0, 2).reshape(n_groups, n_out)


def search_clip(w, x, group_size: int, bits: int = 4, *, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK, n_tokens: int = CLIP_TOKENS) -> np.ndarray:
    """The clip threshold per quantization group and output column, ``[in/G, out]``.

    ``w [in, out]`` (already scaled) and ``x [N, in]``, its calibration inputs (already divided
    by the scale). Tokens are subsampled as AutoAWQ does and padded to ``2 · n_tokens`` rows (one
    compiled search serves every expert); padding rows carry no weight in the error.
    Clamp with :func:`apply_clip`.
    """
    x = subsample_tokens(x, n_tokens)
    n = x.shape[0]
    if n == 0:
        raise ValueError("search_clip: no calibration tokens")
    pad = max(2 * n_tokens, 1 << (n - 1).bit_length())  # subsampling leaves < 2 · n_tokens rows
    xp = np.zeros((pad, x.shape[1]), np.float32)
    xp[:n] = x
    valid = np.arange(pad) < n
    out = _clip_max(jnp.asarray(w, jnp.float32), jnp.asarray(xp), jnp.asarray(valid),
                    group_size=group_size, bits=bits, n_grid=n_grid, max_shrink=max_shrink)
    return np.asarray(out)


def apply_clip(w: np.ndarray, max_val: np.ndarray, group_size: int) -> np.ndarray:
    """Clamp ``w [in, out]`` to ``±max_val [in/G, out]`` group by group (NumPy)."""
    m = np.repeat(np.asarray(max_val, np.float32), group_size, axis=0)
    return np.clip(np.asarray(w, np.float32), -m, m)
