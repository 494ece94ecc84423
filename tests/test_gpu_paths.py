"""The GPU code paths, run on the CPU: every Pallas kernel in interpret mode.

``backend.target("gpu", interpret=True)`` makes the model take exactly the paths it takes on a
GPU (the dense grouped-matmul kernel and its backward for routed experts, the AWQ kernels, no
gathered-weights decode path, shard_map without the varying-axes check) while the kernels run
interpreted. The reference is the CPU path of the same checkpoint on one device. Gradients are
compared on one device and on (data 2, expert 4) fake devices, where the data axis needs the
gradient all-reduce that an unchecked shard_map must still insert.
"""

import pytest

from ep_cases import run
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
    # the dense grouped kernel ran: 2 MoE layers x 3 projections, each forward, dx and dW
    assert result[f"{mesh}/kernels"] == {"grouped_matmul": 6, "grouped_matmul_dx": 6, "grouped_matmul_dw": 6}
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
