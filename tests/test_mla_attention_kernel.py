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
