"""The optimizer of docs/training.md: global-norm clipping, then AdamW with a weight-decay mask.

Example::

    from flax import nnx
    tx = make_optimizer(lr_schedule(4.2e-4, 2000, 10_000))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from ..sharding import path_names as _path_names


def decay_mask(params: Any) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies.

    Decayed: every tensor with ndim >= 2 (linear and expert weights, the router weight,
    embed_tokens, lm_head). Not decayed: tensors with ndim < 2 (RMSNorm scales, biases) and
    anything whose path names a norm (``input_layernorm``, ``kv_a_layernorm``, ``norm``...),
    which still catches norm scales if layers are ever stacked for a scan ([L, H]). Norm scales
    multiply a unit-RMS activation: decaying them towards 0 shrinks every activation instead
    of regularising a linear map, and they are too few to overfit (the convention of GPT-2,
    Megatron and the DeepSeek reference trainers). Works on an ``nnx.State`` or any pytree.
    """
    def leaf(path, x) -> bool:
        if getattr(x, "ndim", 0) < 2:
            return False
        return not any("norm" in name.lower() for name in _path_names(path))

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(schedule: optax.Schedule | float, b1: float = 0.9, b2: float = 0.95,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0, eps: float = 1e-8,
                   mask: Callable[[Any], Any] | None = decay_mask) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then ``adamw(schedule, b1, b2, eps, weight_decay, mask)``.

    The update of a parameter p with clipped gradient g at step s (optax's count) is
    ``-lr(s) * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)`` where decay applies only
    where ``mask(params)`` is true (decoupled decay, scaled by the LR as in PyTorch's AdamW).
    ``clip_norm=None`` disables clipping.
    """
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm={clip_norm!r}: expected a positive number or None")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r}: expected >= 0")
    for name, b in (("b1", b1), ("b2", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}={b!r}: expected a number in [0, 1)")
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
