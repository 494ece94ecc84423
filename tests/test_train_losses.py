"""Cross-entropy and the expert-balance loss (docs/training.md#expert-balance-loss) against hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv2_jax import DeepseekV2, DeepseekV2Config, ModelOutput
from dsv2_jax.moe import Routing
from dsv2_jax.training import losses
from dsv2_jax.training.losses import (balance_loss, cross_entropy, expert_load, head_cross_entropy,
                                      total_balance_loss)


def routing(scores, topk_idx) -> Routing:
    scores = jnp.asarray(scores, jnp.float32)
    idx = jnp.asarray(topk_idx, jnp.int32)
    return Routing(scores, idx, jnp.take_along_axis(scores, idx, axis=1))


# Two sequences of two tokens, 4 experts, top-2 (rows are tokens, batch-major).
HAND_SCORES = [
    [0.4, 0.3, 0.2, 0.1],  # seq 0, t 0 -> {0, 1}
    [0.5, 0.1, 0.3, 0.1],  # seq 0, t 1 -> {0, 2}
    [0.1, 0.2, 0.3, 0.4],  # seq 1, t 0 -> {3, 2}
    [0.1, 0.4, 0.1, 0.4],  # seq 1, t 1 -> {1, 3}
]
HAND_IDX = [[0, 1], [0, 2], [3, 2], [1, 3]]
HAND = routing(HAND_SCORES, HAND_IDX)
ALPHA = 0.1


def test_cross_entropy_by_hand():
    logits = jnp.array([[[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [10.0, 0.0, 0.0]]])
    targets = jnp.array([[1, 0, 2]])
    # nll: ln 3 = 1.0986123 (uniform), ln 2 = 0.6931472 (p = 2/4), ln(e^10 + 2) = 10.0000908
    loss, n = cross_entropy(logits, targets, jnp.array([[1, 1, 0]]))
    assert float(n) == 2.0
    assert float(loss) == pytest.approx((1.0986123 + 0.6931472) / 2, rel=1e-6)
    loss, n = cross_entropy(logits, targets, None)
    assert float(n) == 3.0
    assert float(loss) == pytest.approx((1.0986123 + 0.6931472 + 10.0000908) / 3, rel=1e-6)
    loss, n = cross_entropy(logits.astype(jnp.bfloat16), targets, jnp.zeros((1, 3), bool))
    assert float(n) == 0.0 and float(loss) == 0.0 and loss.dtype == jnp.float32
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(logits, targets[:, :2], None)


def _head_reference(x, w, targets, mask):
    """float64 NumPy: mean masked NLL of softmax(x @ w) and its gradients in x and w."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    logits = x @ w
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(w.shape[1])[targets]
    m = mask.astype(np.float64)
    n = max(m.sum(), 1.0)
    loss = -(np.log((p * onehot).sum(-1)) * m).sum() / n
    g = (p - onehot) * m[..., None] / n  # d loss / d logits
    return loss, g @ w.T, np.einsum("bth,btv->hv", x, g)


@pytest.mark.parametrize("chunk", [None, 3])
def test_head_cross_entropy_equals_numpy(monkeypatch, chunk):
    """lm_head fused into the loss: value and both gradients against NumPy, with a loss mask,
    and (chunk 3 over T = 7) chunks that cross rows and a padded last chunk."""
    if chunk:
        monkeypatch.setattr(losses, "head_chunk", lambda *_: chunk)
    rng = np.random.default_rng(0)
    b, t, h, v = 2, 7, 16, 50
    x = rng.standard_normal((b, t, h)).astype(np.float32)
    w = rng.standard_normal((h, v)).astype(np.float32) * 0.3
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.7
    want, want_dx, want_dw = _head_reference(x, w, targets, mask)
    f = lambda x, w: head_cross_entropy(x, w, targets, mask)[0]  # noqa: E731
    loss, (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-7)
    assert float(jax.jit(f)(x, w)) == pytest.approx(want, rel=1e-6)  # no gradient: the plain loop
    # a frozen lm_head (LoRA): the input gradient alone
    dx_only = jax.grad(lambda x: head_cross_entropy(x, jax.lax.stop_gradient(w), targets, mask)[0])(x)
    np.testing.assert_allclose(np.asarray(dx_only), want_dx, rtol=1e-5, atol=1e-7)
    # bfloat16 products (mixed precision): float32 logits, within bf16 rounding
    loss16, n = head_cross_entropy(x, w, targets, mask, compute_dtype=jnp.bfloat16)
    assert float(n) == mask.sum() and loss16.dtype == jnp.float32
    assert float(loss16) == pytest.approx(want, rel=2e-2)
    with pytest.raises(ValueError, match="targets"):
        head_cross_entropy(x, w, targets[:, :3], mask)


def test_balance_loss_by_hand():
    # seq 0: picks e0 twice, e1 once, e2 once -> f = E/(K T) * count = 4/4 * [2,1,1,0];
    #        P = mean of its two score rows = [0.45, 0.2, 0.25, 0.1];
    #        sum f P = 0.9 + 0.2 + 0.25 = 1.35
    # seq 1: counts [0,1,1,2] -> f = [0,1,1,2]; P = [0.1, 0.3, 0.2, 0.4];
    #        sum f P = 0.3 + 0.2 + 0.8 = 1.3
    # loss = alpha * mean(1.35, 1.3) = 0.1 * 1.325
    got = balance_loss(HAND, batch=2, seq_len=2, alpha=ALPHA, n_experts=4, k=2)
    assert float(got) == pytest.approx(0.1325, rel=1e-6)


def test_balance_loss_mask_by_hand():
    # Seq 0's second token is padding: T = 1, counts [1,1,0,0] -> f = 4/(2*1) * counts = [2,2,0,0],
    # P = [0.4, 0.3, 0.2, 0.1], sum f P = 0.8 + 0.6 = 1.4; seq 1 unchanged (1.3). Mean 1.35.
    mask = jnp.array([[1, 0], [1, 1]])
    got = balance_loss(HAND, 2, 2, ALPHA, 4, 2, mask=mask)
    assert float(got) == pytest.approx(0.135, rel=1e-6)
    # A sequence of padding only is left out of the mean rather than counted as 0.
    got = balance_loss(HAND, 2, 2, ALPHA, 4, 2, mask=jnp.array([[1, 1], [0, 0]]))
    assert float(got) == pytest.approx(0.135, rel=1e-6)


def test_balance_loss_per_packed_document_by_hand():
    # One packed row of 4 tokens holding two documents: tokens 0-1 are document 0, 2-3 document 1
    # (the HAND rows, now in one row). Each document is a sequence with its own f, P and T = 2:
    # the two hand values above, 1.35 and 1.3; mean 1.325 -> 0.1325. As one row of T = 4 it
    # would be counts [2,2,2,2] -> f = 1, P sums to 1 -> alpha = 0.1: a different loss.
    one_row = dict(batch=1, seq_len=4, alpha=ALPHA, n_experts=4, k=2)
    got = balance_loss(HAND, **one_row, segments=jnp.array([[0, 0, 1, 1]]))
    assert float(got) == pytest.approx(0.1325, rel=1e-6)
    assert float(balance_loss(HAND, **one_row)) == pytest.approx(0.1, rel=1e-6)
    # Documents of unequal length, with padding: doc 0 = token 0 alone, doc 1 = tokens 1-2,
    # token 3 padding. doc 0: counts [1,1,0,0], T = 1 -> f = [2,2,0,0], P = [0.4,0.3,0.2,0.1],
    #   sum f P = 1.4. doc 1: tokens 1, 2 -> counts [1,0,2,1], f = [1,0,2,1],
    #   P = [0.3, 0.15, 0.3, 0.25], sum f P = 0.3 + 0.6 + 0.25 = 1.15. Mean 1.275.
    got = balance_loss(HAND, **one_row, segments=jnp.array([[0, 1, 1, 2]]),
                       mask=jnp.array([[1, 1, 1, 0]]))
    assert float(got) == pytest.approx(0.1275, rel=1e-6)


def test_batch_level_variant_by_hand():
    # seq_aux=False: one "sequence" of 4 tokens. Counts [2,2,2,2] -> f = 4/(2*4) * 2 = 1 each;
    # P = [0.275, 0.25, 0.225, 0.25] sums to 1, so the loss is alpha.
    got = balance_loss(HAND, 2, 2, ALPHA, 4, 2, seq_aux=False)
    assert float(got) == pytest.approx(ALPHA, rel=1e-6)


def test_perfectly_balanced_router_gives_alpha():
    scores = jnp.full((4, 4), 0.25)
    idx = [[0, 1], [2, 3], [0, 2], [1, 3]]  # each expert twice in the one sequence of 4 tokens
    got = balance_loss(routing(scores, idx), batch=1, seq_len=4, alpha=0.001, n_experts=4, k=2)
    assert float(got) == pytest.approx(0.001, rel=1e-6)


def test_matches_reference_formula_on_random_routing():
    # The reference's seq_aux code, transcribed to NumPy: scatter-add ones per top-k slot,
    # divide by T*K/E, dot with the mean scores, mean over sequences, times alpha.
    rng = np.random.default_rng(0)
    b, t, e, k = 3, 5, 8, 3
    logits = rng.normal(size=(b * t, e))
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.argsort(-scores, axis=-1)[:, :k]
    ce = np.zeros((b, e))
    for i in range(b):
        np.add.at(ce[i], idx.reshape(b, t * k)[i], 1.0)
    ce /= t * k / e
    want = 0.001 * (ce * scores.reshape(b, t, e).mean(1)).sum(1).mean()
    got = balance_loss(routing(scores, idx), b, t, 0.001, e, k)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_gradient_flows_through_scores_only():
    # d loss / d s[b, t, i] = alpha * f[b, i] / (T * B): f is a constant, P carries the gradient.
    grad = jax.grad(lambda s: balance_loss(routing(s, HAND_IDX), 2, 2, ALPHA, 4, 2))(
        jnp.asarray(HAND_SCORES, jnp.float32))
    f = np.array([[2, 1, 1, 0], [2, 1, 1, 0], [0, 1, 1, 2], [0, 1, 1, 2]], np.float32)
    np.testing.assert_allclose(np.asarray(grad), ALPHA * f / 4, rtol=1e-6)


def test_expert_load():
    # counts over the 4 tokens: e0 2, e1 2, e2 2, e3 2 -> 0.5 each (sums to K = 2)
    np.testing.assert_allclose(np.asarray(expert_load(HAND, 4)), [0.5] * 4, rtol=1e-6)
    # first three tokens only: e0 2, e1 1, e2 2, e3 1 -> /3
    got = expert_load(HAND, 4, mask=jnp.array([[1, 1], [1, 0]]))
    np.testing.assert_allclose(np.asarray(got), [2 / 3, 1 / 3, 2 / 3, 1 / 3], rtol=1e-6)


def test_shape_errors_name_the_tensor():
    with pytest.raises(ValueError, match="routing.scores"):
        balance_loss(HAND, 3, 2, ALPHA, 4, 2)
    with pytest.raises(ValueError, match="routing.topk_idx"):
        balance_loss(HAND, 2, 2, ALPHA, 4, 3)
    with pytest.raises(ValueError, match="mask"):
        balance_loss(HAND, 2, 2, ALPHA, 4, 2, mask=jnp.ones((4,)))


def tiny_model(**overrides):
    cfg = DeepseekV2Config.v2_lite(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, **overrides)
    return DeepseekV2(cfg, rngs=nnx.Rngs(0))


def test_total_balance_loss_sums_layers():
    cfg = DeepseekV2Config.v2_lite(aux_loss_alpha=ALPHA, n_routed_experts=4, num_experts_per_tok=2)
    out = ModelOutput(logits=jnp.zeros((2, 2, 8)), routings=(HAND, HAND))
    assert float(total_balance_loss(out, cfg, 2, 2)) == pytest.approx(2 * 0.1325, rel=1e-6)
    assert float(total_balance_loss(out, cfg.replace(aux_loss_alpha=0.0), 2, 2)) == 0.0
    assert float(total_balance_loss(out, cfg.replace(seq_aux=False), 2, 2)) == pytest.approx(
        2 * ALPHA, rel=1e-6)


def test_balance_loss_gradient_reaches_the_router():
    model = tiny_model()
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)

    def loss_fn(m):
        return total_balance_loss(m.forward(ids), m.config, 2, 6)

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)  # jitted: eager takes ~20 s
    assert 0.0 < float(loss)
    layer = grads["layers"][1]["mlp"]  # layer 0 is dense (first_k_dense_replace = 1)
    router = np.asarray(layer["gate"]["weight"][...])
    assert router.shape == (32, 4) and np.abs(router).max() > 0
    # The loss depends on the experts of the last MoE layer and on lm_head not at all.
    assert not np.any(np.asarray(layer["experts_up_proj"]["weight"][...]))
    assert not np.any(np.asarray(grads["lm_head"]["weight"][...]))
