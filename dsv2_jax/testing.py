"""Random DeepSeek-V2 checkpoints in hub format, for tests and benchmarks.

The weights come from NumPy (not from this project's model code), written with the hub's
tensor names and per-expert layout, so loading them here and in transformers is an
independent comparison.

Example::

    from dsv2_jax.testing import write_checkpoint
    write_checkpoint("/tmp/tiny", config_dict)       # config.json + model.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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
