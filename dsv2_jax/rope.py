"""Rotary position embedding with DeepSeek's YaRN scaling (docs/model.md#rope-and-yarn).

Pure functions: the inverse frequencies are computed once on the host in float64
(then float32, as the reference does), cos/sin per position inside the jitted step.
RoPE rotates *adjacent* pairs (2i, 2i+1) of the rope part, as HF's complex multiply does.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import DeepseekV2Config, yarn_get_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(cfg: DeepseekV2Config) -> tuple[np.ndarray, float]:
    """Returns (inverse frequencies [d/2] float32, cos/sin multiplier)."""
    d = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float32) / d)
    inv_extra = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_extra.astype(np.float32), 1.0
    inv_inter = 1.0 / (rs.factor * pos_freqs)
    low = math.floor(_yarn_correction_dim(rs.beta_fast, d, base, rs.original_max_position_embeddings))
    high = math.ceil(_yarn_correction_dim(rs.beta_slow, d, base, rs.original_max_position_embeddings))
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 below `low`: keep the original frequency there
    inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    if rs.mscale_all_dim:
        mscale = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    else:
        mscale = yarn_get_mscale(rs.factor, rs.mscale)
    return inv.astype(np.float32), float(mscale)


def cos_sin(cfg: DeepseekV2Config, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables for integer positions [..., T] -> two arrays [..., T, d/2] float32."""
    inv, mscale = inv_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    return jnp.cos(freqs) * mscale, jnp.sin(freqs) * mscale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate adjacent pairs of x [B, T, (heads,) d] by cos/sin [B, T, d/2].

    Computed in float32 and cast back to x's dtype, as the reference does.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)  # [..., d/2, 2]
    if x.ndim == cos.ndim + 1:  # x has a heads axis
        cos, sin = cos[..., None, :], sin[..., None, :]
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(dtype)
