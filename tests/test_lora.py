"""LoRA adapters against Hugging Face PEFT on transformers' DeepseekV2ForCausalLM (torch CPU):
adapters we save load in PEFT, adapters PEFT saves load here, merges read by transformers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv2_jax
from dsv2_jax.errors import CheckpointError, ConfigError
from dsv2_jax.lora import LoRAConfig, add_lora, adapters, merge, save_adapter
from hf_ref import hf_forward, load_hf
from tiny import FULL, LITE, write_checkpoint

ALL = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
IDS = np.random.default_rng(0).integers(2, 500, (2, 13))


def randomize(model, seed=1):
    """Non-zero A and B, so that every adapter changes the output."""
    rng = np.random.default_rng(seed)
    for lora in adapters(model).values():
        for var in (lora.lora_a, lora.lora_b):
            var.set_value(jnp.asarray(rng.normal(0, 0.1, var[...].shape), jnp.float32))


def peft_model(folder, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(folder), str(adapter)).eval()


def peft_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("cfg, lora", [
    (LITE, LoRAConfig(rank=4, alpha=8, target_modules=ALL)),
    (FULL, LoRAConfig(rank=3, alpha=5, use_rslora=True, target_modules=ALL, layers=(0, 2))),
], ids=["lite-all-modules", "full-rslora-layers"])
def test_adapter_we_save_gives_our_logits_in_peft(tmp_path, cfg, lora):
    base = write_checkpoint(tmp_path / "base", cfg, seed=2)
    model = dsv2_jax.load(base, dtype="float32")
    names = add_lora(model, lora)
    randomize(model)
    ours = np.asarray(model(jnp.asarray(IDS)))
    save_adapter(model, tmp_path / "adapter", lora, base_model=str(base))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"], written["lora_alpha"]) == ("LORA", lora.rank, lora.alpha)
    theirs = peft_logits(peft_model(base, tmp_path / "adapter"))
    err = np.abs(ours - theirs).max()
    print(f"\nours vs PEFT ({len(names)} adapters): max |Δ logit| {err:.2e}; the adapters move "
          f"logits by {np.abs(ours - np.asarray(dsv2_jax.load(base, dtype='float32')(jnp.asarray(IDS)))).max():.2f}")
    assert err <= 1e-4


def test_adapter_peft_creates_loads_here_and_scaling_matches(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = write_checkpoint(tmp_path / "base", LITE, seed=3)
    torch.manual_seed(0)  # PEFT draws the random A and B from torch's generator
    hf = get_peft_model(load_hf(base), LoraConfig(r=6, lora_alpha=9, target_modules=list(ALL),
                                                   init_lora_weights=False))  # A and B random
    hf.save_pretrained(str(tmp_path / "peft"))
    model = dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "peft")
    assert model.lora_config.rank == 6 and model.lora_config.scaling == pytest.approx(9 / 6)
    n_hf = sum(1 for n, _ in hf.named_parameters() if "lora_A" in n)
    assert len(adapters(model)) == n_hf  # the same linears adapted
    for name, mod in hf.named_modules():  # PEFT's scaling is ours
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and mod.scaling:
            assert mod.scaling["default"] == pytest.approx(adapters(model)[
                name.removeprefix("base_model.model.")].scaling)
    ours = np.asarray(model(jnp.asarray(IDS)))
    err = np.abs(ours - peft_logits(hf.eval())).max()
    print(f"\nPEFT-made adapter: ours vs PEFT max |Δ logit| {err:.2e}")
    assert err <= 1e-4
    # Greedy decode (absorbed MLA, the adapter on kv_b_proj folded in) equals PEFT's generate.
    prompt = [int(t) for t in IDS[0]]
    ours_tokens = dsv2_jax.generate(model, prompt_ids=[prompt], max_new_tokens=8,
                                    ignore_eos=True).token_ids[0]
    hf.generation_config.eos_token_id = None  # as ignore_eos: EOS is a token like any other
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert list(ours_tokens) == out[0, len(prompt):].tolist()


def test_merged_export_is_read_by_transformers_with_the_same_logits(tmp_path):
    base = write_checkpoint(tmp_path / "base", LITE, seed=4)
    model = dsv2_jax.load(base, dtype="float32")
    lora = LoRAConfig(rank=4, alpha=4, target_modules=("q_proj", "kv_b_proj", "o_proj"))
    add_lora(model, lora)
    randomize(model, seed=5)
    save_adapter(model, tmp_path / "adapter", lora)
    want = peft_logits(peft_model(base, tmp_path / "adapter"))
    merge(model)
    assert not adapters(model)
    dsv2_jax.save(model, tmp_path / "merged")
    got = hf_forward(load_hf(tmp_path / "merged"), IDS)[0]
    assert np.abs(got - want).max() <= 1e-4


def test_bad_lora_settings_and_adapters_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.target_modules = \['qkv'\]: expected names among"):
        LoRAConfig(target_modules=("qkv",))
    with pytest.raises(ConfigError, match=r"\['down_proj'\]: MLP adapters are not built yet"):
        LoRAConfig(target_modules=("q_proj", "down_proj"))
    with pytest.raises(ConfigError, match="lora.rank = 0"):
        LoRAConfig(rank=0)
    base = write_checkpoint(tmp_path / "base", LITE, seed=6)
    model = dsv2_jax.load(base, dtype="float32")
    with pytest.raises(ConfigError, match="match no linear"):
        add_lora(model, LoRAConfig(target_modules=("q_a_proj",)))  # LITE has no q LoRA
    add_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=("o_proj",)))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=2, alpha=2, target_modules=("o_proj",)))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=3)))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: tensor 'base_model.model."
                                              r"model.layers.0.self_attn.o_proj.lora_A.weight' has "
                                              r"shape \[2, 64\], expected \[3, 64\]"):
        dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(CheckpointError, match="adapter_config.json: use_dora = True; only False"):
        dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "a")
