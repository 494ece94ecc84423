"""The AWQ GEMM format (dsv2_jax/quant/awq.py) against a decoder written here from docs/awq.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.quant import awq
from dsv2_jax.quant.awq import AWQWeight

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of word j holds column 8j + ORDER[i]


def decode_slow(words: np.ndarray) -> np.ndarray:
    """Element by element, straight from the format description."""
    words = np.asarray(words, np.int64)
    rows, cols = words.shape
    out = np.zeros((rows, cols * 8), np.int64)
    for r in range(rows):
        for j in range(cols):
            u = int(words[r, j]) & 0xFFFFFFFF  # the int32 word read as unsigned
            for i in range(8):
                out[r, 8 * j + ORDER[i]] = (u >> (4 * i)) & 0xF
    return out


def random_words(rng, shape):
    w = rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)
    w.flat[:3] = [-1, np.iinfo(np.int32).min, 0x76543210]  # sign bit set / a known pattern
    return w


def test_unpack_known_words():
    got = awq.unpack_int4(np.array([[0x76543210, np.int32(-(2**31))]], np.int32))
    # nibble i holds value i, so column ORDER[i] reads i; 0x80000000 sets only nibble 7 (column 7) to 8
    np.testing.assert_array_equal(got[0, :8], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(got[0, 8:], [0, 0, 0, 0, 0, 0, 0, 8])


def test_unpack_matches_slow_decoder_numpy_and_jnp():
    words = random_words(np.random.default_rng(0), (5, 7))
    want = decode_slow(words)
    np.testing.assert_array_equal(awq.unpack_int4(words), want)
    np.testing.assert_array_equal(np.asarray(awq.unpack_int4_jnp(jnp.asarray(words))), want)


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, size=(3, 16, 40)).astype(np.uint8)
    packed = awq.pack_int4(q)
    assert packed.dtype == np.int32 and packed.shape == (3, 16, 5)
    assert (packed < 0).any()  # nibble 7 >= 8 makes the word negative
    np.testing.assert_array_equal(awq.unpack_int4(packed), q)
    np.testing.assert_array_equal(decode_slow(packed[1]), q[1])


@pytest.mark.parametrize("group_size", [64, 128])
def test_dequantize_uses_raw_zeros(group_size):
    rng = np.random.default_rng(2)
    n_in, n_out = 256, 24
    qw = random_words(rng, (n_in, n_out // 8))
    qz = random_words(rng, (n_in // group_size, n_out // 8))
    s = rng.uniform(0.01, 0.1, (n_in // group_size, n_out)).astype(np.float16)
    q, z = decode_slow(qw), decode_slow(qz)
    want = np.array([[(q[k, n] - z[k // group_size, n]) * np.float32(s[k // group_size, n])
                      for n in range(n_out)] for k in range(n_in)], np.float32)
    np.testing.assert_array_equal(awq.dequantize_np(qw, qz, s, group_size), want)
    w = AWQWeight.from_arrays(qw, qz, s, group_size)
    np.testing.assert_array_equal(np.asarray(awq.dequantize(w)), want)
    bf = np.asarray(awq.dequantize(w, jnp.bfloat16))
    np.testing.assert_array_equal(bf, want.astype(jnp.bfloat16))


@pytest.mark.parametrize("group_size", [64, 128])
def test_quantize_rtn_error_bound(group_size):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 48)).astype(np.float32)
    w[:group_size, :8] = np.abs(w[:group_size, :8]) + 1.0  # groups that do not span zero
    qw, qz, s = awq.quantize_rtn(w, group_size)
    assert qw.shape == (256, 6) and qz.shape == (256 // group_size, 6) and s.dtype == np.float16
    deq = awq.dequantize_np(qw, qz, s, group_size)
    bound = np.repeat(s.astype(np.float32), group_size, axis=0) / 2
    assert np.all(np.abs(w - deq) <= bound * (1 + 1e-5) + 1e-7)
    z = awq.unpack_int4(qz)
    assert z.min() >= 0 and z.max() <= 15 and (z > 0).any()


def test_stacked_weight_dequantize_and_shape():
    rng = np.random.default_rng(4)
    w = AWQWeight.quantize(rng.standard_normal((3, 128, 40)).astype(np.float32), 64)
    assert w.stacked and w.shape == (3, 128, 40)
    assert w.nbytes == 3 * (128 * 5 * 4 + 2 * 5 * 4 + 2 * 40 * 2)
    full = np.asarray(awq.dequantize(w))
    for e in range(3):
        np.testing.assert_array_equal(
            full[e], awq.dequantize_np(w.qweight[e], w.qzeros[e], w.scales[e], 64))


def test_pytree_and_jit():
    w = AWQWeight.quantize(np.random.default_rng(5).standard_normal((64, 16)), 64)
    leaves, treedef = jax.tree.flatten(w)
    assert len(leaves) == 3
    assert jax.tree.unflatten(treedef, leaves).group_size == 64
    out = jax.jit(lambda w: awq.dequantize(w).sum())(w)
    assert np.isclose(float(out), awq.dequantize_np(w.qweight, w.qzeros, w.scales, 64).sum(), rtol=1e-5)


def test_validation_names_the_tensor():
    q, z, s = awq.empty_awq_arrays(128, 16, 64)
    assert q.shape == (128, 2) and z.shape == (2, 2) and s.shape == (2, 16)
    assert awq.empty_awq_arrays(128, 16, 64, stack=4)[0].shape == (4, 128, 2)
    with pytest.raises(ValueError, match="layers.0.q_proj: qzeros has shape"):
        AWQWeight.from_arrays(q, z[:1], s, 64, name="layers.0.q_proj")
    with pytest.raises(ValueError, match="scales has shape"):
        AWQWeight(q, z, s[:, :8], 64, 128, 16)
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of group_size=64"):
        awq.empty_awq_arrays(96, 16, 64)
    with pytest.raises(ValueError, match="out_features=12 is not a multiple of 8"):
        awq.empty_awq_arrays(128, 12, 64)
    with pytest.raises(ValueError, match="qweight has dtype"):
        AWQWeight(q.astype(jnp.uint32), z, s, 64, 128, 16)


def test_references_against_numpy():
    rng = np.random.default_rng(6)
    w = AWQWeight.quantize(rng.standard_normal((4, 128, 24)).astype(np.float32), 64)
    deq = np.stack([awq.dequantize_np(w.qweight[e], w.qzeros[e], w.scales[e], 64) for e in range(4)])
    x = rng.standard_normal((9, 128)).astype(np.float32)
    w0 = jax.tree.map(lambda a: a[0], w)
    np.testing.assert_allclose(np.asarray(awq.awq_matmul_reference(jnp.asarray(x), w0)),
                               x.astype(np.float64) @ deq[0], rtol=1e-5, atol=1e-5)
    sizes = [3, 0, 4, 0]  # experts 1 and 3 get no rows; rows 7, 8 belong to nobody
    want = np.zeros((9, 24))
    r = 0
    for e, n in enumerate(sizes):
        want[r:r + n] = x[r:r + n].astype(np.float64) @ deq[e]
        r += n
    got = awq.awq_grouped_matmul_reference(jnp.asarray(x), w, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
