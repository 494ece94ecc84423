"""Logical-axis rules, the mesh helper, and loading straight into shardings.

The rule checks run on an abstract (data 2, fsdp 2, expert 2) mesh in this process; the
end-to-end checks (AWQ experts split 8 ways, FSDP + expert axes together) run on 8 fake CPU
devices in a subprocess and compare logits with the single-device model.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from dsv2_jax import DeepseekV2, DeepseekV2Config
from dsv2_jax import sharding as sh
from dsv2_jax.config import QuantConfig
from dsv2_jax.training.optim import make_optimizer
from ep_cases import run
from tiny import LITE, write_checkpoint

MESH = AbstractMesh((2, 2, 2), sh.MESH_AXES)
CFG = dict(LITE, num_hidden_layers=2, first_k_dense_replace=1)  # a dense layer, then MoE


def _specs(tree, mesh=MESH):
    return {jax.tree_util.keystr(k): s.spec
            for k, s in jax.tree_util.tree_leaves_with_path(sh.tree_shardings(tree, mesh))}


@pytest.fixture(scope="module")
def params():
    cfg = DeepseekV2Config.from_dict(CFG)
    model = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def test_every_parameter_gets_its_rule(params):
    specs = {k.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").replace(".value", ""): v
             for k, v in _specs(params).items()}
    want = {
        ".embed_tokens.embedding": P("fsdp"),  # [vocab 512, embed 64]: vocab over fsdp
        ".lm_head.weight": P("fsdp"),  # [embed, vocab]: embed over fsdp
        ".norm.weight": P(),
        ".layers.0.input_layernorm.weight": P(),
        ".layers.0.self_attn.q_proj.weight": P("fsdp"),
        ".layers.0.self_attn.kv_a_proj_with_mqa.weight": P("fsdp"),
        ".layers.0.self_attn.kv_a_layernorm.weight": P(),
        ".layers.0.self_attn.kv_b_proj.weight": P(),  # [kv_lora, heads]: no tensor axis
        ".layers.0.self_attn.o_proj.weight": P(None, "fsdp"),
        ".layers.0.mlp.gate_proj.weight": P("fsdp"),
        ".layers.0.mlp.down_proj.weight": P(None, "fsdp"),
        ".layers.1.mlp.gate.weight": P("fsdp"),  # router [embed, E]: every device routes
        ".layers.1.mlp.experts_gate_proj.weight": P("expert", "fsdp"),
        ".layers.1.mlp.experts_up_proj.weight": P("expert", "fsdp"),
        ".layers.1.mlp.experts_down_proj.weight": P("expert", None, "fsdp"),
        ".layers.1.mlp.shared_experts.up_proj.weight": P("fsdp"),
        ".layers.1.mlp.shared_experts.down_proj.weight": P(None, "fsdp"),
    }
    for name, spec in want.items():
        assert specs[name] == spec, f"{name}: {specs[name]} != {spec}"
    assert len(specs) == 3 + 10 + 14  # top level, dense layer, MoE layer
    for path, x in jax.tree_util.tree_leaves_with_path(params):  # none falls through the table
        assert sh.param_logical_axes(path, x.ndim) is not None, jax.tree_util.keystr(path)


def test_awq_leaves_shard_like_the_weight_they_pack():
    cfg = DeepseekV2Config.from_dict(CFG)
    cfg = DeepseekV2Config.from_dict(dict(CFG, quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}))
    model = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0)))
    specs = _specs(nnx.state(model))
    up = "['layers'][1]['mlp']['experts_up_proj']"
    # qweight [E, 64, 32/8], qzeros [E, 64/32, 4], scales [E, 2, 32]: fsdp only where it divides
    assert specs[f"{up}['qweight'].value"] == P("expert", "fsdp")
    assert specs[f"{up}['qzeros'].value"] == P("expert", "fsdp")
    assert specs[f"{up}['scales'].value"] == P("expert", "fsdp")
    assert isinstance(cfg.quantization, QuantConfig)


def test_optimizer_moments_mirror_their_parameters(params):
    opt = jax.eval_shape(make_optimizer(1e-3).init, params)
    p_specs = _specs(params)
    o_specs = _specs(opt)
    expert = "['layers'][1]['mlp']['experts_down_proj']['weight'].value"
    moments = [k for k in o_specs if k.endswith(expert)]
    assert len(moments) == 2  # AdamW mu and nu
    assert all(o_specs[k] == p_specs[f"{expert}"] == P("expert", None, "fsdp") for k in moments)
    counts = [k for k in o_specs if k.endswith(".count")]
    assert counts and all(o_specs[k] == P() for k in counts)


def test_indivisible_axes_stay_replicated():
    mesh = AbstractMesh((1, 3, 2), sh.MESH_AXES)
    assert sh.spec(("experts", "embed", "expert_mlp"), (8, 64, 32), mesh) == P("expert")
    assert sh.spec(("experts", "embed", "expert_mlp"), (9, 63, 32), mesh) == P(None, "fsdp")
    assert sh.batch_spec(MESH, 8) == P(("data", "fsdp", "expert"))
    assert sh.batch_spec(MESH, 4) == P(("data", "fsdp"))
    assert sh.batch_spec(MESH, 3) == P()
    assert sh.batch_sharding(MESH, 8, dim=1).spec == P(None, ("data", "fsdp", "expert"))  # [A, B, T]


def test_make_mesh_sizes_and_errors():
    mesh = sh.make_mesh()  # this process: one device
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 1}
    with pytest.raises(ValueError, match="there are 1 devices"):
        sh.make_mesh(data=1, expert=2)
    with pytest.raises(ValueError, match="at most one -1"):
        sh.make_mesh(data=-1, expert=-1)


def test_expert_axis_must_divide_the_experts():
    cfg = DeepseekV2Config.from_dict(CFG)
    mesh = AbstractMesh((1, 1, 3), sh.MESH_AXES)
    with pytest.raises(ValueError, match="n_routed_experts = 8 is not divisible .* \\(3\\)"):
        nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), mesh=mesh))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from dsv2_jax.quant.quantizer import quantize_checkpoint

    tmp = tmp_path_factory.mktemp("sharding")
    dense = write_checkpoint(tmp / "dense", dict(CFG, num_hidden_layers=2, first_k_dense_replace=0), seed=3)
    awq = quantize_checkpoint(dense, tmp / "awq", group_size=32, method="rtn")
    return run("awq_fsdp", dense, awq)


def test_awq_experts_split_over_8_devices_match_single_device(e2e):
    assert e2e["awq/ep8/expert_spec/qweight"] == "P('expert',)"
    assert e2e["awq/ep8/expert_spec/scales"] == "P('expert',)"
    assert e2e["awq/ep8/uses_shard_map"]
    for phase in ("forward", "odd"):
        assert e2e[f"awq/ep8/{phase}"] <= 1e-5, (phase, e2e[f"awq/ep8/{phase}"])


def test_fsdp_and_expert_axes_together_match_single_device(e2e):
    assert e2e["dense/fsdp2_ep4/expert_spec/weight"] == "P('expert', 'fsdp')"
    assert e2e["dense/fsdp2_ep4/q_proj_spec"] == "P('fsdp',)"
    for phase in ("forward", "odd"):
        assert e2e[f"dense/fsdp2_ep4/{phase}"] <= 1e-5, (phase, e2e[f"dense/fsdp2_ep4/{phase}"])
    assert np.isfinite(e2e["dense/scale"]) and e2e["dense/scale"] > 1.0


def test_random_init_straight_into_shardings(e2e):
    assert e2e["init/expert_spec"] == "P('expert', None, 'fsdp')"
    assert e2e["init/uses_shard_map"]
    assert e2e["init/diff"] <= 1e-7  # same draws; only XLA's fusion of `normal * std` differs


def test_expert_parallel_dispatch_lowers_for_cuda():
    """The GPU kernels inside shard_map: the Triton grouped kernels for dense and AWQ experts
    (never ragged_dot, which XLA pads to every expert on a GPU)."""
    res = run("cuda_lowering")
    assert res["dense/triton"] and not res["dense/ragged_dot"] and res["dense/reduce_scatter"]
    assert not res["awq/ragged_dot"]
    assert res["awq/triton"] and res["awq/reduce_scatter"]
