"""Latent KV cache, absorbed decode and generation against full forwards and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv2_jax
from dsv2_jax import generation as gen
from dsv2_jax.cache import cache_bytes_per_token
from dsv2_jax.sampling import SamplingParams
from hf_ref import load_hf
from tiny import FULL, LITE, YARN, write_checkpoint

CFGS = {"lite": LITE, "full_v2": FULL, "yarn": YARN}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {k: write_checkpoint(tmp_path_factory.mktemp(k), c, seed=11) for k, c in CFGS.items()}


@pytest.fixture(scope="module")
def models(folders):
    return {k: dsv2_jax.load(f, dtype="float32") for k, f in folders.items()}


def _prompt(n, seed=0, vocab=512):
    return [int(x) for x in np.random.default_rng(seed).integers(2, vocab, n)]


@pytest.mark.parametrize("name,prompt_len,steps", [("lite", 13, 12), ("full_v2", 9, 12),
                                                   ("yarn", 58, 14)])
def test_every_absorbed_decode_step_equals_full_forward(models, name, prompt_len, steps):
    """YaRN case: original_max_position_embeddings is 64, decoding runs from 58 to 72."""
    model = models[name]
    prompt = _prompt(prompt_len, seed=1)
    sess = gen._Session(model, None, [prompt], steps, SamplingParams(), ignore_eos=True)
    step_logits = [np.asarray(sess.carry.logits[0])]  # after prefill: predicts token 0
    for _ in range(steps):
        sess.step()
        step_logits.append(np.asarray(sess.carry.logits[0]))
    new = [int(t) for t in np.asarray(sess.carry.tokens[0])]
    full = np.asarray(model(jnp.asarray([prompt + new])))[0]
    for i, got in enumerate(step_logits):
        want = full[prompt_len - 1 + i]
        err = np.abs(got - want).max()
        assert err <= 1e-4, f"{name}: step {i} (position {prompt_len - 1 + i}) differs by {err}"
    assert prompt_len + steps > 64 or name != "yarn"


@pytest.mark.parametrize("name", ["lite", "full_v2"])
def test_greedy_matches_transformers_generate(models, folders, name):
    prompt = _prompt(10, seed=2)
    ours = dsv2_jax.generate(models[name], prompt_ids=[prompt], max_new_tokens=24, ignore_eos=True)
    hf = load_hf(folders[name])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                          eos_token_id=None, pad_token_id=0)
    assert ours.token_ids[0] == ref[0, len(prompt):].tolist()
    assert len(ours.token_ids[0]) == 24


def test_batch_of_different_lengths_equals_single_runs(models):
    model = models["full_v2"]
    prompts = [_prompt(5, 3), _prompt(17, 4), _prompt(11, 5)]
    batch = dsv2_jax.generate(model, prompt_ids=prompts, max_new_tokens=16, ignore_eos=True)
    for p, got in zip(prompts, batch.token_ids):
        alone = dsv2_jax.generate(model, prompt_ids=[p], max_new_tokens=16, ignore_eos=True)
        assert got == alone.token_ids[0]


def test_decode_compiles_once(models):
    model = models["lite"]
    tok = _FakeTok()
    gen.decode_step.clear_cache()
    pieces = list(dsv2_jax.stream(model, tok, prompt_ids=_prompt(7, 6), max_new_tokens=32,
                                  ignore_eos=True))
    assert len("".join(pieces).split()) == 32  # 32 steps ran
    assert gen.decode_step._cache_size() == 1
    # generate(): one while-loop compilation serves prompts of different lengths in a bucket.
    gen._decode_loop.clear_cache()
    for n in (3, 9, 14):
        dsv2_jax.generate(model, prompt_ids=[_prompt(n, n)], max_new_tokens=32, ignore_eos=True)
    assert gen._decode_loop._cache_size() == 1


def test_v2_lite_cache_is_31104_bytes_per_token():
    cfg = dsv2_jax.DeepseekV2Config.v2_lite()
    assert cache_bytes_per_token(cfg, jnp.bfloat16) == 31_104
    shapes = jax.eval_shape(lambda: gen.init_cache(cfg, 2, 8, jnp.bfloat16))
    layers = shapes.layers
    assert len(layers) == 27 and layers[0].c_kv.shape == (2, 8, 512) and layers[0].k_pe.shape == (2, 8, 64)


def test_eos_stops_each_row_and_seed_reproduces(models):
    model = models["lite"]
    p = _prompt(8, 7)
    free = dsv2_jax.generate(model, prompt_ids=[p], max_new_tokens=12, ignore_eos=True)
    eos = free.token_ids[0][4]  # pretend the 5th greedy token is EOS
    cfg = model.config
    object.__setattr__(cfg, "eos_token_id", eos)  # config is frozen; this test's copy only
    try:
        out = dsv2_jax.generate(model, prompt_ids=[p, _prompt(6, 8)], max_new_tokens=12)
    finally:
        object.__setattr__(cfg, "eos_token_id", LITE["eos_token_id"])
    first = free.token_ids[0][: free.token_ids[0].index(eos)]
    assert out.token_ids[0] == first and out.finish_reasons[0] == "eos"
    a = dsv2_jax.generate(model, prompt_ids=[p], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3,
                          ignore_eos=True)
    b = dsv2_jax.generate(model, prompt_ids=[p], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3,
                          ignore_eos=True)
    c = dsv2_jax.generate(model, prompt_ids=[p], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4,
                          ignore_eos=True)
    assert a.token_ids == b.token_ids != c.token_ids


def test_stop_strings_and_bad_arguments(models):
    model = models["lite"]
    tok = _FakeTok()
    p = _prompt(8, 9)
    free = dsv2_jax.generate(model, tok, prompt_ids=[p], max_new_tokens=10, ignore_eos=True)
    words = free.texts[0].split()
    stop = words[3]
    out = dsv2_jax.generate(model, tok, prompt_ids=[p], max_new_tokens=10, ignore_eos=True, stop=[stop])
    assert out.finish_reasons[0] == "stop" and stop not in out.texts[0]
    assert out.texts[0] == free.texts[0][: free.texts[0].find(stop)]
    assert "".join(dsv2_jax.stream(model, tok, prompt_ids=p, max_new_tokens=10, ignore_eos=True,
                                   stop=[stop])) == out.texts[0]
    for kw, pattern in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                        (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
                        (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=pattern):
            dsv2_jax.generate(model, prompt_ids=[p], **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="exceeds the context"):
        dsv2_jax.generate(models["yarn"], prompt_ids=[_prompt(500)], max_new_tokens=100)
    with pytest.raises(ValueError, match="token id 9999 outside"):
        dsv2_jax.generate(model, prompt_ids=[[1, 9999]], max_new_tokens=4)


class _FakeTok:
    """Each id decodes to ' w<id>': stop strings and streaming are easy to check by hand."""

    eos_id, bos_id, vocab_size = 1, 0, 512

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f" w{i}" for i in ids)

    def encode(self, text, add_bos=False):
        return [int(w[1:]) for w in text.split()]

    def token_bytes(self, i):
        return f" w{i}".encode()
