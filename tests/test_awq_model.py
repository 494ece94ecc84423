"""AWQ checkpoints end to end: AutoAWQ-layout files load packed and match the dequantized model."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dsv2_jax
from dsv2_jax.layers import QuantizedWeight
from hf_ref import hf_forward, load_hf
from tiny import LITE, hub_tensors

G = 32
CFG = dict(LITE, torch_dtype="float16")
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\..*(proj|kv_a_proj_with_mqa)\.weight$")
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of word j holds column 8j + ORDER[i]


def pack(q):
    """Pack [rows, cols] values 0..15 as AutoAWQ GEMM does, written from the format spec."""
    rows, cols = q.shape
    words = np.zeros((rows, cols // 8), np.uint32)
    for j in range(cols // 8):
        for i in range(8):
            words[:, j] |= q[:, 8 * j + ORDER[i]].astype(np.uint32) << (4 * i)
    return words.view(np.int32)


def write_awq_pair(tmp_path, skip=None):
    """The same random model twice: AWQ-packed, and dense with the fp32-dequantized weights."""
    rng = np.random.default_rng(5)
    dense = hub_tensors(CFG, seed=5)
    awq, deq = {}, {}
    for name, w in dense.items():
        if not LINEAR.match(name) or (skip and skip in name):
            awq[name] = deq[name] = w.astype(np.float16)
            continue
        n_out, n_in = w.shape
        q = rng.integers(0, 16, (n_in, n_out))
        z = rng.integers(0, 16, (n_in // G, n_out))
        s = (rng.uniform(0.5, 1.5, (n_in // G, n_out)) / (5 * np.sqrt(n_in))).astype(np.float16)
        base = name[: -len(".weight")]
        awq[f"{base}.qweight"], awq[f"{base}.qzeros"], awq[f"{base}.scales"] = pack(q), pack(z), s
        w_deq = (q - np.repeat(z, G, 0)).astype(np.float32) * np.repeat(s.astype(np.float32), G, 0)
        deq[name] = np.ascontiguousarray(w_deq.T)  # hub layout [out, in], exact in fp32
    folders = []
    for label, tensors, extra in [("awq", awq, {"quantization_config": {
            "quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": [skip] if skip else None}}), ("dense", deq, {})]:
        d = tmp_path / label
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**CFG, **extra}))
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        folders.append(d)
    return folders


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_awq_pair(tmp_path_factory.mktemp("awq"))


IDS = np.random.default_rng(1).integers(2, 512, (2, 24))


def test_awq_checkpoint_loads_packed_and_matches_dequantized_model(pair):
    awq_dir, dense_dir = pair
    model = dsv2_jax.load(awq_dir, dtype="float32")
    attn = model.layers[1].self_attn
    assert attn.q_proj.quantized and isinstance(attn.q_proj.qweight, QuantizedWeight)
    assert attn.q_proj.qweight[...].dtype == jnp.int32 and attn.q_proj.qweight[...].shape == (64, 4 * 24 // 8)
    assert model.layers[1].mlp.experts_gate_proj.qweight[...].shape == (8, 64, 32 // 8)
    assert not hasattr(attn.q_proj, "weight")  # never dequantized at load
    assert model.layers[1].mlp.gate.weight[...].dtype == jnp.float32  # router not quantized
    out = model.forward(jnp.asarray(IDS))
    ref = dsv2_jax.load(dense_dir, dtype="float32").forward(jnp.asarray(IDS))
    assert np.abs(np.asarray(out.logits) - np.asarray(ref.logits)).max() <= 1e-4
    for a, b in zip(out.routings, ref.routings):
        np.testing.assert_array_equal(np.sort(np.asarray(a.topk_idx), -1), np.sort(np.asarray(b.topk_idx), -1))
    # and against transformers on the dequantized weights (an independent forward pass)
    hf_logits, _, hf_experts = hf_forward(load_hf(dense_dir), IDS)
    assert np.abs(np.asarray(out.logits) - hf_logits).max() <= 1e-4
    for a, b in zip(out.routings, hf_experts):
        np.testing.assert_array_equal(np.sort(np.asarray(a.topk_idx), -1), np.sort(b, -1))


def test_generation_from_awq_equals_dequantized_model(pair):
    awq_dir, dense_dir = pair
    prompt = [int(i) for i in IDS[0, :9]]
    a = dsv2_jax.generate(dsv2_jax.load(awq_dir, dtype="float32"), prompt_ids=[prompt],
                          max_new_tokens=12, ignore_eos=True)
    b = dsv2_jax.generate(dsv2_jax.load(dense_dir, dtype="float32"), prompt_ids=[prompt],
                          max_new_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids[0]) == 12


def test_modules_to_not_convert_is_honoured(tmp_path):
    awq_dir, dense_dir = write_awq_pair(tmp_path, skip="kv_b_proj")
    model = dsv2_jax.load(awq_dir, dtype="float32")
    assert not model.layers[0].self_attn.kv_b_proj.quantized
    assert model.layers[0].self_attn.q_proj.quantized
    ref = dsv2_jax.load(dense_dir, dtype="float32")
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - np.asarray(ref(jnp.asarray(IDS)))).max() <= 1e-4


def test_quantize_round_trip_is_close_to_dense(tmp_path):
    from tiny import write_checkpoint

    dense_dir = write_checkpoint(tmp_path / "dense", dict(LITE, moe_intermediate_size=64, kv_lora_rank=64,
                                                          intermediate_size=128), seed=2)
    out = dsv2_jax.quantize(str(dense_dir), tmp_path / "awq", group_size=64, method="rtn")
    cfg = json.loads((out / "config.json").read_text())
    record = cfg["quantization_config"].pop("dsv2_jax")
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 64,
                                          "zero_point": True, "version": "gemm",
                                          "modules_to_not_convert": None}
    assert record["method"] == "rtn"
    names = load_file(str(out / "model.safetensors"))
    assert names["model.layers.1.mlp.experts.3.up_proj.qweight"].dtype == np.int32
    assert names["model.layers.1.mlp.gate.weight"].dtype == np.float16
    q = dsv2_jax.load(out, dtype="float32")(jnp.asarray(IDS))
    d = dsv2_jax.load(dense_dir, dtype="float32")(jnp.asarray(IDS))
    err = np.abs(np.asarray(q) - np.asarray(d))
    p, pd = np.asarray(jax_softmax(q)), np.asarray(jax_softmax(d))
    kl = float(np.mean(np.sum(pd * (np.log(pd) - np.log(p)), -1)))
    print(f"RTN int4 g64 vs dense: max |dlogit| {err.max():.3f}, mean {err.mean():.4f}, KL {kl:.4f}")
    # Random Gaussian weights are the worst case for 4-bit RTN (~11% noise per matmul, seen
    # through ~7 matmuls in a row): measured mean |dlogit| 0.23 against mean |logit| 0.79,
    # KL 0.045. Bound it with margin; a wrong nibble order or scale would give KL >> 1.
    assert err.mean() < 0.4 * np.abs(np.asarray(d)).mean()
    assert kl < 0.1


def test_quantize_cli_rejects_bad_group(tmp_path):
    import subprocess
    import sys

    from tiny import write_checkpoint

    d = write_checkpoint(tmp_path / "dense", LITE)
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.quant", "--model", str(d), "--out",
                        str(tmp_path / "o"), "--group-size", "48"], capture_output=True, text=True)
    assert r.returncode == 2 and "group_size (48)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def jax_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
