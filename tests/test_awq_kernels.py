"""AWQ Pallas kernels: interpret mode equals the jnp references; each lowers for CUDA.

The lowering tests run on this CPU-only machine: ``.lower(lowering_platforms=("cuda",))``
builds the Triton module, and we parse and verify it with the Triton dialect, which
catches unsupported ops and malformed IR (not Triton's own compile passes to PTX).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import backend, kernels
from dsv2_jax.kernels.awq_grouped_matmul import tile_schedule
from dsv2_jax.quant import awq, ops
from dsv2_jax.quant.awq import AWQWeight


def make_weight(shape, group_size, seed=0, scale_dtype=np.float16):
    rng = np.random.default_rng(seed)
    return AWQWeight.quantize(rng.standard_normal(shape).astype(np.float32) * 0.05, group_size,
                              scale_dtype=scale_dtype)


def make_x(m, k, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


def assert_rel_close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------------------ interpret == reference

@pytest.mark.parametrize("shape,group_size,dtype", [
    ((256, 576), 64, jnp.float32),
    ((256, 200), 128, jnp.bfloat16),
    ((3, 128, 200), 64, jnp.float32),  # stacked experts
])
def test_dequant_kernel_exact(shape, group_size, dtype):
    w = make_weight(shape, group_size, scale_dtype=np.float16 if len(shape) == 2 else jnp.bfloat16)
    got = kernels.awq_dequant(w, dtype, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(awq.dequantize(w, dtype)))


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("n,group_size", [(576, 64), (200, 128)])
def test_fused_matmul_kernel(m, n, group_size):
    w = make_weight((256, n), group_size)
    x = make_x(m, 256)
    got = kernels.awq_matmul(x, w, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert_rel_close(got, awq.awq_matmul_reference(x, w), 1e-3)


def test_fused_matmul_bf16_split_k_and_row_tiles():
    w = make_weight((256, 200), 64)
    x = make_x(40, 256, dtype=jnp.bfloat16)
    # 3 row tiles of 16 (the last one ragged) and 2 K splits of 2 tiles each.
    got = kernels.awq_matmul(x, w, block_m=16, split_k=2, interpret=True)
    assert got.dtype == jnp.bfloat16
    assert_rel_close(got, awq.awq_matmul_reference(x, w), 1e-2)  # one bf16 rounding of y


def test_tile_schedule():
    sched = np.asarray(tile_schedule(jnp.asarray([0, 17, 0, 20], jnp.int32), m=40, block_m=16))
    used = sched[:, sched[2] > sched[1]]
    np.testing.assert_array_equal(used, [[1, 1, 3, 3], [0, 16, 17, 33], [17, 17, 37, 37]])
    assert sched.shape[1] == 3 + 4 - 1


@pytest.mark.parametrize("m,sizes,n,group_size", [
    (1, [0, 0, 1, 0], 576, 64),
    (5, [2, 0, 3, 0], 200, 128),
    (64, [30, 1, 0, 30], 200, 64),  # rows 61..63 belong to no expert and must be zero
])
def test_grouped_matmul_kernel(m, sizes, n, group_size):
    w = make_weight((4, 128, n), group_size)
    x = make_x(m, 128)
    g = jnp.asarray(sizes, jnp.int32)
    got = kernels.awq_grouped_matmul(x, w, g, interpret=True)
    want = awq.awq_grouped_matmul_reference(x, w, g)
    assert_rel_close(got, want, 1e-3)
    assert not np.asarray(got[sum(sizes):]).any()


# ------------------------------------------------------------------ lowering for CUDA

def _verified_triton_modules(lowered_text):
    """Parse and verify every Triton module embedded in the lowered StableHLO text."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    blobs = re.findall(r'ir = "((?:[^"\\]|\\.)*)"', lowered_text)
    ctx = mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    names = []
    for blob in blobs:
        raw = re.sub(rb"\\([0-9A-Fa-f]{2}|.)",
                     lambda m: bytes([int(m[1], 16)]) if len(m[1]) == 2 else m[1],
                     blob.encode("latin-1"))
        with ctx:
            module = ir.Module.parse(raw)
            assert module.operation.verify()
            names.append(str(module.operation.attributes["sym_name"]).strip('"'))
    return names


def _lower_cuda(fn, *args):
    with backend.cuda_lowering():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    return _verified_triton_modules(text)


def test_dequant_lowers_for_cuda():
    w = jax.ShapeDtypeStruct((2048, 576 // 8), jnp.int32)
    z = jax.ShapeDtypeStruct((2048 // 64, 576 // 8), jnp.int32)
    s = jax.ShapeDtypeStruct((2048 // 64, 576), jnp.float16)
    fn = lambda q, z, s: kernels.awq_dequant(AWQWeight(q, z, s, 64, 2048, 576), jnp.bfloat16,
                                             implementation="triton")
    assert _lower_cuda(fn, w, z, s) == ["awq_dequant"]


@pytest.mark.parametrize("m,n", [(1, 10944), (64, 576)])
def test_fused_matmul_lowers_for_cuda(m, n):
    x = jax.ShapeDtypeStruct((m, 2048), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2048, n // 8), jnp.int32)
    z = jax.ShapeDtypeStruct((32, n // 8), jnp.int32)
    s = jax.ShapeDtypeStruct((32, n), jnp.float16)
    fn = lambda x, q, z, s: kernels.awq_matmul(x, AWQWeight(q, z, s, 64, 2048, n),
                                               implementation="triton")
    assert _lower_cuda(fn, x, w, z, s) == ["awq_matmul"]


def test_grouped_matmul_lowers_for_cuda():
    e, k, n, m = 64, 2048, 1408, 6 * 8
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((e, k, n // 8), jnp.int32),
            jax.ShapeDtypeStruct((e, k // 64, n // 8), jnp.int32),
            jax.ShapeDtypeStruct((e, k // 64, n), jnp.float16),
            jax.ShapeDtypeStruct((e,), jnp.int32))
    fn = lambda x, q, z, s, g: kernels.awq_grouped_matmul(
        x, AWQWeight(q, z, s, 64, k, n), g, implementation="triton")
    assert _lower_cuda(fn, *args) == ["awq_grouped_matmul"]


# ------------------------------------------------------------------ the dispatch seam

def test_dispatch_on_cpu_is_the_reference():
    w = make_weight((128, 200), 64)
    x = make_x(6, 128).reshape(2, 3, 128)
    np.testing.assert_array_equal(np.asarray(ops.awq_linear(x, w)),
                                  np.asarray(awq.awq_matmul_reference(x, w)))
    ws = make_weight((4, 128, 200), 64)
    g = jnp.asarray([1, 0, 4, 1], jnp.int32)
    np.testing.assert_array_equal(np.asarray(ops.awq_grouped_linear(x.reshape(6, 128), ws, g)),
                                  np.asarray(awq.awq_grouped_matmul_reference(x.reshape(6, 128), ws, g)))


@pytest.mark.parametrize("rows,kernel_names", [
    (ops.FUSED_MAX_ROWS, ["awq_matmul"]),
    (ops.FUSED_MAX_ROWS + 1, ["awq_dequant"]),
])
def test_dispatch_gpu_paths_lower_for_cuda(rows, kernel_names):
    with backend.target("gpu"):
        _check_gpu_paths(rows, kernel_names)


def _check_gpu_paths(rows, kernel_names):
    w = make_weight((128, 200), 64)
    x = jax.ShapeDtypeStruct((1, rows, 128), jnp.bfloat16)
    assert _lower_cuda(lambda x, w: ops.awq_linear(x, w), x, w) == kernel_names
    ws = make_weight((4, 128, 200), 64)
    xs = jax.ShapeDtypeStruct((rows, 128), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((4,), jnp.int32)
    assert _lower_cuda(ops.awq_grouped_linear, xs, ws, g) == ["awq_grouped_matmul"]


def test_implementation_choice():
    w = make_weight((128, 64), 64)
    x = make_x(2, 128)
    # On this CPU backend 'auto' is the reference itself.
    np.testing.assert_array_equal(np.asarray(kernels.awq_matmul(x, w)),
                                  np.asarray(awq.awq_matmul_reference(x, w)))
    with pytest.raises(ValueError, match="implementation='cuda'"):
        kernels.awq_matmul(x, w, implementation="cuda")
    with pytest.raises(ValueError, match="interpret=True"):
        kernels.awq_dequant(w, implementation="xla", interpret=True)
    with pytest.raises(ValueError, match="block_k=48"):
        kernels.awq_matmul(x, w, block_k=48, interpret=True)
