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


def assert_greedy_equals_peft(model, hf, prompt, n):
    """Our greedy tokens after ``prompt`` equal PEFT's ``generate`` (EOS a token like any other)."""
    prompt = [int(t) for t in prompt]
    ours = dsv2_jax.generate(model, prompt_ids=[prompt], max_new_tokens=n, ignore_eos=True).token_ids[0]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    assert list(ours) == out[0, len(prompt):].tolist()


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
    assert_greedy_equals_peft(model, hf, IDS[0], 8)


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


MLP = ("gate_proj", "up_proj", "down_proj")


def peft_v4_names(monkeypatch):
    """PEFT 0.21 on transformers 5 reads the MLP names as the fused routed experts only (its
    v4 -> v5 conversion); switched off, they mean every nn.Linear of that name, as on the hub's
    own model code: the dense MLP and the shared experts (transformers 5 fuses the routed ones)."""
    import peft.utils.transformers_weight_conversion as conv

    monkeypatch.setattr(conv, "convert_peft_config_for_transformers", lambda *a, **k: None)


def test_dense_and_shared_expert_mlp_adapters_match_peft_both_ways(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    peft_v4_names(monkeypatch)
    base = write_checkpoint(tmp_path / "base", LITE, seed=7)  # layer 0 dense, 1-2 MoE + shared
    model = dsv2_jax.load(base, dtype="float32")
    lora = LoRAConfig(rank=3, alpha=6, target_modules=("kv_b_proj",) + MLP)
    names = add_lora(model, lora)
    assert sorted(n for n in names if "mlp" in n) == sorted(
        [f"model.layers.0.mlp.{m}" for m in MLP]
        + [f"model.layers.{i}.mlp.shared_experts.{m}" for i in (1, 2) for m in MLP])
    randomize(model, seed=8)
    ours = np.asarray(model(jnp.asarray(IDS)))
    save_adapter(model, tmp_path / "adapter", lora)
    theirs = peft_logits(peft_model(base, tmp_path / "adapter"))
    moved = np.abs(ours - np.asarray(dsv2_jax.load(base, dtype="float32")(jnp.asarray(IDS)))).max()
    print(f"\nMLP adapters: ours vs PEFT max |Δ logit| {np.abs(ours - theirs).max():.2e} (adapters move "
          f"logits by {moved:.2f})")
    assert np.abs(ours - theirs).max() <= 1e-4 and moved > 0.1
    # And an MLP adapter PEFT creates (random A and B) loads here with PEFT's logits.
    torch.manual_seed(1)
    hf = get_peft_model(load_hf(base), LoraConfig(r=2, lora_alpha=5, target_modules=list(MLP),
                                                   init_lora_weights=False))
    hf.save_pretrained(str(tmp_path / "peft"))
    model = dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "peft")
    assert len(adapters(model)) == 9 and not model.lora_config.routed_experts
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - peft_logits(hf.eval())).max() <= 1e-4


def test_routed_expert_adapters_match_peft_reading_our_per_expert_names(tmp_path):
    """PEFT reads our per-expert tensors (the hub's module names) into transformers 5's fused
    experts through its own v4 -> v5 conversion, which reads the MLP names as the routed experts
    only (dense_mlps = false here; the test above checks the dense and shared ones); logits and
    greedy decode (the gathered-expert path) equal PEFT's."""
    base = write_checkpoint(tmp_path / "base", LITE, seed=9)
    model = dsv2_jax.load(base, dtype="float32")
    lora = LoRAConfig(rank=2, alpha=3, target_modules=("q_proj",) + MLP, routed_experts=True,
                      dense_mlps=False)
    names = add_lora(model, lora)
    assert sorted(n for n in names if "mlp" in n) == sorted(
        f"model.layers.{i}.mlp.experts.*.{m}" for i in (1, 2) for m in MLP)
    randomize(model, seed=10)
    ours = np.asarray(model(jnp.asarray(IDS)))
    save_adapter(model, tmp_path / "adapter", lora)
    hf = peft_model(base, tmp_path / "adapter")
    assert any("experts.base_layer.lora_A" in n for n, _ in hf.named_parameters())
    err = np.abs(ours - peft_logits(hf)).max()
    moved = np.abs(ours - np.asarray(dsv2_jax.load(base, dtype="float32")(jnp.asarray(IDS)))).max()
    print(f"\nrouted-expert adapters: ours vs PEFT max |Δ logit| {err:.2e} (move logits by {moved:.2f})")
    assert err <= 1e-4 and moved > 0.1
    back = dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "adapter")
    assert back.lora_config.routed_experts and not back.lora_config.dense_mlps
    assert np.abs(np.asarray(back(jnp.asarray(IDS))) - ours).max() <= 1e-5
    assert_greedy_equals_peft(back, hf, IDS[0], 6)
    # Merged into the base, transformers reads the same model.
    merge(back)
    dsv2_jax.save(back, tmp_path / "merged")
    assert np.abs(hf_forward(load_hf(tmp_path / "merged"), IDS)[0] - ours).max() <= 1e-4


def test_fused_expert_adapter_peft_creates_on_transformers_5_loads_here(tmp_path):
    """PEFT 0.21 on transformers 5 adapts the fused experts (target_parameters gate_up_proj /
    down_proj, experts folded into the rank axis, gate_up at twice the rank, B full, not
    block-diagonal). Random A and B, rsLoRA (alpha / sqrt(R), R per fused parameter): our
    logits, PEFT's scalings and greedy decode equal PEFT's. Such an adapter is for inference
    here: saving it again in the per-module format is refused (its experts' ranks differ)."""
    from peft import LoraConfig, get_peft_model

    base = write_checkpoint(tmp_path / "base", LITE, seed=16)
    torch.manual_seed(2)
    hf = get_peft_model(load_hf(base), LoraConfig(r=2, lora_alpha=3, use_rslora=True,
                                                   target_modules=["q_proj", *MLP],
                                                   init_lora_weights=False))
    hf.save_pretrained(str(tmp_path / "peft"))
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == ["down_proj", "gate_up_proj"]
    model = dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "peft")
    cfg = model.lora_config
    assert cfg.routed_experts and not cfg.dense_mlps
    ours = adapters(model)
    assert sorted(n for n in ours if "mlp" in n) == sorted(
        f"model.layers.{i}.mlp.experts.*.{m}" for i in (1, 2) for m in MLP)
    for name, mod in hf.named_modules():  # PEFT's scaling of each fused parameter is ours
        if type(mod).__name__ == "ParamWrapper":
            proj = {"gate_up_proj": "gate_proj", "down_proj": "down_proj"}[mod.parameter_name]
            layer = name.split(".")[4]
            assert mod.scaling["default"] == pytest.approx(
                ours[f"model.layers.{layer}.mlp.experts.*.{proj}"].scaling)
    got = np.asarray(model(jnp.asarray(IDS)))
    hf.eval()
    err = np.abs(got - peft_logits(hf)).max()
    moved = np.abs(got - np.asarray(dsv2_jax.load(base, dtype="float32")(jnp.asarray(IDS)))).max()
    print(f"\nPEFT fused-expert adapter: ours vs PEFT max |Δ logit| {err:.2e} (moves logits by {moved:.2f})")
    assert err <= 1e-4 and moved > 0.1
    assert_greedy_equals_peft(model, hf, IDS[1], 6)
    with pytest.raises(ValueError, match=r"save_adapter: model.layers.1.mlp.experts.\*.(gate|up)_proj "
                                         r"has rank 4 and scaling .*; the config says rank 2"):
        save_adapter(model, tmp_path / "again", cfg)


def test_bad_lora_settings_and_adapters_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.target_modules = \['qkv'\]: expected names among"):
        LoRAConfig(target_modules=("qkv",))
    with pytest.raises(ConfigError, match=r"lora.routed_experts = true needs an MLP name"):
        LoRAConfig(target_modules=("q_proj",), routed_experts=True)
    with pytest.raises(ConfigError, match=r"lora.dense_mlps = false needs lora.routed_experts"):
        LoRAConfig(target_modules=("up_proj",), dense_mlps=False)
    with pytest.raises(ConfigError, match=r"lora.dropout = 0.1 with lora.routed_experts = true"):
        LoRAConfig(target_modules=("up_proj",), routed_experts=True, dropout=0.1)
    with pytest.raises(ConfigError, match=r"lora.dropout = 1.0: expected 0 <= dropout < 1"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"lora.layers = \[-1\]: expected null or layer indices >= 0"):
        LoRAConfig(layers=(-1,))
    with pytest.raises(ConfigError, match=r"lora.routed_experts = 'yes': expected true or false"):
        LoRAConfig(routed_experts="yes")
    assert LoRAConfig(layers=(3, 1, 3)).layers == (1, 3)
    with pytest.raises(ConfigError, match="lora.rank = 0"):
        LoRAConfig(rank=0)
    base = write_checkpoint(tmp_path / "base", LITE, seed=6)
    model = dsv2_jax.load(base, dtype="float32")
    with pytest.raises(ConfigError, match=r"lora.layers = \[0, 7\]: the model has layers 0 to 2"):
        add_lora(model, LoRAConfig(target_modules=("q_proj",), layers=(0, 7)))
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


def test_lora_dropout_is_inverted_dropout_on_the_adapter_input():
    """PEFT's lora_dropout: y = x W + (dropout(x) A) B · s, inverted (kept values / (1 - p)).
    Checked by hand against the mask drawn from the adapter's key; the drop rate and the
    unbiased mean over keys against their binomial bounds; no key (inference) = no dropout."""
    import jax
    from flax import nnx

    from dsv2_jax.layers import Linear
    from dsv2_jax.lora import LoRA, dropout_mask

    p, s = 0.25, 2.0
    lin = Linear(64, 48, rngs=nnx.Rngs(0))
    lin.lora = LoRA(64, 48, 4, s, rngs=nnx.Rngs(1), dropout=p)
    lin.lora.lora_b.set_value(jnp.asarray(np.random.default_rng(2).normal(0, 0.1, (4, 48)), jnp.float32))
    x = np.random.default_rng(3).normal(0, 1, (256, 64)).astype(np.float32)
    w, a, b = (np.asarray(v[...], np.float64) for v in (lin.weight, lin.lora.lora_a, lin.lora.lora_b))
    full = x @ w + (x @ a) @ b * s
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), full, atol=1e-5)  # no key
    key = jax.random.key(4)
    lin.lora.dropout_key = jax.random.key_data(key)
    kept = np.asarray(dropout_mask(lin.lora.dropout_key, p, x.shape))
    assert abs((1 - kept.mean()) - p) <= 4 * np.sqrt(p * (1 - p) / kept.size)
    want = x @ w + ((x * kept / (1 - p)) @ a) @ b * s
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), want, atol=1e-5)
    with pytest.raises(ValueError, match="dropout is active"):
        lin.dense_weight(jnp.float32)

    graphdef, state = nnx.split(lin.lora)

    def adapter_out(kd):
        lora = nnx.merge(graphdef, state)
        lora.dropout_key = kd
        return lora(jnp.asarray(x))

    keys = jax.vmap(jax.random.key_data)(jax.random.split(jax.random.key(5), 400))
    outs = np.asarray(jax.jit(jax.vmap(adapter_out))(keys), np.float64)
    exact = (x @ a) @ b * s
    # mean over 400 draws: within 5 standard errors of the no-dropout adapter, per element
    se = outs.std(axis=0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(axis=0) - exact) <= 5 * se + 1e-6)
    assert np.abs(outs[0] - exact).max() > 0.1


def test_lora_dropout_in_the_training_forward(tmp_path):
    """With dropout keys set (the training step does it per micro-batch) the adapters on
    q_proj and kv_b_proj drop (kv_b_proj then runs as a Linear on c_kv, not folded into the
    weight); remat recomputes the same masks; without keys the model is the plain adapted one."""
    import jax

    from dsv2_jax.lora import set_dropout_keys
    from dsv2_jax.training.step import attention_mask, train_forward

    base = write_checkpoint(tmp_path / "base", LITE, seed=14)
    model = dsv2_jax.load(base, dtype="float32")
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.3, target_modules=("q_proj", "kv_b_proj")))
    randomize(model, seed=15)
    ids = jnp.asarray(IDS)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    mask = attention_mask(jnp.zeros_like(ids))
    plain = np.asarray(model(ids))
    np.testing.assert_allclose(np.asarray(train_forward(model, ids, pos, mask).logits), plain, atol=1e-5)
    assert set_dropout_keys(model, jax.random.key(0)) == 2 * LITE["num_hidden_layers"]
    dropped = np.asarray(train_forward(model, ids, pos, mask).logits)
    remat = np.asarray(train_forward(model, ids, pos, mask, remat="full").logits)
    assert np.abs(dropped - plain).max() > 0.05
    np.testing.assert_allclose(remat, dropped, atol=1e-5)
    set_dropout_keys(model, jax.random.key(1))
    assert np.abs(np.asarray(train_forward(model, ids, pos, mask).logits) - dropped).max() > 0.05
