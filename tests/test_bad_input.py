"""Bad input, case by case: each gets one clear error naming the file, line, key, tensor or
argument, what was expected and what was found (the README's fault table lists them)."""

import json
import os

import pytest
from safetensors.numpy import load_file, save_file

import dsv2_jax
from dsv2_jax.demo import demo_model_path
from dsv2_jax.errors import CheckpointError, ConfigError, DataError, HubError
from dsv2_jax.training.data import Batches, load_corpus
from tiny import LITE, write_checkpoint


@pytest.fixture(scope="module")
def demo():
    return dsv2_jax.load(demo_model_path())  # bfloat16, as the CLI runs it


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "{path}: empty: no text to train on"),
    ("blank.txt", b"  \n\n\t \n", "{path}: only whitespace: no text to train on"),
    ("latin1.txt", b"caf\xe9 au lait", "{path}: not UTF-8 text ('utf-8' codec can't decode byte 0xe9"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', "{path}:2: not valid JSON"),
    ("roles.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n',
     "{path}:1: messages[1]['role'] must be one of ('system', 'user', 'assistant'), got 'robot'"),
    ("short.txt", b"Too short.", "data.train: 5 tokens make 0 sequences of data.seq_len = 64, fewer than one batch of 2"),
    ("truncated.txt.gz", b"\x1f\x8b\x08\x00\x00\x00", "{path}: not a complete gzip file"),
])
def test_bad_training_data(tmp_path, demo, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        corpus = load_corpus([str(path)], demo.tokenizer)
        Batches(corpus.train, 64, 2, 0, True, name="data.train")
    assert message.format(path=path) in str(e.value)


def test_a_glob_that_matches_nothing(tmp_path, demo):
    with pytest.raises(DataError, match=r"data.train\[0\] = '.*nothing\*.txt': no such file"):
        load_corpus([str(tmp_path / "nothing*.txt")], demo.tokenizer)


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0 (0 = greedy), got -1"),
    (dict(top_p=0), "top_p must be in (0, 1] (1 = off), got 0"),
    (dict(top_k=-2), "top_k must be >= 0 (0 = off), got -2"),
    (dict(min_p=1.5), "min_p must be in [0, 1) (0 = off), got 1.5"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0 (1 = off), got 0"),
    (dict(max_new_tokens=0), "max_new_tokens = 0: expected >= 1"),
    (dict(prompts=[]), "generate: no prompts given"),
    (dict(prompts=None, prompt_ids=[[1, 2, 6000]]), "generate: prompt 0 has token id 6000 outside [0, 6000)"),
    (dict(prompts=None, prompt_ids=[[1, -2]]), "generate: prompt 0 has token id -2 outside [0, 6000)"),
    (dict(prompts=["a", "word " * 3000]),
     "prompt of 3003 tokens + max_new_tokens 4 exceeds the context of 2048 tokens"),
])
def test_bad_generation_arguments(demo, kwargs, message):
    kw = dict(prompts=["ROMEO:"], max_new_tokens=4)
    kw.update(kwargs)
    with pytest.raises(ValueError) as e:
        dsv2_jax.generate(demo, **kw)
    assert message in str(e.value)


def test_a_bf16_batch_mixing_an_empty_and_a_long_prompt(demo):
    """Each row gives what it gives alone. (In bfloat16 on the CPU, any batch of two used to
    crash in the decode loop: XLA's CPU dot rejected the latent-attention einsum.)"""
    prompts = ["", "ROMEO: " * 50]
    both = dsv2_jax.generate(demo, prompts=prompts, max_new_tokens=6)
    alone = [dsv2_jax.generate(demo, prompts=[p], max_new_tokens=6).token_ids[0] for p in prompts]
    assert both.token_ids == alone


def test_stop_strings_empty_or_longer_than_the_output(demo):
    plain = dsv2_jax.generate(demo, prompts=["ROMEO:"], max_new_tokens=8)
    out = dsv2_jax.generate(demo, prompts=["ROMEO:"], max_new_tokens=8,
                            stop=["", "a stop string far longer than anything eight tokens could say"])
    assert out.token_ids == plain.token_ids and out.finish_reasons == ["length"]


# ------------------------------------------------------------------ loading


def test_an_index_naming_a_missing_shard(tmp_path):
    d = write_checkpoint(tmp_path / "m", LITE, shards=2)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file named in the index is missing"):
        dsv2_jax.load(d)


def test_two_shards_holding_the_same_tensor(tmp_path):
    d = write_checkpoint(tmp_path / "m", LITE, shards=2)
    first = load_file(str(d / "model-00001-of-00002.safetensors"))
    second = load_file(str(d / "model-00002-of-00002.safetensors"))
    name = sorted(first)[0]
    second[name] = first[name]
    save_file(second, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError) as e:
        dsv2_jax.load(d)
    assert str(e.value) == (f"{d / 'model-00002-of-00002.safetensors'}: tensor {name!r} is also in "
                            "model-00001-of-00002.safetensors, which the index names for it: two "
                            "shards hold the same tensor")


def test_a_config_whose_dtype_is_unknown(tmp_path):
    d = write_checkpoint(tmp_path / "m", dict(LITE, torch_dtype="float8_weird"))
    with pytest.raises(ConfigError) as e:
        dsv2_jax.load(d)
    assert str(e.value) == (f"{d / 'config.json'}: torch_dtype = 'float8_weird': expected one of "
                            "float32, bfloat16, float16, auto")


def test_awq_group_size_that_disagrees_with_the_tensors(tmp_path):
    from dsv2_jax.quant.quantizer import quantize_checkpoint

    dense = write_checkpoint(tmp_path / "dense", dict(LITE, hidden_size=128, kv_lora_rank=64,
                                                      intermediate_size=128, moe_intermediate_size=64))
    q = quantize_checkpoint(dense, tmp_path / "awq", 32, method="rtn")
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        dsv2_jax.load(q)
    assert "qzeros' has shape" in str(e.value)
    assert ("(config.json's quantization_config.group_size = 64 gives 2 groups; the tensor has 4, "
            "as group_size 32 would)") in str(e.value)
    # A group size that does not even divide a layer's input names the layer.
    small = quantize_checkpoint(write_checkpoint(tmp_path / "d2", LITE), tmp_path / "awq2", 32,
                               method="rtn")
    cfg = json.loads((small / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: quantization_config.group_size = 64 does not "
                                          r"divide the input size 32 of model.layers.0.self_attn.kv_b_proj"):
        dsv2_jax.load(small)


def test_the_offline_hub_error_is_whole(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubError) as e:
        dsv2_jax.load("someone/some-model")
    msg = str(e.value)
    assert msg.startswith("someone/some-model: not a local folder, and the Hugging Face hub could not be reached")
    assert "HF_HUB_OFFLINE=0" in msg and msg.endswith(")")  # not cut mid-word any more
