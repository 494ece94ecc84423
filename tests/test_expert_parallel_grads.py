"""Gradients of cross-entropy + expert-balance loss under expert parallelism (8 fake devices)
equal the single-device gradients, for every parameter."""

import pytest

from ep_cases import run
from tiny import LITE, write_checkpoint

CFG = dict(LITE, num_hidden_layers=2, first_k_dense_replace=0)
EPS = (2, 4, 8)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("ep") / "model", CFG, seed=3)
    return run("grads", folder, ",".join(map(str, EPS)))


@pytest.mark.parametrize("ep", EPS)
def test_gradients_equal_single_device(result, ep):
    assert result["grad_scale"] > 1e-3 and result["loss"] > 1.0
    assert result[f"ep{ep}/n_grads"] == 2 * 14 + 3  # every nnx.Param of the model
    assert result[f"ep{ep}/loss"] <= 1e-5
    err = result[f"ep{ep}/grad"]
    assert err <= 1e-5, f"expert axis {ep}: gradient of {result[f'ep{ep}/worst']} differs by {err}"
    assert result[f"ep{ep}/expert_grad_spec"] == "P('expert',)"  # stays with its expert shard


def test_lora_adapter_gradients_with_split_experts_equal_single_device(tmp_path):
    """Adapters on the routed experts split 4 ways with their experts (inside the dispatch's
    shard_map), plus attention and shared-expert adapters: every adapter gradient equals one
    device's. Saved and loaded with ``dsv2_jax.load(mesh=, adapter=)``, the adapters are placed
    split too and give the single device's logits."""
    folder = write_checkpoint(tmp_path / "model", CFG, seed=4)
    r = run("lora_grads", folder, "4")
    assert r["expert_adapter_spec"] == "P('expert',)"
    assert r["n_grads"] == 2 * 2 * (1 + 3 + 3)  # 2 layers x (A, B) x (q_proj, shared, routed)
    assert r["grad_scale"] > 1e-3 and r["loss"] <= 1e-5
    assert r["grad"] <= 1e-5, f"gradient of {r['worst']} differs by {r['grad']}"
    assert r["loaded_spec"] == "P('expert',)" and r["loaded_logits"] <= 1e-4
