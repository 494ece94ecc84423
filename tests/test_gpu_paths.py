"""The GPU code paths, run on the CPU: every Pallas kernel in interpret mode.

``backend.target("gpu", interpret=True)`` makes the model take exactly the paths it takes on a
GPU (the dense grouped-matmul kernel and its backward for routed experts, the AWQ kernels, no
gathered-weights decode path, shard_map without the varying-axes check) while the kernels run
interpreted. The reference is the CPU path of the same checkpoint on one device. Gradients are
compared on one device and on (data 2, expert 4) fake devices, where the data axis needs the
gradient all-reduce that an unchecked shard_map must still insert.
"""

import re

import pytest
from ep_cases import run

pytestmark = pytest.mark.gpu  # the second test command (README): about 3 minutes
from tiny import LITE, write_checkpoint

CFG = dict(LITE, num_hidden_layers=2, first_k_dense_replace=0)  # two MoE layers, 8 experts, top-3


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from dsv2_jax.quant.quantizer import quantize_checkpoint

    tmp = tmp_path_factory.mktemp("gpu_paths")
    dense = write_checkpoint(tmp / "dense", CFG, seed=3)
    awq = quantize_checkpoint(dense, tmp / "awq", group_size=32, method="rtn")
    return run("gpu_paths", dense, awq, timeout=600)


@pytest.mark.parametrize("mesh", ["one", "data2_ep4"])
def test_gradients_of_gpu_paths_equal_cpu_paths(result, mesh):
    assert result["grad_scale"] > 1e-3
    # the dense grouped kernel ran: 2 MoE layers x 3 projections, each forward, dx and dW; the
    # expert-parallel dispatch runs its chunks under jax.checkpoint, so its forward kernels
    # appear again in the backward pass (recomputed per chunk)
    fwd = 12 if mesh == "data2_ep4" else 6
    assert result[f"{mesh}/kernels"] == {"grouped_matmul": fwd, "grouped_matmul_dx": 6, "grouped_matmul_dw": 6}
    assert result[f"{mesh}/n_grads"] == 2 * 14 + 3  # every nnx.Param of the model
    assert result[f"{mesh}/loss"] <= 1e-5
    err = result[f"{mesh}/grad"]
    assert err <= 1e-5, f"{mesh}: gradient of {result[f'{mesh}/worst']} differs by {err}"


@pytest.mark.parametrize("phase", ["prefill", "decode", "odd"])
def test_dense_logits_of_gpu_paths_equal_cpu_paths(result, phase):
    assert result["dense/scale"] > 1.0
    assert result["dense/ep/uses_shard_map"]
    assert result[f"dense/ep/{phase}"] <= 1e-5


@pytest.mark.parametrize("phase", ["forward", "odd"])
def test_awq_logits_of_gpu_paths_equal_cpu_paths(result, phase):
    assert result["awq/ep/expert_spec/qweight"] == "P('expert',)"
    assert result[f"awq/ep/{phase}"] <= 1e-4


def test_qlora_gradients_through_the_awq_kernels(tmp_path):
    """QLoRA on GPU backpropagates through the packed base: the fused / dequant AWQ kernels and
    the grouped expert kernel have VJPs in x. The routed experts' adapters run through the dense
    grouped kernel (forward, dx, dW) beside the packed experts. Adapter gradients (B non-zero,
    so A's gradients are too) on the GPU paths in interpret mode equal those of the CPU path."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dsv2_jax
    from dsv2_jax import backend
    from dsv2_jax.lora import LoRAConfig, LoRAParam, add_lora
    from dsv2_jax.quant.quantizer import quantize_checkpoint

    dense = write_checkpoint(tmp_path / "dense", CFG, seed=3)
    model = dsv2_jax.load(quantize_checkpoint(dense, tmp_path / "awq", group_size=32, method="rtn"),
                          dtype="float32")
    add_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "kv_b_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"),
                               routed_experts=True))
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), adapters)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, CFG["vocab_size"], (2, 40)), jnp.int32)

    def loss(adapters, rest):  # 78 rows take the dequant-kernel path, 19 rows the fused kernel
        m = nnx.merge(graphdef, adapters, rest)
        total = 0.0
        for x in (ids, ids[:1, :20]):
            logp = jax.nn.log_softmax(m(x[:, :-1]))
            total -= jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))
        return total

    want_loss, want = jax.value_and_grad(loss)(adapters, rest)
    with backend.target("gpu", interpret=True):
        got_loss, got = jax.jit(jax.value_and_grad(loss))(adapters, rest)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(adapters, rest))
    for kernel in ("awq_matmul", "awq_dequant", "awq_grouped_matmul", "grouped_matmul_dx",
                   "grouped_matmul_dw"):
        assert f"name={kernel}" in jaxpr, kernel
    assert abs(float(got_loss) - float(want_loss)) <= 1e-5
    pairs = list(zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    assert len(pairs) == 2 * 9 * 2  # 2 layers x (3 attention, 3 shared, 3 routed) x (A, B)
    scale = max(float(jnp.abs(w).max()) for w, _ in pairs)
    assert scale > 1e-4
    for w, g in pairs:
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * max(1.0, scale))


def test_long_training_step_through_the_attention_kernel():
    """T = 700 > mla.BLOCK packed documents: on the GPU paths the train forward's attention is the
    Pallas flash kernel (forward, dq, dk/dv; interpreted here). Logits and every gradient equal
    the CPU path's (the JAX blockwise scan, itself checked against NumPy in test_attention)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsv2_jax import backend
    from dsv2_jax.attention import SegmentMask
    from dsv2_jax.training.step import train_forward
    from test_attention import packed_row

    model, ids, segments, positions = packed_row(1, 700)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = train_forward(nnx.merge(graphdef, params, rest), ids, positions, SegmentMask(segments)).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params)
    with backend.target("gpu", interpret=True):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(p)[0]))(params))
        calls = sorted(set(re.findall(r"name=(mla_attention_\w+)", jaxpr)))
        (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params)
    assert calls == ["mla_attention_dkdv", "mla_attention_dq", "mla_attention_fwd"], calls
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)))
    assert err <= 1e-5, err


def test_prefill_chunks_through_the_attention_kernel(monkeypatch):
    """Prompts of 1-3 prefill chunks (chunks and key blocks made 16 slots, kernel slices 32) in a
    left-padded batch: on the GPU paths later chunks attend through the Pallas kernel over slices
    of the cache, merged by log-sum-exp (interpreted here); the logits after prefill equal the
    CPU path's blockwise form."""
    import jax
    import numpy as np
    from flax import nnx

    from dsv2_jax import DeepseekV2, DeepseekV2Config, backend, kernels, mla
    from dsv2_jax import generation as gen
    from dsv2_jax.sampling import SamplingParams

    monkeypatch.setattr(gen, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(mla, "BLOCK", 16)
    monkeypatch.setattr(mla, "GPU_KEY_SLICES", (32,))
    calls = []
    partial = kernels.mla_attention_partial
    monkeypatch.setattr(kernels, "mla_attention_partial", lambda *a, **k: calls.append(1) or partial(*a, **k))
    jax.clear_caches()
    cfg = DeepseekV2Config.from_dict(dict(LITE, num_hidden_layers=2, rope_scaling=None))
    model = DeepseekV2(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (11, 29, 45)]
    want = np.asarray(gen._Session(model, None, prompts, 2, SamplingParams(), ignore_eos=True).carry.logits)
    jax.clear_caches()
    with backend.target("gpu", interpret=True):
        got = np.asarray(gen._Session(model, None, prompts, 2, SamplingParams(), ignore_eos=True).carry.logits)
    jax.clear_caches()
    assert calls, "the GPU prefill did not call the attention kernel"
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_flash_attention_runs_per_device_under_a_mesh():
    """MLA's GPU flash-attention kernel under a (data 2, expert 4) mesh runs in shard_map over
    the batch axes (XLA cannot partition a Pallas call and would run the whole batch on every
    device): output and gradients (5 parameters and the input) equal the CPU path's, 8 packed
    rows of 640 tokens of 4 documents each."""
    r = run("flash_sharded")
    assert r["shard_map"]
    assert r["out_scale"] > 0.1 and r["out"] <= 1e-6
    assert r["n_grads"] == 6 and r["grad"] <= 1e-5
