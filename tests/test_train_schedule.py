"""LR schedule against hand-computed values (docs/training.md: peak 4.2e-4, warm-up 2000)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv2_jax.training.schedule import decay_steps, lr_schedule

PEAK = 4.2e-4

# (step, lr) for peak 4.2e-4, warm-up 2000, 10,000 steps, decays at 80% and 90% of tokens.
# Step s is the (s+1)-th update and has consumed the tokens of s earlier steps, so the first
# decayed step is 8000 (8000 of 10000 steps' tokens consumed) and the second is 9000.
HAND = [
    (0, 0.0),
    (1, 2.1e-7),                # 4.2e-4 * 1/2000
    (1000, 2.1e-4),             # half way through warm-up
    (1999, 4.1979e-4),          # 4.2e-4 * 1999/2000
    (2000, 4.2e-4),             # peak reached
    (2001, 4.2e-4),
    (7999, 4.2e-4),             # 7999 steps' tokens consumed: 79.99%
    (8000, 1.3272e-4),          # 4.2e-4 * 0.316
    (8999, 1.3272e-4),
    (9000, 4.193952e-5),        # 4.2e-4 * 0.316**2 = 4.2e-4 * 0.099856
    (9999, 4.193952e-5),        # last step
    (12000, 4.193952e-5),       # past the end: stays at the final rate
]


@pytest.mark.parametrize("step,want", HAND)
def test_hand_values(step, want):
    schedule = lr_schedule(PEAK, warmup_steps=2000, total_steps=10_000)
    got = float(schedule(step))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_jit_vectorised_and_constant_tokens_per_step_agree():
    plain = lr_schedule(PEAK, 2000, 10_000)
    # The recipe's batch (4608 sequences x 4K tokens) changes nothing with a constant batch.
    tokens = lr_schedule(PEAK, 2000, 10_000, tokens_per_step=4608 * 4096)
    steps = jnp.array([s for s, _ in HAND], jnp.int32)
    want = np.array([w for _, w in HAND], np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(plain)(steps)), want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(tokens(steps)), want, rtol=1e-6, atol=1e-12)
    assert plain(steps).dtype == jnp.float32


def test_inside_optax_the_count_indexes_the_schedule():
    # optax calls the schedule with the number of updates already applied: 0 for the first.
    tx = optax.sgd(lr_schedule(1.0, warmup_steps=4, total_steps=10))
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    seen = []
    for _ in range(10):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        seen.append(-float(updates["w"]))
    # warm-up 0, .25, .5, .75, then 1; decays at ceil(.8*10) = 8 and ceil(.9*10) = 9
    np.testing.assert_allclose(seen, [0, .25, .5, .75, 1, 1, 1, 1, .316, .316 ** 2], rtol=1e-6)


def test_decay_boundaries():
    assert decay_steps(10_000) == (8000, 9000)
    assert decay_steps(15) == (12, 14)  # 0.9 * 15 = 13.5 steps' tokens: step 14 is the first after
    # 0.07 * 100 is 7.000000000000001 in floats; the boundary is still step 7, not 8.
    assert decay_steps(100, decay_points=(0.07,)) == (7,)
    # A batch ramp: tokens consumed before step s are 0,4,8,10,12,14,16,17,18,19 (20 in all).
    ramp = [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    # 16 tokens (80% of 20) are first consumed before step 6, 18 (90%) before step 8.
    assert decay_steps(10, ramp) == (6, 8)
    schedule = lr_schedule(1.0, 0, 10, tokens_per_step=ramp)
    got = np.asarray(schedule(jnp.arange(10)))
    np.testing.assert_allclose(got, [1] * 6 + [.316] * 2 + [.316 ** 2] * 2, rtol=1e-6)


def test_no_warmup_starts_at_peak():
    assert float(lr_schedule(PEAK, 0, 100)(0)) == pytest.approx(PEAK, rel=1e-6)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(warmup_steps=20_000), "warmup_steps"),                 # longer than the run
    (dict(warmup_steps=9000), "warmup_steps"),                   # ends after the 80% decay
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=100.0), "total_steps"),
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(decay_points=(0.9, 0.8)), "decay_points"),
    (dict(decay_points=(0.8, 1.0)), "decay_points"),
    (dict(decay_factor=0.0), "decay_factor"),
    (dict(decay_factor=3.16), "decay_factor"),
    (dict(tokens_per_step=0), "tokens_per_step"),
    (dict(tokens_per_step=[4096] * 3), "tokens_per_step"),      # not one count per step
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    args = dict(peak_lr=PEAK, warmup_steps=2000, total_steps=10_000)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        lr_schedule(**args)
