"""The train step: remat forward = model.forward, document masking, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv2_jax import DeepseekV2, DeepseekV2Config
from dsv2_jax.training import cross_entropy, total_balance_loss
from dsv2_jax.training.step import attention_mask, init_state, make_train_step, train_forward
from dsv2_jax.training.testing import TINY_MODEL

CFG = DeepseekV2Config.v2_lite(**TINY_MODEL)


@pytest.fixture(scope="module")
def model():
    return DeepseekV2(CFG, rngs=nnx.Rngs(0))


def ids_batch(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def jitted(model, fn):
    """fn(model, *arrays) compiled once (eager NNX calls are slow on this CPU)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: f(state, *args)


def test_train_forward_matches_model_forward(model):
    def both(m, ids):
        ref = m.forward(ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        out = train_forward(m, ids, pos, attention_mask(jnp.zeros(ids.shape, jnp.int32)), "full")
        return ref.logits, out.logits, ref.routings[0].topk_idx, out.routings[0].topk_idx

    ref, out, ref_idx, out_idx = jitted(model, both)(ids_batch(2, 12))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_idx), np.asarray(ref_idx))


def test_packed_documents_do_not_see_each_other(model):
    a, b = ids_batch(1, 7, seed=1), ids_batch(1, 9, seed=2)
    row = jnp.concatenate([a, b], axis=1)  # [1, 16]: two documents packed
    segments = jnp.array([[0] * 7 + [1] * 9])
    positions = jnp.array([list(range(7)) + list(range(9))])

    def run(m, a, b, row, segments, positions):
        packed = train_forward(m, row, positions, attention_mask(segments)).logits
        leaky = train_forward(m, row, positions, attention_mask(segments, False)).logits
        return packed, leaky, m(a), m(b)  # each document alone, through the model's own forward

    packed, leaky, alone_a, alone_b = jitted(model, run)(a, b, row, segments, positions)
    np.testing.assert_allclose(np.asarray(packed[:, 7:]), np.asarray(alone_b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[:, :7]), np.asarray(alone_a), atol=1e-5)
    # without the document mask the second document does see the first
    assert np.abs(np.asarray(leaky[:, 7:]) - np.asarray(alone_b)).max() > 1e-3


def _batch(ids, accum):
    b, t1 = ids.shape
    t = t1 - 1
    host = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": jnp.ones((b, t), bool).at[0, :3].set(False),  # unequal token counts
            "segments": jnp.zeros((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}
    return {k: v.reshape(accum, b // accum, t) for k, v in host.items()}


def _run(model, batch, remat="none", nan_at_step=None, steps=1):
    """Steps of plain SGD with lr 1; returns the first step's gradient (minus the parameter
    change) and every step's metrics."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.constant_schedule(1.0)
    tx = optax.sgd(schedule)
    state = init_state(params, tx, 0)
    step = jax.jit(make_train_step(graphdef, rest, tx, schedule, CFG, remat=remat,
                                   nan_at_step=nan_at_step))
    out = []
    for i in range(steps):
        state, m = step(state, batch)
        out.append(m)
        if i == 0:  # the first step's gradient
            grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, state.params)
    return grads, out


IDS = ids_batch(4, 9, seed=3)  # 4 x 8 tokens: few enough (token, expert) pairs to compile fast


@pytest.fixture(scope="module")
def one_batch(model):
    return _run(model, _batch(IDS, 1))


def test_loss_is_ce_plus_balance(model, one_batch):
    _, (m1,) = one_batch
    # the loss by hand from model.forward: token-mean CE over the batch + per-sequence balance
    def by_hand(m, ids, mask):
        out = m.forward(ids[:, :-1])
        ce, n = cross_entropy(out.logits, ids[:, 1:], mask)
        return ce, n, total_balance_loss(out, CFG, 4, 8)

    ce, n, bal = jitted(model, by_hand)(IDS, _batch(IDS, 1)["loss_mask"][0])
    assert float(m1["tokens"]) == float(n) == 4 * 8 - 3
    np.testing.assert_allclose(float(m1["ce"]), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(m1["balance_loss"]), float(bal), rtol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), float(ce + bal), rtol=1e-6)
    load = np.asarray(m1["expert_load"])
    assert load.shape == (1, CFG.n_routed_experts)
    np.testing.assert_allclose(load.sum(-1), CFG.num_experts_per_tok, rtol=1e-6)


def test_micro_batches_and_remat_give_the_same_gradient(model, one_batch):
    """Two micro-batches of two sequences, each layer rematerialised, against one batch of
    four without remat: same loss, same summed gradient; and the injected NaN hits step 2 only."""
    g1, (m1,) = one_batch
    g2, ms = _run(model, _batch(IDS, 2), remat="full", nan_at_step=2, steps=2)
    m2 = ms[0]
    for k in ("loss", "ce", "balance_loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=2e-6, err_msg=k)
    assert np.isnan(float(ms[1]["loss"])) and np.isnan(float(ms[1]["grad_norm"]))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, atol=1e-7)
