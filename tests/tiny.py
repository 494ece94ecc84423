"""Tiny DeepSeek-V2 configs for tests; random hub-format checkpoints come from dsv2_jax.testing."""

from __future__ import annotations

import shutil

import numpy as np

from dsv2_jax.testing import hub_tensors, write_checkpoint  # noqa: F401
from dsv2_jax.tokenizer import deepseek_v2_tokenizer_folder

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


def write_tokenized_checkpoint(folder, seed: int = 0, dtype=np.float32):
    """A tiny V2-Lite-structured random checkpoint (8 routed experts in layer 1, layer 0
    dense) with DeepSeek's real tokenizer files and vocabulary size: what the programs need."""
    d = write_checkpoint(folder, dict(LITE, vocab_size=100096, hidden_size=32, num_attention_heads=2,
                                      num_hidden_layers=2, bos_token_id=100000, eos_token_id=100001),
                         dtype=dtype, seed=seed)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(deepseek_v2_tokenizer_folder() / f, d / f)
    return d


# What the CUDA PJRT plugin (the gpu-compile extra) prints when a process imports JAX on a machine
# without a GPU, before any of our code runs: not part of a CLI's own output.
_PLUGIN_NOISE = ("absl::InitializeLog()", "cudart_stub.cc", "cuda_plugin_extension is not found")


def stderr_lines(stderr: str) -> list[str]:
    """A subprocess's stderr lines, less the CUDA plugin's start-up notices."""
    return [ln for ln in stderr.strip().splitlines() if not any(n in ln for n in _PLUGIN_NOISE)]
