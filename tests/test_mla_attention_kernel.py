"""The Pallas MLA flash-attention kernel (dsv2_jax.kernels.mla_attention), run interpreted on the
CPU: forward against a NumPy softmax, gradients of all five inputs against autodiff of a dense
jnp softmax, at MLA's head sizes (nope 128, rope 64 shared by the heads, v 128)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.kernels.mla_attention import mla_attention
from test_attention import numpy_attention, segments_of

SCALE = 0.07


def _inputs(t, b=2, nh=2, dn=128, dr=64, dv=128, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32)
              for s in ((b, t, nh, dn), (b, t, nh, dr), (b, t, nh, dn), (b, t, dr), (b, t, nh, dv))]
    return arrays, segments_of(t, rng, b)


def _dense(q_nope, q_pe, k_nope, k_pe, v, segments):
    t = q_nope.shape[1]
    s = jnp.einsum("btnd,bsnd->bnts", q_nope, k_nope) + jnp.einsum("btnd,bsd->bnts", q_pe, k_pe)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    p = jax.nn.softmax(jnp.where(allowed[:, None], s * SCALE, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("t, block_q, block_k", [(1, 16, 16), (100, 32, 16), (128, 16, 32)])
def test_forward_equals_numpy(t, block_q, block_k):
    arrays, segments = _inputs(t, seed=t)
    got = mla_attention(*map(jnp.asarray, arrays), jnp.asarray(segments), scale=SCALE, block_q=block_q,
                        block_k=block_k, interpret=True)
    want = numpy_attention(*arrays, segments, SCALE)
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


@pytest.mark.parametrize("t, block_q, block_k", [(100, 32, 16), (64, 16, 32)])
def test_gradients_equal_autodiff_of_the_dense_softmax(t, block_q, block_k):
    """dq_nope, dq_pe, dk_nope, dk_pe (summed over the heads that share it) and dv; T = 100 is
    padded inside to a multiple of the blocks."""
    arrays, segments = _inputs(t, seed=7)
    args = [jnp.asarray(a) for a in arrays]
    seg = jnp.asarray(segments)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(arrays[4].shape).astype(np.float32))

    def kernel_loss(*a):
        return jnp.sum(mla_attention(*a, seg, scale=SCALE, block_q=block_q, block_k=block_k,
                                     interpret=True) * cot)

    def dense_loss(*a):
        return jnp.sum(_dense(*a, seg) * cot)

    got = jax.grad(kernel_loss, argnums=range(5))(*args)
    want = jax.grad(dense_loss, argnums=range(5))(*args)
    for name, g, w in zip(["q_nope", "q_pe", "k_nope", "k_pe", "v"], got, want):
        err = float(jnp.abs(g - w).max() / jnp.abs(w).max())
        assert err <= 1e-5, f"d{name}: {err}"


def test_bf16_forward_close_to_float32():
    arrays, segments = _inputs(96, seed=3)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in arrays]
    got = mla_attention(*bf, jnp.asarray(segments), scale=SCALE, block_q=32, block_k=32, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = numpy_attention(*[np.asarray(a.astype(jnp.float32)) for a in bf], segments, SCALE)
    assert np.abs(np.asarray(got, np.float32) - want).max() <= 2 ** -6 * np.abs(want).max()


def test_bad_shapes_and_blocks_are_named():
    arrays, segments = _inputs(32)
    args = [jnp.asarray(a) for a in arrays]
    with pytest.raises(ValueError, match="k_pe"):
        mla_attention(*args[:3], args[3][:, :16], args[4], jnp.asarray(segments), scale=SCALE, interpret=True)
    with pytest.raises(ValueError, match="block_q=24"):
        mla_attention(*args, jnp.asarray(segments), scale=SCALE, block_q=24, interpret=True)


def test_partial_results_over_key_slices_merge_to_numpy():
    """A prefill chunk's form: 40 queries at slots 90..129 of two left-padded rows against 160
    cache slots, given to the kernel as two key slices (positions 0.. and 96..), merged by
    log-sum-exp: equal to NumPy's softmax over the dense causal + padding mask."""
    from dsv2_jax.kernels.mla_attention import merge_partials, mla_attention_partial

    rng = np.random.default_rng(5)
    b, t, s, nh, start, pad = 2, 40, 160, 2, 90, np.array([0, 13])
    qn, qp = (rng.standard_normal((b, t, nh, d)).astype(np.float32) for d in (128, 64))
    kn, v = (rng.standard_normal((b, s, nh, 128)).astype(np.float32) for _ in range(2))
    kp = rng.standard_normal((b, s, 64)).astype(np.float32)
    q_slot = start + np.arange(t)
    k_seg = np.where(np.arange(s)[None] >= pad[:, None], 0, -1).astype(np.int32)  # padding: no query's
    q_seg = np.zeros((b, t), np.int32)
    total = (jnp.zeros((b, t, nh, 128)), jnp.full((b, nh, t), -jnp.inf))
    for lo, hi in ((0, 96), (96, s)):
        part = mla_attention_partial(*(jnp.asarray(a) for a in (qn, qp, kn[:, lo:hi], kp[:, lo:hi], v[:, lo:hi])),
                                     jnp.asarray(q_slot), lo, jnp.asarray(q_seg), jnp.asarray(k_seg[:, lo:hi]),
                                     scale=SCALE, block_q=16, block_k=32, interpret=True)
        total = merge_partials(total, part)
    scores = np.einsum("btnd,bsnd->bnts", qn, kn) + np.einsum("btnd,bsd->bnts", qp, kp)
    allowed = (np.arange(s)[None, None] <= q_slot[None, :, None]) & (np.arange(s)[None, None] >= pad[:, None, None])
    scores = np.where(allowed[:, None], scores * SCALE, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v)
    assert np.abs(np.asarray(total[0]) - want).max() <= 1e-5
