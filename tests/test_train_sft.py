"""Fine-tuning: init_from a hub-format folder on chat JSONL, then init_from a project run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

import dsv2_jax
from dsv2_jax.testing import write_checkpoint
from dsv2_jax.training.byte_tokenizer import write_byte_tokenizer
from dsv2_jax.training.metrics import read_metrics
from dsv2_jax.training.testing import TINY_MODEL, tiny_config

ROOT = Path(__file__).resolve().parent.parent

CHATS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Goodbye."}],
]


def hub_config():
    return dict(TINY_MODEL, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy", n_group=1,
                topk_group=1, scoring_func="softmax", norm_topk_prob=False,
                routed_scaling_factor=1.0, aux_loss_alpha=0.001, seq_aux=True, rope_theta=10000.0,
                max_position_embeddings=4096, rms_norm_eps=1e-6, q_lora_rank=None,
                num_key_value_heads=2, bos_token_id=256, eos_token_id=257,
                tie_word_embeddings=False, hidden_act="silu")


def params_of(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sft_from_hub_folder_then_from_run(tmp_path):
    hub = write_checkpoint(tmp_path / "hub", hub_config(), seed=3)
    write_byte_tokenizer(hub)  # the folder's own tokenizer (data.tokenizer: null uses it)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CHATS[i % 2]}) + "\n" for i in range(40)))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    def train(name, init_from):
        cfg = tiny_config(tmp_path / name, [str(data)], data={"tokenizer": None},
                          schedule={"warmup_steps": 1, "total_steps": 3},
                          checkpoint={"every": 1, "keep": 3}, logging={"progress": False})
        cfg["model"] = {"init_from": str(init_from)}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "train.run", "--config", str(path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return tmp_path / name

    from train.export import load_run_model

    sft = train("sft", hub)
    # Warm-up starts at lr 0: step 1 changes nothing, so its checkpoint holds the start weights.
    start, _, tok = load_run_model(sft, step=1)
    want = params_of(dsv2_jax.load(hub, dtype="float32"))
    got = params_of(start)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert tok.chat_template and (sft / "tokenizer" / "tokenizer.json").exists()
    # Only assistant tokens are targets: per packed row of 32 tokens far fewer than 32.
    steps = read_metrics(sft)
    assert all(0 < x["target_tokens"] < 4 * 32 / 2 for x in steps)
    assert steps[1]["loss"] != steps[0]["loss"]

    again = train("again", sft)  # init_from a project run directory: its latest checkpoint
    start2, _, _ = load_run_model(again, step=1)
    end1, _, _ = load_run_model(sft)
    for k, v in params_of(end1).items():
        np.testing.assert_array_equal(params_of(start2)[k], v, err_msg=k)
    assert jax.tree.leaves(nnx.state(start2, nnx.Param))
