"""Loading and saving hub-format checkpoints; every kind of bad input gives a clear error."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dsv2_jax
from dsv2_jax import CheckpointError, ConfigError, HubError
from hf_ref import hf_forward, load_hf
from tiny import LITE, write_checkpoint

IDS = np.random.default_rng(0).integers(2, 512, (2, 16))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("lite"), LITE, seed=1)


@pytest.fixture(scope="module")
def model(ckpt):
    return dsv2_jax.load(ckpt, dtype="float32")


def test_save_load_round_trip_identical_logits(model, tmp_path):
    out = dsv2_jax.save(model, tmp_path / "saved", max_shard_bytes=200_000)  # forces shards
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = dsv2_jax.load(out, dtype="float32")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(IDS))), np.asarray(model(jnp.asarray(IDS))))


def test_saved_folder_loads_in_transformers(model, tmp_path):
    out = dsv2_jax.save(model, tmp_path / "for_hf")
    names = set(load_file(str(out / "model.safetensors")))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # hub per-expert names
    ref = hf_forward(load_hf(out, torch.float32), IDS)[0]
    ours = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(ours - ref).max() <= 1e-4


def test_save_is_atomic_over_an_existing_folder(model, tmp_path, monkeypatch):
    target = dsv2_jax.save(model, tmp_path / "m")
    before = sorted(p.name for p in target.iterdir())

    import safetensors.numpy as stn

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(stn, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        dsv2_jax.save(model, target)
    assert sorted(p.name for p in target.iterdir()) == before  # old checkpoint untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_bfloat16_load_keeps_router_float32(ckpt):
    m = dsv2_jax.load(ckpt, dtype="bfloat16")
    assert m.layers[1].self_attn.q_proj.weight[...].dtype == jnp.bfloat16
    assert m.layers[1].mlp.gate.weight[...].dtype == jnp.float32
    assert m.layers[1].mlp.experts_gate_proj.weight[...].shape == (8, 64, 32)


def _copy(ckpt, tmp_path, edit):
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_missing_tensor_is_named(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight.*missing"):
        dsv2_jax.load(d)


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path, lambda t: t.update({"model.layers.9.foo.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.foo\.weight'"):
        dsv2_jax.load(d)


def test_wrong_shape_names_tensor_file_and_shapes(ckpt, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((128, 31), np.float32)

    d = _copy(ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        dsv2_jax.load(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "kv_b_proj.weight" in msg
    assert "[128, 31]" in msg and "[128, 32]" in msg


def test_wrong_expert_shape(ckpt, tmp_path):
    def edit(t):
        t["model.layers.1.mlp.experts.0.gate_proj.weight"] = np.zeros((31, 64), np.float32)

    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight.*\[31, 64\].*\[32, 64\]"):
        dsv2_jax.load(_copy(ckpt, tmp_path, edit))


def test_truncated_file(ckpt, tmp_path):
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        dsv2_jax.load(d)


def test_no_weights_in_folder(ckpt, tmp_path):
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="expected model.safetensors"):
        dsv2_jax.load(tmp_path)


def test_bad_config_values(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    for key, value, pattern in [
        ("model_type", "llama", "model_type is 'llama'"),
        ("num_experts_per_tok", 9, "num_experts_per_tok = 9"),
        ("topk_method", "magic", "topk_method = 'magic'"),
        ("scoring_func", "sigmoid", "scoring_func"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ConfigError, match=pattern):
            dsv2_jax.load(tmp_path)
    bad = {**cfg, "topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="n_group = 3.*must divide n_routed_experts"):
        dsv2_jax.load(tmp_path)
    missing = {k: v for k, v in cfg.items() if k != "kv_lora_rank"}
    (tmp_path / "config.json").write_text(json.dumps(missing))
    with pytest.raises(ConfigError, match="required key 'kv_lora_rank' is missing"):
        dsv2_jax.load(tmp_path)


def test_unreachable_repo_id_names_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubError, match="deepseek-ai/DeepSeek-V2-Lite.*could not be reached"):
        dsv2_jax.load("deepseek-ai/DeepSeek-V2-Lite")


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        dsv2_jax.load(str(tmp_path / "nope"))


def test_transformers5_fused_expert_names_load(ckpt, model, tmp_path):
    """Checkpoints written by transformers 5 store experts fused; they load too."""
    i = LITE["moe_intermediate_size"]

    def fuse(t):
        for layer in (1, 2):
            p = f"model.layers.{layer}.mlp.experts"
            g = [t.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)]
            u = [t.pop(f"{p}.{e}.up_proj.weight") for e in range(8)]
            d = [t.pop(f"{p}.{e}.down_proj.weight") for e in range(8)]
            t[f"{p}.gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(g, u)])
            t[f"{p}.down_proj"] = np.stack(d)
            assert t[f"{p}.gate_up_proj"].shape == (8, 2 * i, 64)

    m = dsv2_jax.load(_copy(ckpt, tmp_path, fuse), dtype="float32")
    np.testing.assert_array_equal(np.asarray(m(jnp.asarray(IDS))), np.asarray(model(jnp.asarray(IDS))))
