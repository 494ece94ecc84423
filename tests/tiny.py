"""Tiny random DeepSeek-V2 checkpoints written in hub format (per-expert tensor names).

The weights come from NumPy, not from this project, so loading them into both this
project and transformers is an independent comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LITE = dict(  # V2-Lite structure: q_proj, dense first layer, greedy top-k, YaRN as released
    vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
    kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
    moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax",
    norm_topk_prob=False, routed_scaling_factor=1.0, aux_loss_alpha=0.001, seq_aux=True,
    rope_theta=10000.0, max_position_embeddings=163840, rms_norm_eps=1e-6,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, model_type="deepseek_v2",
    architectures=["DeepseekV2ForCausalLM"], hidden_act="silu", torch_dtype="float32",
)

FULL = dict(LITE, q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=4,
            topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=16.0, rms_norm_eps=1e-5)

YARN = dict(LITE, max_position_embeddings=512, rope_scaling={
    "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})


def hub_tensors(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights with hub names and [out, in] linears."""
    rng = np.random.default_rng(seed)
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    r, dr, dv = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    t: dict[str, np.ndarray] = {}

    def lin(name, n_in, n_out):
        t[name] = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in))

    def norm(name, n):
        t[name] = 1.0 + 0.1 * rng.normal(size=n)

    t["model.embed_tokens.weight"] = rng.normal(0, 1.0, (cfg["vocab_size"], h))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm.weight", h)
        norm(f"{p}.post_attention_layernorm.weight", h)
        a = f"{p}.self_attn"
        if cfg["q_lora_rank"] is None:
            lin(f"{a}.q_proj.weight", h, nh * qk)
        else:
            lin(f"{a}.q_a_proj.weight", h, cfg["q_lora_rank"])
            norm(f"{a}.q_a_layernorm.weight", cfg["q_lora_rank"])
            lin(f"{a}.q_b_proj.weight", cfg["q_lora_rank"], nh * qk)
        lin(f"{a}.kv_a_proj_with_mqa.weight", h, r + dr)
        norm(f"{a}.kv_a_layernorm.weight", r)
        lin(f"{a}.kv_b_proj.weight", r, nh * (cfg["qk_nope_head_dim"] + dv))
        lin(f"{a}.o_proj.weight", nh * dv, h)
        m = f"{p}.mlp"
        if i < cfg["first_k_dense_replace"]:
            for name, (n_in, n_out) in {"gate_proj": (h, cfg["intermediate_size"]),
                                        "up_proj": (h, cfg["intermediate_size"]),
                                        "down_proj": (cfg["intermediate_size"], h)}.items():
                lin(f"{m}.{name}.weight", n_in, n_out)
            continue
        e, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        # A strong router so that different tokens pick clearly different experts.
        t[f"{m}.gate.weight"] = rng.normal(0, 3 / np.sqrt(h), (e, h))
        for j in range(e):
            lin(f"{m}.experts.{j}.gate_proj.weight", h, mi)
            lin(f"{m}.experts.{j}.up_proj.weight", h, mi)
            lin(f"{m}.experts.{j}.down_proj.weight", mi, h)
        si = mi * cfg["n_shared_experts"]
        lin(f"{m}.shared_experts.gate_proj.weight", h, si)
        lin(f"{m}.shared_experts.up_proj.weight", h, si)
        lin(f"{m}.shared_experts.down_proj.weight", si, h)
    norm("model.norm.weight", h)
    lin("lm_head.weight", h, cfg["vocab_size"])
    return {k: v.astype(dtype) for k, v in t.items()}


def write_checkpoint(folder, cfg: dict, seed: int = 0, shards: int = 1, dtype=np.float32) -> Path:
    """Write config.json + safetensors (sharded with an index when shards > 1)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = hub_tensors(cfg, seed, dtype)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
