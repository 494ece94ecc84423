"""Config parsing, presets, and the full-size model built abstractly (no allocation)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dsv2_jax import ConfigError, DeepseekV2, DeepseekV2Config
from tiny import LITE


def test_rope_scaling_and_rope_parameters_forms_agree():
    old = DeepseekV2Config.from_dict(LITE)
    v5 = {k: v for k, v in LITE.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                             "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    v5["head_dim"] = 8
    v5["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}
    new = DeepseekV2Config.from_dict(v5)
    assert new == old
    assert new.rope_scaling.factor == 40.0 and new.rope_scaling.mscale_all_dim == 0.707


def test_softmax_scale_matches_design():
    # docs/model.md#rope-and-yarn: 192^-0.5 * (0.1 * 0.707 * ln 40 + 1)^2 = 0.1147214
    assert DeepseekV2Config.v2_lite().softmax_scale == pytest.approx(0.1147214, abs=1e-7)


def test_to_dict_round_trips():
    cfg = DeepseekV2Config.v2()
    assert DeepseekV2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("key,value,pattern", [
    ("num_experts_per_tok", 0, "num_experts_per_tok = 0"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim = 7: RoPE rotates pairs"),
    ("topk_group", 5, "topk_group = 5"),
    ("hidden_size", -1, "hidden_size = -1"),
])
def test_inconsistent_values_name_the_key(key, value, pattern):
    d = dict(LITE, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    d[key] = value
    with pytest.raises(ConfigError, match=pattern):
        DeepseekV2Config.from_dict(d, source="cfg.json")


def test_unsupported_rope_and_quant_settings():
    with pytest.raises(ConfigError, match="rope_scaling.type = 'linear'"):
        DeepseekV2Config.from_dict(dict(LITE, rope_scaling={"type": "linear", "factor": 2}))
    for q, pattern in [({"quant_method": "gptq"}, "quant_method = 'gptq'"),
                       ({"quant_method": "awq", "bits": 8}, "bits = 8"),
                       ({"quant_method": "awq", "version": "gemv"}, "version = 'gemv'"),
                       ({"quant_method": "awq", "zero_point": False}, "zero_point = False")]:
        with pytest.raises(ConfigError, match=pattern):
            DeepseekV2Config.from_dict(dict(LITE, quantization_config=q))


def _count(cfg):
    abstract = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype="bfloat16"))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return abstract, sum(int(np.prod(x.shape)) for x in leaves)


def test_full_v2_lite_builds_abstractly_with_15_7b_params():
    abstract, n = _count(DeepseekV2Config.v2_lite())
    assert abs(n - 15.7e9) / 15.7e9 < 0.005, n
    layer = abstract.layers[5]
    assert layer.self_attn.q_proj.weight.shape == (2048, 16 * 192)
    assert layer.self_attn.kv_a_proj_with_mqa.weight.shape == (2048, 576)
    assert layer.self_attn.kv_b_proj.weight.shape == (512, 16 * 256)
    assert layer.self_attn.o_proj.weight.shape == (2048, 2048)
    assert layer.mlp.experts_gate_proj.weight.shape == (64, 2048, 1408)
    assert layer.mlp.experts_down_proj.weight.shape == (64, 1408, 2048)
    assert layer.mlp.shared_experts.up_proj.weight.shape == (2048, 2816)
    assert layer.mlp.gate.weight.shape == (2048, 64)
    assert abstract.layers[0].mlp.up_proj.weight.shape == (2048, 10944)
    assert abstract.lm_head.weight.shape == (2048, 102400)
    assert isinstance(layer.self_attn.q_proj.weight.get_value(), jax.ShapeDtypeStruct)  # nothing allocated
