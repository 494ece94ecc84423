"""Latent KV cache, absorbed decode and generation against full forwards and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv2_jax
from dsv2_jax import generation as gen
from dsv2_jax import mla
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
    # Room for one token more: the step that samples the last token skips its forward.
    sess = gen._Session(model, None, [prompt], steps + 1, SamplingParams(), ignore_eos=True)
    step_logits = [np.asarray(sess.carry.logits[0])]  # after prefill: predicts token 0
    for _ in range(steps):
        sess.step()
        step_logits.append(np.asarray(sess.carry.logits[0]))
    new = [int(t) for t in np.asarray(sess.carry.tokens[0, :steps])]
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


def test_new_sampling_settings_and_lengths_do_not_compile_again():
    """Seed, temperature, top-p, top-k, min-p and the penalty are traced; max_new_tokens is
    bucketed. Eight calls that each change one of them, after a warm-up: no backend compile
    (the loop used to compile for every new setting: 10 compiles, 29 s on the demo model)."""
    from dsv2_jax.demo import demo_model_path

    compiles, counting = [], [True]

    def listen(event, duration, **kw):  # listeners cannot be removed: this one stops counting
        if counting[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    model = dsv2_jax.load(demo_model_path())
    base = dict(prompts=["ROMEO:"], max_new_tokens=40, temperature=0.7, top_p=0.9, top_k=50,
                min_p=0.01, repetition_penalty=1.1, seed=0)
    first = dsv2_jax.generate(model, **base)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        outs = [dsv2_jax.generate(model, **dict(base, **change)) for change in (
            dict(seed=1), dict(temperature=1.1), dict(top_p=0.8), dict(top_k=20),
            dict(min_p=0.05), dict(repetition_penalty=1.3), dict(max_new_tokens=33),
            dict(max_new_tokens=64))]
    finally:
        counting[0] = False
    assert len(compiles) <= 2, f"{len(compiles)} backend compiles ({sum(compiles):.1f} s)"
    assert [len(o.token_ids[0]) <= n for o, n in zip(outs, [40] * 6 + [33, 64])] == [True] * 8
    assert len(outs[-1].token_ids[0]) > 40 or outs[-1].finish_reasons[0] != "length"
    # A setting really changes the output: a new seed gives another sample.
    assert outs[0].token_ids != first.token_ids


# (lite without blocks is left out for time: full_v2 takes the same dense paths over the cache)
@pytest.mark.parametrize("name, blocks", [("full_v2", False), ("lite", True)])
def test_prefill_across_chunk_boundaries_equals_the_no_cache_forward(models, monkeypatch, name, blocks):
    """Prompts of 1, 2 and 3 prefill chunks (the chunk made 16 tokens so this stays small),
    left-padded into one batch: the logits after prefill, and of every decode step, equal a
    no-cache forward of each row alone (float32, <= 1e-4). With ``blocks`` the key blocks are
    made 16 slots (24 for decode) too, so later chunks attend block by block and decode loops
    over the filled blocks of the 128-slot cache."""
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 16)
    traced = []
    if blocks:
        monkeypatch.setattr(mla, "BLOCK", 16)
        monkeypatch.setattr(mla, "DECODE_BLOCK", 24)  # not dividing the cache: the last block moves back
        for form in ("_materialised_blocks", "_latent_blocks"):
            original = getattr(mla.MLA, form)
            monkeypatch.setattr(mla.MLA, form, lambda *a, _f=original, _n=form: traced.append(_n) or _f(*a))
        jax.clear_caches()  # the jitted steps were traced with the default blocks
    model = models[name]
    prompts = [_prompt(n, seed=10 + n) for n in (11, 29, 45)]  # padded to 48: 3 chunks of 16
    steps = 4
    sess = gen._Session(model, None, prompts, steps + 1, SamplingParams(), ignore_eos=True)
    assert gen.bucket_length(45) == 48
    logits = [np.asarray(sess.carry.logits)]
    for _ in range(steps):
        sess.step()
        logits.append(np.asarray(sess.carry.logits))
    tokens = np.asarray(sess.carry.tokens)[:, :steps]
    for b, prompt in enumerate(prompts):
        full = np.asarray(model(jnp.asarray([prompt + [int(t) for t in tokens[b]]])))[0]
        for i in range(steps + 1):
            err = np.abs(logits[i][b] - full[len(prompt) - 1 + i]).max()
            assert err <= 1e-4, f"{name}: row {b} ({len(prompt)} tokens), step {i}: {err}"
    if blocks:
        jax.clear_caches()
        assert set(traced) == {"_materialised_blocks", "_latent_blocks"}


def test_prefill_chunks_are_bounded_in_tokens_over_the_batch():
    """512 tokens per row and call, halved until the batch's call holds at most 16,384 tokens;
    a power of two, so it divides every padded prompt length; never more than the prompt."""
    assert [gen.prefill_chunk(b, 4096) for b in (1, 32, 33, 64, 128, 4096)] == [512, 512, 256, 256, 128, 16]
    assert gen.prefill_chunk(1, 64) == 64
    for n in (17, 600, 3000, 32000):
        p = gen.bucket_length(n)
        assert all(p % gen.prefill_chunk(b, p) == 0 for b in (1, 8, 64, 100, 1000))


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_the_last_token_runs_no_forward(models, max_new):
    """N new tokens cost N - 1 decode forwards: the first comes from the prefill's logits and
    the last is sampled with no forward after it. Each forward writes its token's latent to
    the next cache slot, so exactly N - 1 slots after the prompt are filled."""
    model = models["lite"]
    prompt = _prompt(16, 7)
    p = gen.bucket_length(len(prompt))  # decode writes from slot p on
    sess = gen._Session(model, None, [prompt], max_new, SamplingParams(), ignore_eos=True)
    sess.run_loop()
    assert int(sess.carry.step) == max_new
    written = np.abs(np.asarray(sess.carry.cache.layers[0].c_kv[0, p:])).sum(axis=-1) > 0
    assert written.sum() == max_new - 1 and written[: max_new - 1].all()
    # the same tokens as generate(), and as the streaming path (whose last step is sample-only)
    tokens = np.asarray(sess.carry.tokens[0, :max_new]).tolist()
    assert tokens == dsv2_jax.generate(model, prompt_ids=[prompt], max_new_tokens=max_new,
                                       ignore_eos=True).token_ids[0]
    stats = {}
    list(dsv2_jax.stream(model, _FakeTok(), prompt_ids=prompt, max_new_tokens=max_new,
                         ignore_eos=True, stats=stats))
    assert stats["token_ids"] == tokens


def test_stream_ends_when_interrupted(models):
    """``interrupted`` is asked before each step: answering True from the 4th question on ends
    the stream after 3 tokens (the same 3 as an uninterrupted run), finish reason
    "interrupted"; True from the start gives no token at all."""
    model = models["lite"]
    prompt = _prompt(9, 5)
    full = dsv2_jax.generate(model, prompt_ids=[prompt], max_new_tokens=12, ignore_eos=True).token_ids[0]
    asked = []

    def interrupted():
        asked.append(1)
        return len(asked) > 3

    stats = {}
    list(dsv2_jax.stream(model, _FakeTok(), prompt_ids=prompt, max_new_tokens=12, ignore_eos=True,
                         stats=stats, interrupted=interrupted))
    assert stats["finish_reason"] == "interrupted" and stats["token_ids"] == full[:3]
    stats = {}
    assert list(dsv2_jax.stream(model, _FakeTok(), prompt_ids=prompt, max_new_tokens=12,
                                stats=stats, interrupted=lambda: True)) == []
    assert stats["finish_reason"] == "interrupted" and stats["token_ids"] == []
