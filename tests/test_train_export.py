"""python -m train.export: trained weights -> HF folder that transformers, dsv2_jax.load and
(with --awq) the AWQ loader read, with the logits of the trained model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv2_jax
from train import export, run
from dsv2_jax.training.testing import write_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    path = write_tiny_run(tmp, schedule={"total_steps": 6}, checkpoint={"every": 3},
                          logging={"progress": False})
    assert run.main(["--config", str(path)]) == 0
    return tmp / "tiny"


def prompt_ids(tok):
    return np.array([tok.encode("The old king sees a river.", add_bos=True)])


def test_export_matches_transformers(run_dir, tmp_path):
    from hf_ref import hf_forward, load_hf

    trained, step, tok = export.load_run_model(run_dir)
    assert step == 6
    assert export.main([str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["bos_token_id"] == tok.bos_id == 256 and cfg["torch_dtype"] == "float32"
    ids = prompt_ids(tok)
    want = np.asarray(trained(jnp.asarray(ids)))
    # the weights really moved away from their initialisation
    fresh = dsv2_jax.DeepseekV2(trained.config, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(fresh(jnp.asarray(ids))) - want).max() > 0.1
    hf_logits = hf_forward(load_hf(tmp_path / "hf"), ids)[0]
    err = np.abs(hf_logits - want).max()
    print(f"\ntransformers vs trained model: max |logit diff| {err:.2e}")
    assert err <= 1e-4
    loaded = dsv2_jax.load(tmp_path / "hf", dtype="float32")
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids))), want)
    assert loaded.tokenizer.encode("ab") == tok.encode("ab")


def test_export_bfloat16_and_step(run_dir, tmp_path):
    assert export.main([str(run_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                        "--step", "3"]) == 0
    m = dsv2_jax.load(tmp_path / "bf16", dtype="bfloat16")
    assert m.layers[1].mlp.gate.weight[...].dtype == jnp.float32  # the router stays float32
    assert m.embed_tokens.embedding[...].dtype == jnp.bfloat16
    step3, _, _ = export.load_run_model(run_dir, step=3)
    a = np.asarray(step3.embed_tokens.embedding[...]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(m.embed_tokens.embedding[...]), a)
    assert export.main([str(run_dir), "--out", str(tmp_path / "x"), "--step", "5"]) == 2


def test_export_awq(run_dir, tmp_path):
    # The tiny model's linears have 32 or 64 inputs: group size 32 divides them all.
    assert export.main([str(run_dir), "--out", str(tmp_path / "awq"), "--awq",
                        "--group-size", "32", "--method", "rtn"]) == 0
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq"
    assert cfg["quantization_config"]["group_size"] == 32
    assert not list(tmp_path.glob(".awq.dense.*"))  # the dense temporary is gone
    q = dsv2_jax.load(tmp_path / "awq", dtype="float32")
    assert q.layers[1].self_attn.kv_b_proj.quantized
    # every quantized weight is the trained weight to within one quantization step
    from dsv2_jax.quant.awq import dequantize

    trained, _, tok = export.load_run_model(run_dir)
    for name in ("q_proj", "kv_b_proj", "o_proj"):
        lin = getattr(q.layers[1].self_attn, name)
        w = np.asarray(getattr(trained.layers[1].self_attn, name).weight[...])
        deq = np.asarray(dequantize(lin.awq_weight(), jnp.float32))
        step = np.repeat(np.asarray(lin.scales[...], np.float32), 32, axis=0)  # [in, out]
        assert np.all(np.abs(deq - w) <= step * 1.01 + 1e-6), name
    ids = jnp.asarray(prompt_ids(tok))
    assert np.isfinite(np.asarray(q(ids))).all()


def test_export_awq_calibrates_on_the_runs_training_text(run_dir, tmp_path):
    assert export.main([str(run_dir), "--out", str(tmp_path / "awq"), "--awq",
                        "--group-size", "32"]) == 0
    q = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert q["dsv2_jax"]["method"] == "awq"
    # the run's text.txt, in windows of the run's seq_len (32), its held-out tail (none) left out
    assert q["dsv2_jax"]["calibration"] == {"files": ["text.txt"], "samples": 128, "seq_len": 32,
                                            "heldout_fraction_left_out": 0.0}
    trained, _, tok = export.load_run_model(run_dir)
    ids = jnp.asarray(prompt_ids(tok))
    got = np.asarray(dsv2_jax.load(tmp_path / "awq", dtype="float32")(ids))
    want = np.asarray(trained(ids))
    assert np.abs(got - want).mean() < 0.1 * np.abs(want).mean()
