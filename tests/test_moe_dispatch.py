"""The CPU paths of the routed-expert dispatch (``moe._dispatch``) against NumPy.

Every path (each pair gathers its expert; every token through every expert; pairs sorted into
the tiled grouped matmul) must give sum_k w_k · SwiGLU_{e_k}(x), with the expert-parallel
sentinel (pairs of experts held elsewhere get weight 0) and with per-expert LoRA adapters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import moe
from dsv2_jax import expert_weights as ew

E, K, H, I = 16, 4, 32, 24


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _reference(x, idx, weight, wg, wu, wd, valid=None):
    """float64 NumPy: each token's K experts, weighted (pairs not valid contribute nothing)."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if valid is not None and not valid[n, j]:
                continue
            e = idx[n, j]
            h = _silu(x[n] @ wg[e]) * (x[n] @ wu[e])
            out[n] += weight[n, j] * (h @ wd[e])
    return out


def _case(n, seed=0, experts=E):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, H)).astype(np.float32)
    idx = np.stack([rng.choice(experts, K, replace=False) for _ in range(n)]).astype(np.int32)
    weight = rng.random((n, K)).astype(np.float32)
    ws = [(rng.standard_normal(s) * 0.2).astype(np.float32) for s in ((experts, H, I), (experts, H, I), (experts, I, H))]
    return x, idx, weight, ws


PATHS = ["gather", "every", "sorted", "sorted-grouped"]


def _force(monkeypatch, path, n):
    """``sorted`` runs small dense stacks through ``ew.tiled_ffn`` (the whole FFN in the tile
    layout); ``sorted-grouped`` through three ``ew.grouped_matmul`` calls, as for bigger or
    packed experts."""
    monkeypatch.setattr(moe, "_path", lambda *_: path.split("-")[0])
    if path == "sorted-grouped":
        monkeypatch.setattr(ew, "tiled_ffn_fits", lambda *_: False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [1, 3, 8, 200])
def test_each_path_equals_numpy(monkeypatch, path, n):
    x, idx, weight, ws = _case(n)
    _force(monkeypatch, path, n)
    got = jax.jit(lambda *a: moe._dispatch(*a, E))(x, idx, weight, *ws)
    np.testing.assert_allclose(np.asarray(got), _reference(x, idx, weight, *ws), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_expert_parallel_sentinel_pairs_count_nothing(monkeypatch, path):
    """As one of 2 expert shards: the local experts are 0..7; pairs whose index falls outside
    (another device's experts, negative or >= 8) are marked not valid and must add nothing."""
    n = 6
    x, idx, weight, ws = _case(n, seed=1)
    here = idx - 4  # this shard holds global experts 4..11 as local 0..7
    valid = (here >= 0) & (here < E // 2)
    local = [w[4:12] for w in ws]
    _force(monkeypatch, path, n)
    got = jax.jit(lambda *a: moe._dispatch(*a, E // 2, valid))(x, here, weight, *local)
    want = _reference(x, np.clip(here, 0, E // 2 - 1), weight, *local, valid=valid)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_adapted_experts_add_their_lora(monkeypatch, path):
    n, r, scaling = 5, 3, 0.5
    x, idx, weight, ws = _case(n, seed=2)
    rng = np.random.default_rng(3)
    ab = [((rng.standard_normal((E, w.shape[1], r)) * 0.2).astype(np.float32),
           (rng.standard_normal((E, r, w.shape[2])) * 0.2).astype(np.float32)) for w in ws]
    merged = [w + np.einsum("eir,ero->eio", a, b) * scaling for w, (a, b) in zip(ws, ab)]
    adapted = [ew.Adapted(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), scaling) for w, (a, b) in zip(ws, ab)]
    _force(monkeypatch, path, n)
    got = jax.jit(lambda x, i, wt, *s: moe._dispatch(x, i, wt, *s, E))(x, idx, weight, *adapted)
    np.testing.assert_allclose(np.asarray(got), _reference(x, idx, weight, *merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["every", "sorted", "sorted-grouped"])
def test_gradients_equal_the_gathered_path(monkeypatch, path):
    """d(loss)/d(x, weights) through every expert, the tile-layout FFN and the grouped matmuls
    equals the per-pair gathered path's (whose gradients the expert-parallel and LoRA training
    tests check against transformers/PEFT). 40 tokens over 16 experts with experts 3 and 9
    never chosen: several tiles per expert, and empty experts."""
    n = 40
    x, _, weight, ws = _case(n, seed=4)
    rng = np.random.default_rng(6)
    chosen = [e for e in range(E) if e not in (3, 9)]
    idx = np.stack([rng.choice(chosen, K, replace=False) for _ in range(n)]).astype(np.int32)
    probe = np.random.default_rng(5).standard_normal((n, H)).astype(np.float32)

    def grads(path):
        monkeypatch.undo()
        _force(monkeypatch, path, n)
        loss = lambda x, *w: jnp.sum(moe._dispatch(x, idx, weight, *w, E) * probe)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, *ws)

    for a, b in zip(grads(path), grads("gather")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _chosen(n, k, e, shape, dtype):
    """``moe._path`` for a traced (abstract) weight stack of ``shape``."""
    got = []
    jax.eval_shape(lambda w: got.append(moe._path(n, k, e, w)) or w, jax.ShapeDtypeStruct(shape, dtype))
    return got[0]


def test_the_paths_chosen_by_size():
    """Few pairs of small dense experts gather; pairs covering half of them go through every
    expert; many tokens, or V2-Lite-sized expert matrices, take the sorted path."""
    small = ((16, 512, 256), jnp.float32)
    assert _chosen(1, 4, 16, *small) == "gather"  # 4 pairs of 16 experts
    assert _chosen(2, 4, 16, *small) == "every"  # 8 pairs cover half
    assert _chosen(8, 4, 16, *small) == "every"
    assert _chosen(512, 4, 16, *small) == "sorted"  # [16, 512, 256]: past 2^20 values
    v2 = ((64, 2048, 1408), jnp.bfloat16)
    assert _chosen(1, 6, 64, *v2) == "sorted"  # 5.5 MiB per expert matrix
    assert _chosen(8, 6, 64, *v2) == "sorted"
