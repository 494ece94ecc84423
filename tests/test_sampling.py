"""dsv2_jax.sampling against NumPy references written here, following HF's logits warpers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    mark_seen,
    sample,
    seen_mask_from_tokens,
)

B, V = 4, 1000


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    x = np.random.default_rng(0).normal(scale=3.0, size=(B, V)).astype(np.float32)
    assert all(len(np.unique(row)) == V for row in x)  # no ties, so every mask is unambiguous
    return x


# ---- NumPy references (float64, HF's formulations) -------------------------------------------


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_top_k(x, k):
    out = np.array(x, np.float64)
    if k == 0 or k >= x.shape[-1]:
        return out
    for row in out:
        row[np.argsort(-row)[k:]] = -np.inf
    return out


def np_top_p(x, p):
    # HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative prob <= 1 - p, keep the last.
    out = np.array(x, np.float64)
    for row in out:
        order = np.argsort(row)
        cum = np.cumsum(np_softmax(row[order]))
        remove = cum <= 1 - p
        remove[-1] = False
        row[order[remove]] = -np.inf
    return out


def np_min_p(x, min_p):
    out = np.array(x, np.float64)
    probs = np_softmax(out)
    out[probs < min_p * probs.max(-1, keepdims=True)] = -np.inf
    return out


def np_repetition_penalty(x, seen, penalty):
    out = np.array(x, np.float64)
    for b in range(out.shape[0]):
        ids = np.flatnonzero(seen[b])
        s = out[b, ids]
        out[b, ids] = np.where(s < 0, s * penalty, s / penalty)
    return out


def assert_same_mask(got, want):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    kept = ~np.isinf(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)


# ---- masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 7, 50, 999, 1000, 5000])
def test_top_k_mask(logits, k):
    got = filter_logits(jnp.asarray(logits), SamplingParams(temperature=1.0, top_k=k))
    assert_same_mask(got, np_top_k(logits, k))
    if 0 < k < V:
        assert (np.isfinite(np.asarray(got)).sum(-1) == k).all()


@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_top_p_mask(logits, p):
    got = filter_logits(jnp.asarray(logits), SamplingParams(temperature=1.0, top_p=p))
    want = np_top_p(logits, p)
    assert_same_mask(got, want)
    kept = np.isfinite(want)
    probs = np_softmax(logits)
    assert ((probs * kept).sum(-1) >= p - 1e-6).all()  # the kept set reaches p
    assert kept[np.arange(B), logits.argmax(-1)].all()  # the top token always survives


@pytest.mark.parametrize("min_p", [0.0, 1e-3, 0.05, 0.3, 0.9])
def test_min_p_mask(logits, min_p):
    got = filter_logits(jnp.asarray(logits), SamplingParams(temperature=1.0, min_p=min_p))
    assert_same_mask(got, np_min_p(logits, min_p))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty(logits, penalty):
    seen = np.random.default_rng(1).random((B, V)) < 0.2
    got = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty)
    np.testing.assert_allclose(np.asarray(got), np_repetition_penalty(logits, seen, penalty), rtol=1e-6)


@pytest.mark.parametrize(
    "top_k, top_p, min_p",
    [(k, p, m) for k, p, m in itertools.product([0, 5, 40], [1.0, 0.3, 0.8], [0.0, 0.02]) if (k, p, m) != (0, 1.0, 0.0)],
)
def test_filter_logits_chain(logits, top_k, top_p, min_p):
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p)
    scaled = logits / np.float32(0.7)
    want = np_min_p(np_top_p(np_top_k(scaled, top_k), top_p), min_p)
    assert_same_mask(filter_logits(jnp.asarray(scaled), params), want)


def test_seen_mask_helpers():
    tokens = jnp.array([[3, 1, 3, 0], [2, 2, 5, 5]])
    valid = jnp.array([[True, True, True, True], [True, True, False, False]])
    seen = seen_mask_from_tokens(tokens, 6, valid)
    want = np.zeros((2, 6), bool)
    want[0, [0, 1, 3]] = True
    want[1, 2] = True
    np.testing.assert_array_equal(np.asarray(seen), want)
    want[1, 4] = want[0, 5] = True
    np.testing.assert_array_equal(np.asarray(mark_seen(seen, jnp.array([5, 4]))), want)


# ---- sample -------------------------------------------------------------------------------------


def test_greedy_is_argmax(logits):
    want = logits.argmax(-1)
    for params in [SamplingParams(), SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.1, seed=9)]:
        got = sample(jnp.asarray(logits), jax.random.key(1), params)
        assert got.dtype == jnp.int32 and got.shape == (B,)
        np.testing.assert_array_equal(np.asarray(got), want)
    # bf16 logits are accepted and upcast
    np.testing.assert_array_equal(np.asarray(sample(jnp.asarray(logits, jnp.bfloat16), None, SamplingParams())),
                                  np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32).argmax(-1)))


def test_greedy_takes_the_lowest_index_among_ties():
    """As NumPy's argmax: the first of equal maxima (the CPU path picks with lax.top_k)."""
    rows = np.full((4, 32000), -1.0, np.float32)
    rows[0, [7, 3, 31999]] = 2.0  # three-way tie
    rows[1, [0, 1]] = 5.0
    rows[2, 31999] = 0.5
    rows[3] = 0.0  # all equal
    got = sample(jnp.asarray(rows), None, SamplingParams())
    np.testing.assert_array_equal(np.asarray(got), rows.argmax(-1))
    assert np.asarray(got).tolist() == [3, 0, 31999, 0]


def test_greedy_with_repetition_penalty(logits):
    seen = np.zeros((B, V), bool)
    seen[np.arange(B), logits.argmax(-1)] = True
    params = SamplingParams(repetition_penalty=1e3)
    got = sample(jnp.asarray(logits), None, params, seen_mask=jnp.asarray(seen))
    np.testing.assert_array_equal(np.asarray(got), np_repetition_penalty(logits, seen, 1e3).argmax(-1))
    assert (np.asarray(got) != logits.argmax(-1)).all()
    with pytest.raises(ValueError, match="seen_mask"):
        sample(jnp.asarray(logits), None, params)


def test_fixed_seed_reproduces(logits):
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=42)
    run = jax.jit(sample, static_argnames="params")
    a = run(jnp.asarray(logits), params.key(), params=params)
    b = run(jnp.asarray(logits), SamplingParams(temperature=1.5, top_p=0.95, seed=42).key(), params=params)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    draws = {tuple(np.asarray(run(jnp.asarray(logits), jax.random.key(s), params=params))) for s in range(8)}
    assert len(draws) > 1  # different keys do draw differently


def test_top_k_2_frequencies(logits):
    n = 4000
    row = logits[0]
    rows = jnp.broadcast_to(jnp.asarray(row), (n, V))
    params = SamplingParams(temperature=1.0, top_k=2)
    ids = np.asarray(jax.jit(sample, static_argnames="params")(rows, jax.random.key(3), params=params))
    allowed = np.argsort(-row)[:2]
    assert set(np.unique(ids)) == set(allowed)
    # the two survivors are drawn in the ratio of their renormalised probabilities
    p_first = np_softmax(row[allowed])[0]
    freq = (ids == allowed[0]).mean()
    assert abs(freq - p_first) < 4 * np.sqrt(p_first * (1 - p_first) / n)


def test_sampled_tokens_respect_filters(logits):
    n = 2000
    params = SamplingParams(temperature=0.8, top_p=0.6, min_p=0.05)
    rows = jnp.repeat(jnp.asarray(logits), n // B, axis=0)
    ids = np.asarray(sample(rows, jax.random.key(5), params))
    allowed = np.isfinite(np_min_p(np_top_p(logits / np.float32(0.8), 0.6), 0.05))
    assert allowed[np.repeat(np.arange(B), n // B), ids].all()


def test_inside_while_loop(logits):
    params = SamplingParams(temperature=1.0, top_k=10, repetition_penalty=1.2, seed=7)

    @jax.jit
    def generate(x):
        def body(state):
            i, key, seen, out = state
            key, sub = jax.random.split(key)
            tok = sample(x, sub, params, seen_mask=seen)
            return i + 1, key, mark_seen(seen, tok), out.at[:, i].set(tok)

        init = (0, params.key(), jnp.zeros(x.shape, bool), jnp.zeros((x.shape[0], 5), jnp.int32))
        return jax.lax.while_loop(lambda s: s[0] < 5, body, init)[3]

    out = np.asarray(generate(jnp.asarray(logits)))
    # each step draws from the top 10 of the logits penalised for the tokens drawn before it
    seen = np.zeros((B, V), bool)
    for i in range(5):
        top10 = np.argsort(-np_repetition_penalty(logits, seen, 1.2), axis=-1)[:, :10]
        assert all(out[b, i] in top10[b] for b in range(B))
        seen[np.arange(B), out[:, i]] = True
    np.testing.assert_array_equal(out, np.asarray(generate(jnp.asarray(logits))))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ],
)
def test_invalid_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_params_are_static_and_valid():
    p = SamplingParams(temperature=0.6, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.1, seed=3)
    assert p.validate() is p
    assert hash(p) == hash(SamplingParams(temperature=0.6, top_k=20, top_p=0.9, min_p=0.01,
                                          repetition_penalty=1.1, seed=3))
    assert SamplingParams().greedy and not p.greedy
