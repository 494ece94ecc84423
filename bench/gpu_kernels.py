"""Time the AWQ kernels against dense bf16 matmuls at DeepSeek-V2-Lite shapes.

    python bench/gpu_kernels.py                 # on a GPU machine, < 3 minutes
    python bench/gpu_kernels.py --rows 1,8      # a subset
    python bench/gpu_kernels.py --allow-cpu     # smoke-run the script on CPU (XLA paths)

For each linear and row count M it prints the time and achieved HBM bandwidth of

- ``dense``:   ``x [M, in] @ W`` with W in bf16 (what an unquantized model does),
- ``fused``:   the fused W4A16 kernel (``awq_matmul``),
- ``deq+dot``: the dequant kernel then a dense bf16 matmul (the large-M path),
- ``awq_linear``: whichever of the two the dispatch picks (FUSED_MAX_ROWS),

and for the routed experts (64 experts, top-6, rows sorted by expert) ``ragged_dot`` on
bf16 weights against the dense grouped kernel (``grouped_matmul``) and the AWQ grouped kernel. GB/s counts the bytes that must cross HBM once
(weights of the touched experts + x + y), so at small M it is the figure to compare with
the H200's 4.8 TB/s. Each op runs ``reps`` times inside one jitted loop so that Python
dispatch does not hide kernels of a few microseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax import kernels
from dsv2_jax.quant import ops
from dsv2_jax.quant.awq import AWQWeight

GROUP_SIZE = 64  # V2(-Lite) AWQ checkpoints (docs/awq.md)
LINEARS = {  # name: (in, out)
    "q_proj": (2048, 3072),
    "kv_a_proj": (2048, 576),
    "o_proj": (2048, 2048),
    "dense_up": (2048, 10944),
    "dense_down": (10944, 2048),
}
N_EXPERTS, TOP_K, EXPERT_IN, EXPERT_OUT = 64, 6, 2048, 1408
TIME_BUDGET_S = 160.0  # stop starting new cases past this, to finish in < 3 minutes


def random_awq(rng, shape) -> AWQWeight:
    """Random packed weights with realistic scales; no quantization pass (that is slow)."""
    *lead, k, n = shape
    lead = tuple(lead)
    qw = rng.integers(-(2**31), 2**31, size=lead + (k, n // 8), dtype=np.int64).astype(np.int32)
    qz = rng.integers(-(2**31), 2**31, size=lead + (k // GROUP_SIZE, n // 8),
                      dtype=np.int64).astype(np.int32)
    s = rng.uniform(1e-3, 3e-3, size=lead + (k // GROUP_SIZE, n)).astype(np.float16)
    return AWQWeight.from_arrays(jnp.asarray(qw), jnp.asarray(qz), jnp.asarray(s), GROUP_SIZE)


def time_op(fn, x, *args, reps: int) -> float:
    """Seconds per call of ``fn(x, *args)``, repeated in a jitted loop.

    The whole output is the loop state and the jit result, so XLA must compute all of it
    every iteration (a scalar-only result would let it shrink a dense dot to the one
    element read); one element of it is fed back into the next input so the call cannot
    be hoisted out of the loop either.
    """
    y0 = jax.eval_shape(fn, x, *args)

    @jax.jit
    def loop(x, *args):
        def body(_, y):
            feedback = (jnp.ravel(y)[0].astype(jnp.float32) * 1e-30).astype(x.dtype)
            return fn(x + feedback, *args)

        return jax.lax.fori_loop(0, reps, body, jnp.zeros(y0.shape, y0.dtype))

    jax.block_until_ready(loop(x, *args))  # compile + warm up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x, *args))
        best = min(best, time.perf_counter() - t0)
    return best / reps


def fmt(seconds: float, nbytes: int) -> str:
    return f"{seconds * 1e6:9.1f} us {nbytes / seconds / 1e9:7.0f} GB/s"


def bench_linears(rows, reps, impl, deadline):
    rng = np.random.default_rng(0)
    print(f"\n{'linear':<11}{'M':>5} | {'dense bf16':>24} | {'fused':>24} | {'deq+dot':>24} |"
          f" {'awq_linear':>24} | speedup")
    for name, (k, n) in LINEARS.items():
        w = random_awq(rng, (k, n))
        wd = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16)
        for m in rows:
            if time.perf_counter() > deadline:
                print(f"{name:<11}{m:>5} | skipped: time budget spent")
                continue
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            io = 2 * m * (k + n)
            dense = time_op(lambda x, wd: jnp.dot(x, wd, preferred_element_type=jnp.float32)
                            .astype(x.dtype), x, wd, reps=reps)
            fused = time_op(lambda x, w: kernels.awq_matmul(x, w, implementation=impl),
                            x, w, reps=reps)
            deq = time_op(lambda x, w: jnp.dot(
                x, kernels.awq_dequant(w, x.dtype, implementation=impl),
                preferred_element_type=jnp.float32).astype(x.dtype), x, w, reps=reps)
            picked = fused if m <= ops.FUSED_MAX_ROWS else deq
            print(f"{name:<11}{m:>5} | {fmt(dense, 2 * k * n + io)} | {fmt(fused, w.nbytes + io)} |"
                  f" {fmt(deq, w.nbytes + io)} | {fmt(picked, w.nbytes + io)} | {dense / picked:5.2f}x")


def bench_dequant(reps, impl, deadline):
    rng = np.random.default_rng(1)
    print(f"\n{'dequant':<11}{'[in, out]':>13} | {'awq_dequant -> bf16':>24}")
    for name, (k, n) in LINEARS.items():
        if time.perf_counter() > deadline:
            print(f"{name:<11} skipped: time budget spent")
            continue
        w = random_awq(rng, (k, n))
        # The scales are the loop-carried input so the dequant cannot be hoisted.
        t = time_op(lambda s, w: kernels.awq_dequant(dataclasses.replace(w, scales=s),
                                                     jnp.bfloat16, implementation=impl),
                    w.scales, w, reps=reps)
        print(f"{name:<11}{str((k, n)):>13} | {fmt(t, w.nbytes + 2 * k * n)}")


def bench_experts(rows, reps, impl, deadline):
    rng = np.random.default_rng(2)
    w = random_awq(rng, (N_EXPERTS, EXPERT_IN, EXPERT_OUT))
    wd = jnp.asarray(rng.standard_normal((N_EXPERTS, EXPERT_IN, EXPERT_OUT)) * 0.02, jnp.bfloat16)
    per_expert_awq = w.nbytes // N_EXPERTS
    print(f"\nrouted experts {N_EXPERTS} x [{EXPERT_IN}, {EXPERT_OUT}], top-{TOP_K}")
    print(f"{'tokens':>6}{'rows':>6}{'experts':>8} | {'ragged_dot bf16':>24} |"
          f" {'grouped_matmul bf16':>24} | {'awq_grouped_matmul':>24} | speedup vs ragged_dot")
    for t in rows:
        if time.perf_counter() > deadline:
            print(f"{t:>6} skipped: time budget spent")
            continue
        experts = np.stack([rng.permutation(N_EXPERTS)[:TOP_K] for _ in range(t)]).ravel()
        sizes = np.bincount(experts, minlength=N_EXPERTS).astype(np.int32)
        active = int((sizes > 0).sum())
        m = t * TOP_K
        x = jnp.asarray(rng.standard_normal((m, EXPERT_IN)), jnp.bfloat16)
        g = jnp.asarray(sizes)
        io = 2 * m * (EXPERT_IN + EXPERT_OUT)
        dense = time_op(lambda x, wd, g: jax.lax.ragged_dot(x, wd, g), x, wd, g, reps=reps)
        kernel = time_op(lambda x, wd, g: kernels.grouped_matmul(x, wd, g, implementation=impl), x, wd, g,
                         reps=reps)
        grouped = time_op(lambda x, w, g: kernels.awq_grouped_matmul(x, w, g, implementation=impl),
                          x, w, g, reps=reps)
        dense_bytes = active * 2 * EXPERT_IN * EXPERT_OUT + io
        print(f"{t:>6}{m:>6}{active:>8} | {fmt(dense, dense_bytes)} | {fmt(kernel, dense_bytes)} |"
              f" {fmt(grouped, active * per_expert_awq + io)} | {dense / kernel:5.2f}x / {dense / grouped:5.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,64,512", help="comma-separated M (tokens for experts)")
    p.add_argument("--reps", type=int, default=None, help="calls per timing (default 50 GPU, 2 CPU)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run on a CPU backend (times the XLA reference paths, not the kernels)")
    args = p.parse_args(argv)
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        sys.exit(f"bench/gpu_kernels.py: the default JAX backend is {backend!r}, not a GPU; these "
                 "timings are meaningless there. Install jax[cuda12] on a GPU machine, or pass "
                 "--allow-cpu to smoke-test the script.")
    impl = "triton" if backend == "gpu" else "xla"
    reps = args.reps or (50 if backend == "gpu" else 2)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"backend {backend} ({jax.devices()[0].device_kind}), kernels: {impl}, reps {reps}, "
          f"group size {GROUP_SIZE}, FUSED_MAX_ROWS {ops.FUSED_MAX_ROWS}")
    deadline = time.perf_counter() + TIME_BUDGET_S
    bench_linears(rows, reps, impl, deadline)
    bench_experts(rows, reps, impl, deadline)
    bench_dequant(reps, impl, deadline)


if __name__ == "__main__":
    main()
