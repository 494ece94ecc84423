"""End-to-end DeepSeek-V2-Lite on one GPU with random weights: kernel checks, decode and prefill.

    python bench/gpu_e2e.py [--json OUT] [--batches 1,8,64] [--new 64] [--budget-s 300]

Part of ``bench/gpu_suite.sh`` (run it on a lent H200; installs nothing). On a CPU it refuses
unless ``--allow-cpu`` (then it runs a 2-layer model, to smoke-test the script).

1. Kernel checks on the device: each Pallas kernel (``implementation="triton"``, compiled, not
   interpreted) against its XLA reference at V2-Lite shapes, max |difference| relative to
   the reference's scale.
2. Decode: the full 27-layer V2-Lite, random weights (bf16, and AWQ 4-bit g64 with random packed
   words), greedy, ``--new`` tokens after a 128-token prompt, batch 1 / 8 / 64: tokens/s (all
   rows) and the percentage of the HBM-bandwidth bound (docs/platform.md#h200-limits-used-for-rooflines):
   each step must read the attention, shared-expert, dense and lm_head weights once and the
   routed experts the batch touches (expected distinct experts of B·6 random picks of 64).
3. Prefill: one 4,096-token prompt, tokens/s (second call; the first compiles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200


def random_model(quant: str, layers: int | None = None):
    """V2-Lite (or its first ``layers``) with random weights made on the device."""
    from flax import nnx

    from dsv2_jax import DeepseekV2
    from dsv2_jax.gpu_programs import v2_lite

    cfg = v2_lite(quant, **({} if layers is None else {"num_hidden_layers": layers}))
    abstract = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype="bfloat16",
                                                 dtype="bfloat16"))
    graphdef, state = nnx.split(abstract)
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)

    @jax.jit
    def fill(key):
        out = []
        for k, (path, leaf) in zip(jax.random.split(key, len(paths)), paths):
            name = jax.tree_util.keystr(path)
            if jnp.issubdtype(leaf.dtype, jnp.integer):  # packed AWQ words: any bits
                out.append(jax.lax.bitcast_convert_type(jax.random.bits(k, leaf.shape, jnp.uint32), leaf.dtype))
            elif "scales" in name:
                out.append(jnp.full(leaf.shape, 2e-3, leaf.dtype))
            elif "norm" in name:
                out.append(jnp.ones(leaf.shape, leaf.dtype))
            else:
                out.append((jax.random.normal(k, leaf.shape, jnp.float32) * 0.02).astype(leaf.dtype))
        return out

    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, fill(jax.random.key(0))))
    return model, cfg


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the routed experts per expert summed over layers, bytes of everything else)."""
    from flax import nnx

    experts = other = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        if "experts_" in jax.tree_util.keystr(path):
            experts += leaf.nbytes // leaf.shape[0]
        elif "embed_tokens" not in jax.tree_util.keystr(path):  # the embedding is gathered, not read
            other += leaf.nbytes
    return experts, other


def check_kernels() -> dict:
    from dsv2_jax import kernels
    from dsv2_jax.quant.awq import AWQWeight

    rng = np.random.default_rng(0)
    res = {}

    def awq(k, n, e=None):
        lead = () if e is None else (e,)
        q = rng.integers(-2**31, 2**31 - 1, lead + (k, n // 8), dtype=np.int64).astype(np.int32)
        z = rng.integers(-2**31, 2**31 - 1, lead + (k // 64, n // 8), dtype=np.int64).astype(np.int32)
        s = (rng.random(lead + (k // 64, n)) * 4e-3).astype(np.float16)
        return AWQWeight(jnp.asarray(q), jnp.asarray(z), jnp.asarray(s), group_size=64, in_features=k,
                         out_features=n)

    def err(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))

    for k, n in ((2048, 576), (2048, 10944), (10944, 2048)):
        w = awq(k, n)
        for m in (1, 64):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            res[f"awq_matmul {k}->{n} M={m}"] = err(kernels.awq_matmul(x, w, implementation="triton"),
                                                    kernels.awq_matmul(x, w, implementation="xla"))
        res[f"awq_dequant {k}->{n}"] = err(kernels.awq_dequant(w, jnp.bfloat16, implementation="triton"),
                                           kernels.awq_dequant(w, jnp.bfloat16, implementation="xla"))
    sizes = np.bincount(np.concatenate([rng.permutation(64)[:6] for _ in range(512)]), minlength=64)
    g = jnp.asarray(sizes, jnp.int32)
    for k, n in ((2048, 1408), (1408, 2048)):
        x = jnp.asarray(rng.standard_normal((512 * 6, k)), jnp.bfloat16)
        w = awq(k, n, 64)
        res[f"awq_grouped_matmul {k}->{n}"] = err(
            kernels.awq_grouped_matmul(x, w, g, implementation="triton"),
            kernels.awq_grouped_matmul(x, w, g, implementation="xla"))
        wd = jnp.asarray(rng.standard_normal((64, k, n)) * 0.02, jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((512 * 6, n)), jnp.bfloat16)
        outs = {}
        for impl in ("triton", "xla"):
            y, vjp = jax.vjp(lambda x, w, impl=impl: kernels.grouped_matmul(x, w, g, implementation=impl), x, wd)
            outs[impl] = (y, *vjp(dy))
        for i, part in enumerate(("y", "dx", "dw")):
            res[f"grouped_matmul {k}->{n} {part}"] = err(outs["triton"][i], outs["xla"][i])
    return res


def decode(quant: str, batches, new: int, prompt: int, layers, deadline) -> list[dict]:
    import dsv2_jax

    model, cfg = random_model(quant, layers)
    per_expert, other = weight_bytes(model)
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    rows = []
    for b in batches:
        if time.perf_counter() > deadline:
            rows.append({"quant": quant, "batch": b, "skipped": "time budget spent"})
            continue
        ids = np.random.default_rng(b).integers(2, cfg.vocab_size, (b, prompt)).tolist()
        dsv2_jax.generate(model, prompt_ids=ids, max_new_tokens=new, ignore_eos=True)  # compiles
        out = dsv2_jax.generate(model, prompt_ids=ids, max_new_tokens=new, ignore_eos=True)
        touched = cfg.n_routed_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** b)
        step_bytes = other + touched * per_expert / max(n_moe, 1) * n_moe
        bound = b * HBM_BYTES_PER_S / step_bytes
        rows.append({"quant": quant, "batch": b, "new_tokens": new, "decode_tok_s": out.decode_tokens_per_s,
                     "bound_tok_s": bound, "pct_of_bound": 100 * out.decode_tokens_per_s / bound,
                     "bytes_per_step_gb": step_bytes / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    if time.perf_counter() < deadline:
        ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, 4096)).tolist()
        dsv2_jax.generate(model, prompt_ids=ids, max_new_tokens=1, ignore_eos=True)
        out = dsv2_jax.generate(model, prompt_ids=ids, max_new_tokens=1, ignore_eos=True)
        rows.append({"quant": quant, "prefill_tokens": 4096, "prefill_tok_s": out.prefill_tokens_per_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=300.0, help="skip what starts after this")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test on a CPU (2 layers)")
    a = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not a.allow_cpu:
        print("gpu_e2e: no GPU (backend %r); --allow-cpu runs a 2-layer smoke test" % jax.default_backend())
        return 2
    deadline = time.perf_counter() + a.budget_s
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    result["kernel_errors"] = check_kernels() if on_gpu else "skipped on CPU (the kernels run interpreted in tests)"
    print(json.dumps(result), flush=True)
    layers = None if on_gpu else 2
    batches = [int(b) for b in a.batches.split(",")]
    result["decode"] = []
    for quant in ("bf16", "awq"):
        result["decode"] += decode(quant, batches, a.new, a.prompt, layers, deadline)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
