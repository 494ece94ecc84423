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
import shutil
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


def dense_demo_checkpoint(folder, seed: int = 0) -> Path:
    """The demo model as a dense float32 checkpoint that is *not* on a 4-bit grid: each
    dequantized weight plus uniform noise of one quantization step (what RTN would have
    rounded away), so re-quantizing it costs what quantizing a trained model costs."""
    from safetensors.numpy import load_file, save_file

    from .demo import demo_model_path
    from .quant.awq import dequantize_np

    src = demo_model_path()
    folder = Path(folder)
    cfg = json.loads((src / "config.json").read_text())
    group_size = cfg.pop("quantization_config")["group_size"]
    t = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in t.items():
        if name.endswith((".qzeros", ".scales")):
            continue
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            s = t[base + ".scales"].astype(np.float32)
            w = dequantize_np(a, t[base + ".qzeros"], s, group_size)  # [in, out]
            w = w + rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) * np.repeat(s, group_size, axis=0)
            out[base + ".weight"] = np.ascontiguousarray(w.T)
        else:
            out[name] = a.astype(np.float32)
    folder.mkdir(parents=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, folder / f)
    return folder


def add_activation_outliers(folder, n_channels: int = 4, factor: float = 32.0) -> Path:
    """Scale ``n_channels`` hidden channels up ×``factor`` in the normalised residual stream
    (the input and post-attention norms' weights) and the weights that read them down, the
    router included: the float model is unchanged, its linears now see activation outliers, as
    real LLMs' do. The channels are the salient ones, as in LLMs: those whose norm weights are
    largest (summed over the layers' input and post-attention norms)."""
    from safetensors.numpy import load_file, save_file

    from .config import DeepseekV2Config
    from .quant import calibrate

    folder = Path(folder)
    t = load_file(str(folder / "model.safetensors"))
    cfg = DeepseekV2Config.from_json(folder / "config.json")
    weight = sum(np.abs(t[f"model.layers.{i}.{n}.weight"]).astype(np.float64)
                 for i in range(cfg.num_hidden_layers)
                 for n in ("input_layernorm", "post_attention_layernorm"))
    s = np.ones(cfg.hidden_size, np.float32)
    s[np.argsort(weight)[-n_channels:]] = 1.0 / factor
    for layer in range(cfg.num_hidden_layers):
        for g in calibrate.scale_groups(cfg, layer):
            if g.prev in ("input_layernorm", "post_attention_layernorm"):
                calibrate.fold_scale(t, layer, g, s)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
