"""Training pieces as pure functions: LR schedule, losses, optimizer (docs/training.md).

Example::

    from dsv2_jax.training import lr_schedule, make_optimizer, cross_entropy, total_balance_loss

    schedule = lr_schedule(4.2e-4, warmup_steps=2000, total_steps=10_000)
    tx = make_optimizer(schedule)           # clip 1.0, AdamW(0.9, 0.95), weight decay 0.1
"""

from .losses import balance_loss, cross_entropy, expert_load, total_balance_loss
from .optim import decay_mask, make_optimizer
from .schedule import decay_steps, lr_schedule

__all__ = [
    "balance_loss", "cross_entropy", "decay_mask", "decay_steps", "expert_load",
    "lr_schedule", "make_optimizer", "total_balance_loss",
]
