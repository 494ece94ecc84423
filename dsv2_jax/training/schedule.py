"""The DeepSeek-V2 LR schedule: linear warm-up, constant, two step decays (docs/training.md).

Step convention (the one optax uses): ``lr(s)`` is the learning rate of update number ``s``
(0-based), the update applied after ``s`` earlier updates; it is computed from the tokens
consumed *before* that update, i.e. by steps ``0 .. s-1``. A decay point ``p`` therefore
applies from the first step ``s`` for which ``consumed(s) >= p * total_tokens``. With a constant
batch that is ``s = ceil(p * total_steps)``: for 10,000 steps, steps 0..7999 run at the peak,
8000..8999 at ``0.316 * peak`` and 9000..9999 at ``0.316**2 * peak``.

Example::

    schedule = lr_schedule(4.2e-4, warmup_steps=2000, total_steps=10_000)
    schedule(0), schedule(1000), schedule(8000)   # 0.0, 2.1e-4, 1.3272e-4
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jax.Array | int], jax.Array]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def decay_steps(total_steps: int, tokens_per_step: int | Sequence[int] | None = None,
                decay_points: Sequence[float] = (0.8, 0.9)) -> tuple[int, ...]:
    """The first step that runs after each decay point (see the module docstring).

    ``tokens_per_step`` is ``None`` or an int (a constant batch: the boundaries are then
    ``ceil(p * total_steps)``) or one token count per step (a batch-size ramp). The points are
    compared exactly as written in decimal (``0.8`` means 4/5), so no float rounding moves a
    boundary by one step. A boundary equal to ``total_steps`` never applies within the run.
    """
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r}: expected a positive integer")
    points = tuple(decay_points)
    for p in points:
        if not isinstance(p, numbers.Real) or not 0.0 < float(p) < 1.0:
            raise ValueError(f"decay_points={points!r}: each point must be a fraction in (0, 1)")
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"decay_points={points!r}: expected strictly increasing fractions")

    if tokens_per_step is None:
        tokens_per_step = 1
    if _is_int(tokens_per_step) or isinstance(tokens_per_step, np.integer):
        if tokens_per_step <= 0:
            raise ValueError(f"tokens_per_step={tokens_per_step!r}: expected a positive integer")
        per_step = np.full((total_steps,), int(tokens_per_step), np.int64)
    else:
        per_step = np.asarray(tokens_per_step)
        if per_step.shape != (total_steps,) or not np.issubdtype(per_step.dtype, np.integer):
            raise ValueError(
                f"tokens_per_step: expected None, a positive int, or {total_steps} integer token "
                f"counts (one per step); got dtype {per_step.dtype} and shape {per_step.shape}")
        if (per_step <= 0).any():
            raise ValueError("tokens_per_step: every step's token count must be positive")
        per_step = per_step.astype(np.int64)
    consumed = np.concatenate([[0], np.cumsum(per_step)])  # consumed[s]: tokens before step s
    total = int(consumed[-1])
    out = []
    for p in points:
        frac = Fraction(str(float(p)))
        threshold = math.ceil(frac * total)  # consumed is integral: >= p*total iff >= ceil
        out.append(int(np.searchsorted(consumed, threshold, side="left")))
    return tuple(out)


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                tokens_per_step: int | Sequence[int] | None = None,
                decay_points: Sequence[float] = (0.8, 0.9),
                decay_factor: float = 0.316) -> Schedule:
    """An optax schedule ``step -> lr`` (float32) for the DeepSeek-V2 recipe.

    ``lr(s) = peak_lr * min(s, warmup_steps) / warmup_steps`` (so ``lr(0) = 0`` and
    ``lr(warmup_steps) = peak_lr``), times ``decay_factor`` once per decay point already passed
    (boundaries from :func:`decay_steps`). Steps past ``total_steps`` keep the final rate.
    Raises ``ValueError`` naming the argument for a bad value, including a warm-up that does
    not end before the first decay.
    """
    if not isinstance(peak_lr, numbers.Real) or not math.isfinite(peak_lr) or peak_lr <= 0:
        raise ValueError(f"peak_lr={peak_lr!r}: expected a positive finite number")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r}: expected an integer >= 0")
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r}: expected a positive integer")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} is longer than the run (total_steps={total_steps})")
    if not isinstance(decay_factor, numbers.Real) or not 0.0 < decay_factor <= 1.0:
        raise ValueError(f"decay_factor={decay_factor!r}: expected a number in (0, 1]")
    boundaries = decay_steps(total_steps, tokens_per_step, decay_points)
    if boundaries and warmup_steps > boundaries[0]:
        raise ValueError(
            f"warmup_steps={warmup_steps} ends after the first decay at step {boundaries[0]} "
            f"({decay_points[0]} of the tokens of total_steps={total_steps})")

    peak, warm, factor = float(peak_lr), int(warmup_steps), float(decay_factor)

    def schedule(step):
        step = jnp.maximum(jnp.asarray(step), 0)
        lr = jnp.full(step.shape, peak, jnp.float32)
        if warm:
            lr = lr * (jnp.minimum(step, warm).astype(jnp.float32) / warm)
        for b in boundaries:
            lr = jnp.where(step >= b, lr * factor, lr)
        return lr

    return schedule
