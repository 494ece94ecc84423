"""The dense grouped-matmul Pallas kernel (routed experts on GPU) and its two backward kernels,
run in interpret mode, against ``jax.lax.ragged_dot`` and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import backend, kernels


def numpy_reference(x, w, sizes, dy):
    """y = x_e @ w_e per expert's rows; dx = dy_e @ w_e^T; dw_e = x_e^T @ dy_e (float64)."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows] = x[rows] @ w[e]
        dx[rows] = dy[rows] @ w[e].T
        dw[e] = x[rows].T @ dy[rows]
        start += n
    return y, dx, dw


def run_kernel(x, w, sizes, dy, **kw):
    g = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda x, w: kernels.grouped_matmul(x, w, g, interpret=True, **kw), x, w)
    return (y, *vjp(dy))


CASES = {
    # (M, K, N, group sizes): empty experts, rows past the groups (expert-parallel sentinels),
    # sizes not multiples of any tile, K and N not multiples of the tiles
    "toy": (100, 96, 80, [30, 0, 25, 40, 0]),
    "one_expert": (16, 64, 128, [0, 16, 0]),
    "all_sentinel": (20, 32, 48, [0, 0]),
}
REAL = {
    # V2-Lite gate/up (2048 -> 1408) and down (1408 -> 2048) with 4 experts, one of them empty;
    # about 40 s in interpret mode: in the second test command (pytest -m gpu)
    "v2lite_up": (96, 2048, 1408, [40, 0, 33, 23]),
    "v2lite_down": (96, 1408, 2048, [7, 64, 0, 20]),
}


@pytest.mark.parametrize("form", ["batched", "loop"])
@pytest.mark.parametrize("case", [*CASES, "many"])
def test_cpu_tiled_grouped_matmul_matches_numpy(case, form, monkeypatch):
    """The CPU path of ``expert_weights.grouped_matmul`` (tiles of one expert each): the batched
    form (small dense experts) and the loop over tiles, forward and both gradients."""
    from dsv2_jax import expert_weights as ew

    if form == "loop":
        monkeypatch.setattr(ew, "BATCHED_TILES_MAX_BYTES", 0)
    m, k, n, sizes = {**CASES, "many": (300, 24, 40, [3, 70, 0, 0, 129, 1, 0, 17, 50])}[case]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    g = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(jax.jit(lambda x, w: ew.grouped_matmul(x, w, g)), x, w)
    for name, a, b in zip(("y", "dx", "dw"), (y, *vjp(dy)), numpy_reference(x, w, sizes, dy)):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-5 * max(1.0, float(np.abs(b).max())), err_msg=name)


@pytest.mark.parametrize("case", [*CASES, *(pytest.param(c, marks=pytest.mark.gpu) for c in REAL)])
def test_forward_and_gradients_match_numpy_and_ragged_dot(case):
    m, k, n, sizes = {**CASES, **REAL}[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    got = run_kernel(x, w, sizes, dy)
    want = numpy_reference(x, w, sizes, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-5 * scale, err_msg=name)
    g = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, g), x, w)
    for name, a, b in zip(("y", "dx", "dw"), got, (y, *vjp(dy))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * max(1.0, float(np.abs(b).max())),
                                   err_msg=name)
    used = sum(sizes)
    assert not np.asarray(got[0])[used:].any() and not np.asarray(got[1])[used:].any()
    for e, s in enumerate(sizes):
        if s == 0:
            assert not np.asarray(got[2])[e].any(), f"expert {e} has no rows: its gradient is zero"


def test_bfloat16_accumulates_in_float32():
    m, k, n, sizes = 64, 256, 128, [10, 30, 24]
    rng = np.random.default_rng(1)
    x32 = rng.normal(size=(m, k)).astype(np.float32)
    w32 = (rng.normal(size=(3, k, n)) / 16).astype(np.float32)
    dy32 = rng.normal(size=(m, n)).astype(np.float32)
    x, w, dy = (jnp.asarray(a, jnp.bfloat16) for a in (x32, w32, dy32))
    got = run_kernel(x, w, sizes, dy)
    # the reference multiplies the same bf16 values exactly; the kernel rounds once, at the end
    want = numpy_reference(*(np.asarray(a.astype(jnp.float32)) for a in (x, w)), sizes,
                           np.asarray(dy.astype(jnp.float32)))
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == jnp.bfloat16, name
        err = np.abs(np.asarray(a.astype(jnp.float32)) - b).max()
        assert err <= 2 ** -7 * np.abs(b).max(), f"{name}: {err}"


def test_tile_options_and_errors():
    m, k, n, sizes = 50, 64, 64, [20, 30]
    rng = np.random.default_rng(2)
    x, w, dy = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((m, k), (2, k, n), (m, n)))
    want = numpy_reference(x, w, sizes, dy)
    for kw in (dict(block_m=16, block_n=32, block_k=16), dict(block_m=64, block_n=64, block_k=32)):
        for a, b in zip(run_kernel(x, w, sizes, dy, **kw), want):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-4)
    with pytest.raises(ValueError, match="block_n=48"):
        kernels.grouped_matmul(x, w, jnp.asarray(sizes), block_n=48, interpret=True)
    with pytest.raises(ValueError, match=r"w \[E, K, N\]"):
        kernels.grouped_matmul(x, w[:, :8], jnp.asarray(sizes), interpret=True)
    # 'auto' on the CPU is ragged_dot itself
    g = jnp.asarray(sizes, jnp.int32)
    np.testing.assert_array_equal(np.asarray(kernels.grouped_matmul(x, w, g)),
                                  np.asarray(jax.lax.ragged_dot(x, w, g)))


def test_lowers_to_triton_for_cuda():
    g = jax.ShapeDtypeStruct((64,), jnp.int32)
    x = jax.ShapeDtypeStruct((512, 2048), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((64, 2048, 1408), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((512, 1408), jnp.bfloat16)

    def f(x, w, g, dy):
        y, vjp = jax.vjp(lambda x, w: kernels.grouped_matmul(x, w, g, implementation="triton"), x, w)
        return y, vjp(dy)

    with backend.cuda_lowering():
        text = jax.jit(f).trace(x, w, g, dy).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3 and "ragged_dot(" not in text


def test_router_dot_is_full_precision_whatever_the_default():
    """The suite forces float32 matmuls to "highest" globally (conftest); a GPU run does not,
    and TF32 rounding of the router logits flips top-k choices near ties. The router asks for
    HIGHEST itself: its dot keeps that precision under a bf16 default, for the CPU and CUDA."""
    from flax import nnx

    from dsv2_jax.moe import Router

    router = Router(64, 8, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((4, 64), jnp.bfloat16)
    with jax.default_matmul_precision("bfloat16"):
        for platform in ("cpu", "cuda"):
            text = jax.jit(lambda x: router(x)).trace(x).lower(lowering_platforms=(platform,)).as_text()
            dots = [line for line in text.splitlines() if "dot_general" in line]
            assert dots and all("HIGHEST" in line for line in dots), dots
        other = jax.jit(lambda x: x.astype(jnp.float32) @ router.weight[...]).trace(x).lower().as_text()
        assert "HIGHEST" not in other  # the control: a plain dot follows the default
