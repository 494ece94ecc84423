"""Text generation over the latent KV cache.

Prompts are left-padded to a bucketed length (so a new prompt length rarely compiles again),
prefilled in chunks with materialised MLA, then decoded in latent space (absorbed MLA) inside
one ``lax.while_loop`` on the device. Rows of a batch keep their own positions and masks, so
each row gives what it would give alone.

Example::

    import dsv2_jax
    model = dsv2_jax.load("path/to/model")
    out = dsv2_jax.generate(model, prompts=["ROMEO:"], max_new_tokens=40)
    print(out.texts[0], out.decode_tokens_per_s)
    for piece in dsv2_jax.stream(model, prompts=["ROMEO:"], max_new_tokens=40):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cache import KVCache, init_cache
from .mla import AttentionMode
from .sampling import (
    SamplerVariant,
    SamplingParams,
    SamplingValues,
    mark_seen,
    sample_traced,
    seen_mask_from_tokens,
)
from .tokenizer import StreamDecoder

PREFILL_CHUNK = 512  # prompt tokens per row and prefill call (at most)
PREFILL_TOKENS = 16384  # prompt tokens per prefill call over the whole batch (at most): bounds the
# activations of a chunk (V2-Lite's MoE over 64 rows x 512 tokens held 55 GiB, H200 compile)
MIN_BUCKET = 16  # prompts are padded to a power of two >= this (then to multiples of the chunk)
CACHE_BUCKET = 128  # cache lengths are rounded up to a multiple of this
MIN_NEW_BUCKET = 16  # max_new_tokens is rounded up to a power of two >= this


@dataclasses.dataclass
class GenerationResult:
    texts: list[str] | None  # decoded new text per row (None without a tokenizer)
    token_ids: list[list[int]]  # new tokens per row (EOS and stop tokens excluded)
    prompt_ids: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop" or "length"
    prefill_s: float
    decode_s: float
    compiled: bool  # this call compiled prefill or decode: its timings include compilation
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def new_tokens_bucket(n: int) -> int:
    """The token buffer and cache room for ``max_new_tokens`` = n: a power of two >= 16, so
    that another ``max_new_tokens`` rarely compiles again (the loop stops at n itself)."""
    return max(MIN_NEW_BUCKET, 1 << (n - 1).bit_length())


def prefill_chunk(batch: int, padded_len: int) -> int:
    """Prompt tokens per row in each prefill call: ``PREFILL_CHUNK``, halved until the batch's
    chunk is at most ``PREFILL_TOKENS`` tokens (a power of two >= 16, so it divides the padded
    prompt length), and no more than the prompt."""
    rows = max(MIN_BUCKET, PREFILL_TOKENS // max(batch, 1))
    return min(padded_len, PREFILL_CHUNK, 1 << (rows.bit_length() - 1))


def bucket_length(n: int) -> int:
    """Padded prompt length: powers of two up to the chunk, then multiples of the chunk."""
    if n <= PREFILL_CHUNK:
        return max(MIN_BUCKET, 1 << (n - 1).bit_length())
    return -(-n // PREFILL_CHUNK) * PREFILL_CHUNK


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the on-device decode loop carries from one step to the next (a pytree)."""

    cache: KVCache
    logits: jax.Array  # [B, V] float32: the next token's logits
    key: jax.Array  # PRNG key
    tokens: jax.Array  # [B, new_tokens_bucket(max_new)] int32: the tokens sampled so far
    done: jax.Array  # [B] bool: the row has finished (EOS)
    step: jax.Array  # int32: tokens sampled so far (per row)
    slot: jax.Array  # int32: the cache slot the next token is written to
    pad: jax.Array  # [B] int32: left padding of each row
    max_new: jax.Array  # int32: tokens to sample per row (the loop stops there)
    seen: jax.Array | None = None  # [B, V] bool: tokens seen (for the repetition penalty)

    def replace(self, **changes) -> DecodeState:
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)], meta_fields=[])


# ---------------------------------------------------------------------------
# jitted pieces (graphdef static: compiled once per model structure and shape)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "attend_len"), donate_argnames=("cache",))
def _prefill_chunk(graphdef, state, ids, pad, cache, start, *, mode: AttentionMode, attend_len: int):
    """Prompt tokens ``ids`` [B, C] at cache slots ``start + [0, C)`` of left-padded rows.

    Positions and the mask come from ``(start, pad)`` on the device (no [B, C, S] host array):
    slot j is seen by query slot i when ``pad <= j <= i``; ``SELF`` (the first chunk) attends
    over the chunk alone, ``CACHE`` over the first ``attend_len`` cache slots (a power of two
    covering the slots filled so far: a few compiled shapes, and neither the expansion through
    ``kv_b_proj`` nor the attention runs over the empty rest of the cache)."""
    model = nnx.merge(graphdef, state)
    c = ids.shape[1]
    positions = jnp.maximum(start + jnp.arange(c)[None, :] - pad[:, None], 0)  # [B, C]
    self_only = mode is AttentionMode.SELF  # the first chunk: start is 0, keys are the chunk
    real = jnp.arange(c if self_only else attend_len)[None, :] >= pad[:, None]  # [B, keys]
    out = model.forward(ids, positions, real, cache=cache, cache_index=start, mode=mode,
                        attend_len=None if self_only else attend_len, logits_slice=slice(-1, None))
    return out.logits[:, 0], out.cache


def _decode_logits(model, cache: KVCache, token, slot, pad, kv_b):
    """One absorbed-MLA step for tokens [B] at cache slot ``slot`` (``kv_b``: the model's
    ``absorbed_weights()``)."""
    real = jnp.arange(cache.max_len)[None, :] >= pad[:, None]  # [B, S]: not left padding
    out = model.forward(token[:, None], (slot - pad)[:, None], real, cache=cache, cache_index=slot,
                        mode=AttentionMode.LATENT, kv_b=kv_b)
    return out.logits[:, 0], out.cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def absorbed_weights(graphdef, state) -> tuple[jax.Array, ...]:
    """``DeepseekV2.absorbed_weights`` of the split model: computed once per generate / stream
    call and passed to every decode step (an AWQ ``kv_b_proj`` is not dequantized per step)."""
    return nnx.merge(graphdef, state).absorbed_weights()


def _sample(variant: SamplerVariant, vocab_limit: int, eos_id: int, ignore_eos: bool,
            values: SamplingValues, carry: DecodeState) -> tuple[DecodeState, jax.Array]:
    """Sample one token per row from the carried logits and record it: (carry, tokens [B])."""
    logits = carry.logits
    if vocab_limit < logits.shape[-1]:  # ids the tokenizer cannot decode are never sampled
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    key, sub = jax.random.split(carry.key)
    token = sample_traced(logits, sub, variant, values, carry.seen)
    done = carry.done
    token = jnp.where(done, eos_id, token).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(carry.tokens, token[:, None], carry.step, axis=1)
    if not ignore_eos:
        done = done | (token == eos_id)
    seen = mark_seen(carry.seen, token) if carry.seen is not None else None
    return carry.replace(key=key, tokens=tokens, done=done, step=carry.step + 1, seen=seen), token


def _loop_body(graphdef, variant: SamplerVariant, vocab_limit: int, eos_id: int, ignore_eos: bool,
               state, values: SamplingValues, kv_b, carry: DecodeState) -> DecodeState:
    """Sample one token per row and compute the logits that follow it."""
    carry, token = _sample(variant, vocab_limit, eos_id, ignore_eos, values, carry)
    logits, cache = _decode_logits(nnx.merge(graphdef, state), carry.cache, token, carry.slot, carry.pad, kv_b)
    return carry.replace(cache=cache, logits=logits, slot=carry.slot + 1)


def _last_sample(variant, vocab_limit, eos_id, ignore_eos, values, carry: DecodeState) -> DecodeState:
    """The last token of a loop, sampled with no forward after it (its logits would go
    unused); nothing changes if every row had already finished. The cache passes through
    untouched: a ``lax.cond`` or ``where`` over it would make XLA keep a second copy."""
    out, _ = _sample(variant, vocab_limit, eos_id, ignore_eos, values, carry)
    more = (carry.step < carry.max_new) & ~jnp.all(carry.done)
    pick = lambda new, old: None if new is None else jnp.where(more, new, old)  # noqa: E731
    return carry.replace(**{f: pick(getattr(out, f), getattr(carry, f))
                            for f in ("key", "tokens", "done", "step", "seen")})


_STATIC = ("graphdef", "variant", "vocab_limit", "eos_id", "ignore_eos")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("carry",))
def _decode_loop(graphdef, state, values, carry, *, variant, vocab_limit, eos_id, ignore_eos):
    """Tokens until ``max_new`` or every row is done: each but the last followed by a forward
    (``max_new`` tokens cost ``max_new - 1`` forwards after the prefill)."""
    # kv_b_proj as the absorbed attention uses it, once for the whole loop (loop-invariant)
    kv_b = nnx.merge(graphdef, state).absorbed_weights()
    body = functools.partial(_loop_body, graphdef, variant, vocab_limit, eos_id, ignore_eos, state, values, kv_b)
    cond = lambda c: (c.step < c.max_new - 1) & ~jnp.all(c.done)  # noqa: E731
    carry = jax.lax.while_loop(cond, body, carry)
    return _last_sample(variant, vocab_limit, eos_id, ignore_eos, values, carry)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("carry",))
def decode_step(graphdef, state, values, kv_b, carry, *, variant, vocab_limit, eos_id, ignore_eos):
    """One decode step (the streaming path); compiled once per shape, whatever the step.
    ``kv_b``: :func:`absorbed_weights`, computed once per stream."""
    return _loop_body(graphdef, variant, vocab_limit, eos_id, ignore_eos, state, values, kv_b, carry)


@functools.partial(jax.jit, static_argnames=_STATIC[1:], donate_argnames=("carry",))
def last_step(values, carry, *, variant, vocab_limit, eos_id, ignore_eos):
    """The streaming path's last token: sampled, with no forward after it."""
    return _last_sample(variant, vocab_limit, eos_id, ignore_eos, values, carry)


# ---------------------------------------------------------------------------
# host side


def _prompt_ids(model, tokenizer, prompts, messages, prompt_ids, add_bos) -> list[list[int]]:
    given = [x is not None for x in (prompts, messages, prompt_ids)]
    if sum(given) != 1:
        raise ValueError("generate: pass exactly one of prompts=, messages= or prompt_ids=")
    if prompt_ids is not None:
        if prompt_ids and isinstance(prompt_ids[0], (int, np.integer)):
            prompt_ids = [prompt_ids]
        rows = [[int(i) for i in row] for row in prompt_ids]
    else:
        if tokenizer is None:
            raise ValueError("generate: prompts=/messages= need a tokenizer (the model folder had "
                             "none); pass tokenizer= or prompt_ids=")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            rows = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
        else:
            convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            rows = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
                    for c in convs]
    if not rows:
        raise ValueError("generate: no prompts given (an empty list); pass at least one")
    vocab = model.config.vocab_size
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"generate: prompt {b} is empty")
        bad = [i for i in row if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"generate: prompt {b} has token id {bad[0]} outside [0, {vocab})")
    return rows


class _Session:
    """Prefill done, decode state ready: shared by generate() and stream()."""

    def __init__(self, model, tokenizer, rows, max_new_tokens, params, ignore_eos, max_len=None):
        cfg = model.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens}: expected >= 1")
        params.validate()
        self.rows, self.tokenizer, self.max_new = rows, tokenizer, max_new_tokens
        longest = max(len(r) for r in rows)
        limit = max_len or cfg.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context of "
                f"{limit} tokens (max_position_embeddings)")
        b = len(rows)
        p = bucket_length(longest)
        room = new_tokens_bucket(max_new_tokens)
        s = -(-(p + room) // CACHE_BUCKET) * CACHE_BUCKET
        pad = np.array([p - len(r) for r in rows], np.int32)
        ids = np.zeros((b, p), np.int32)
        for i, r in enumerate(rows):
            ids[i, pad[i]:] = r
        self.graphdef, self.state = nnx.split(model)
        cache = init_cache(cfg, b, s, model.dtype)
        eos = cfg.eos_token_id if tokenizer is None else tokenizer.eos_id
        self.values = SamplingValues.of(params)
        self.static = dict(variant=SamplerVariant.of(params), eos_id=int(eos if eos is not None else -1),
                           ignore_eos=bool(ignore_eos or eos is None),
                           vocab_limit=int(min(cfg.vocab_size, tokenizer.vocab_size)
                                           if tokenizer is not None else cfg.vocab_size))
        t0 = time.perf_counter()
        compiled_before = _prefill_chunk._cache_size()
        chunk = prefill_chunk(b, p)
        pad_dev = jnp.asarray(pad)
        for start in range(0, p, chunk):
            # The first chunk has nothing cached before it: it attends over itself alone.
            mode = AttentionMode.SELF if start == 0 else AttentionMode.CACHE
            filled = start + chunk
            attend = min(s, 1 << (filled - 1).bit_length())
            logits, cache = _prefill_chunk(self.graphdef, self.state, jnp.asarray(ids[:, start:start + chunk]),
                                           pad_dev, cache, jnp.int32(start), mode=mode, attend_len=attend)
        logits.block_until_ready()
        self.prefill_s = time.perf_counter() - t0
        self.compiled = _prefill_chunk._cache_size() > compiled_before
        seen = None
        if params.repetition_penalty != 1.0:
            valid = jnp.asarray(np.arange(p)[None, :] >= pad[:, None])
            seen = seen_mask_from_tokens(jnp.asarray(ids), cfg.vocab_size, valid)
        self.carry = DecodeState(
            cache=cache, logits=logits, key=jax.random.key(params.seed),
            tokens=jnp.zeros((b, room), jnp.int32), done=jnp.zeros((b,), bool),
            step=jnp.int32(0), slot=jnp.int32(p), pad=jnp.asarray(pad),
            max_new=jnp.int32(max_new_tokens), seen=seen)
        self.steps_done = 0
        self.kv_b = None  # absorbed_weights, made at the first streamed step

    def run_loop(self):
        t0 = time.perf_counter()
        compiled_before = _decode_loop._cache_size()
        self.carry = _decode_loop(self.graphdef, self.state, self.values, self.carry, **self.static)
        self.carry.tokens.block_until_ready()
        self.decode_s = time.perf_counter() - t0
        self.compiled |= _decode_loop._cache_size() > compiled_before

    def step(self, last: bool = False) -> np.ndarray:
        """One decode step; returns its tokens [B] (one host sync per step). ``last``: the
        final token, with no forward after it."""
        if last:
            self.carry = last_step(self.values, self.carry, **self.static)
        else:
            if self.kv_b is None:
                self.kv_b = absorbed_weights(self.graphdef, self.state)
            self.carry = decode_step(self.graphdef, self.state, self.values, self.kv_b, self.carry,
                                     **self.static)
        self.steps_done += 1  # counted on the host: reading carry.step would sync again
        return np.asarray(self.carry.tokens[:, self.steps_done - 1])


def _real_tokens(tokens: np.ndarray, eos_id: int, ignore_eos: bool) -> int:
    """Tokens the rows really produced, each up to and including its EOS: a finished row's
    EOS filler, sampled while other rows went on, does not count as decoded."""
    if ignore_eos:
        return int(tokens.size)
    hit = tokens == eos_id
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1])
    return int(first.sum())


def _finish(rows, tokens, steps, eos_id, ignore_eos, tokenizer, stop) -> tuple[list, list, list]:
    out_ids, texts, reasons = [], [] if tokenizer else None, []
    for b in range(len(rows)):
        row = [int(t) for t in tokens[b, :steps]]
        reason = "length"
        if not ignore_eos and eos_id in row:
            row = row[: row.index(eos_id)]
            reason = "eos"
        if tokenizer is not None:
            text = tokenizer.decode(row)
            if stop:
                cut = [text.find(s) for s in stop if s and text.find(s) >= 0]
                if cut:
                    text = text[: min(cut)]
                    # keep the tokens whose text lies before the stop string
                    while row and len(tokenizer.decode(row)) > len(text):
                        row = row[:-1]
                    reason = "stop"
            texts.append(text)
        out_ids.append(row)
        reasons.append(reason)
    return out_ids, texts, reasons


def generate(model, tokenizer=None, *, prompts: str | Sequence[str] | None = None,
             messages=None, prompt_ids=None, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int = 0, stop: Sequence[str] | None = None,
             ignore_eos: bool = False, add_bos: bool = True) -> GenerationResult:
    """Generate for a batch of prompts (text, chat messages, or token ids).

    Greedy when ``temperature`` is 0. Each row stops at EOS (unless ``ignore_eos``), at any of
    the ``stop`` strings, or after ``max_new_tokens``. The tokenizer defaults to the one loaded
    with the model. Returns texts, new token ids and prefill/decode throughput.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    rows = _prompt_ids(model, tokenizer, prompts, messages, prompt_ids, add_bos)
    sess = _Session(model, tokenizer, rows, max_new_tokens, params, ignore_eos)
    sess.run_loop()
    steps = int(sess.carry.step)
    tokens = np.asarray(sess.carry.tokens)
    ids, texts, reasons = _finish(rows, tokens, steps, sess.static["eos_id"],
                                  sess.static["ignore_eos"], tokenizer, stop)
    n_prompt = sum(len(r) for r in rows)
    n_new = _real_tokens(tokens[:, :steps], sess.static["eos_id"], sess.static["ignore_eos"])
    return GenerationResult(
        texts=texts, token_ids=ids, prompt_ids=rows, finish_reasons=reasons,
        prefill_s=sess.prefill_s, decode_s=sess.decode_s, compiled=sess.compiled,
        prefill_tokens_per_s=n_prompt / max(sess.prefill_s, 1e-9),
        decode_tokens_per_s=n_new / max(sess.decode_s, 1e-9),
    )


def stream(model, tokenizer=None, *, prompts=None, messages=None, prompt_ids=None,
           max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
           stop: Sequence[str] | None = None, ignore_eos: bool = False, add_bos: bool = True,
           stats: dict | None = None, interrupted: Callable[[], bool] | None = None) -> Iterator[str]:
    """Yield text pieces of one prompt as tokens arrive (one jitted step per token).

    Pass a dict as ``stats`` to receive token ids, finish reason and timings at the end.
    ``interrupted`` (e.g. ``threading.Event().is_set``) is asked before each step; once it
    returns True the stream flushes what it holds and ends (finish reason ``"interrupted"``),
    also through tokens that print nothing. Bad arguments raise here, before the first piece.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("stream: needs a tokenizer to produce text; use generate(prompt_ids=...)")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    rows = _prompt_ids(model, tokenizer, prompts, messages, prompt_ids, add_bos)
    if len(rows) != 1:
        raise ValueError(f"stream: takes one prompt, got {len(rows)}; use generate() for batches")
    sess = _Session(model, tokenizer, rows, max_new_tokens, params, ignore_eos)
    # Validation and prefill happen here, at the call; the pieces come from the generator.
    return _stream_pieces(sess, tokenizer, rows, max_new_tokens, stop, stats, interrupted)


def _stream_pieces(sess, tokenizer, rows, max_new_tokens, stop, stats, interrupted) -> Iterator[str]:
    dec = StreamDecoder(tokenizer)
    eos, text, held, new_ids, reason = sess.static["eos_id"], "", "", [], "length"
    stop = [s for s in (stop or []) if s]
    compiled_before = decode_step._cache_size() + last_step._cache_size()
    t0 = time.perf_counter()
    t_first = None  # end of the first step, which may include compiling the step
    for i in range(max_new_tokens):
        if interrupted is not None and interrupted():
            reason = "interrupted"
            break
        token = int(sess.step(last=i == max_new_tokens - 1)[0])
        t_first = t_first or time.perf_counter()
        if token == eos and not sess.static["ignore_eos"]:
            reason = "eos"
            break
        new_ids.append(token)
        piece = dec.push(token)
        text += piece
        held += piece
        hits = [text.find(s) for s in stop if text.find(s) >= 0]
        if hits:
            cut = min(hits)
            already = len(text) - len(held)
            if cut > already:
                yield text[already:cut]
            reason, held = "stop", ""
            break
        # hold back a tail that could still grow into a stop string
        keep = max((len(s) - 1 for s in stop), default=0)
        if len(held) > keep:
            emit = held[: len(held) - keep] if keep else held
            held = held[len(emit):]
            yield emit
    if reason != "stop":
        held += dec.flush()
    if held:
        yield held
    end = time.perf_counter()
    decode_compiled = decode_step._cache_size() + last_step._cache_size() > compiled_before
    if stats is not None:
        # With a compiled first step, the rate is that of the steps after it (steady state).
        steps, span = ((len(new_ids) - 1, end - t_first) if decode_compiled and len(new_ids) > 1
                       else (len(new_ids), end - t0))
        stats.update(token_ids=new_ids, prompt_ids=rows[0], finish_reason=reason,
                     prefill_s=sess.prefill_s, decode_s=end - t0,
                     compiled=sess.compiled or decode_compiled,
                     prefill_tokens_per_s=len(rows[0]) / max(sess.prefill_s, 1e-9),
                     decode_tokens_per_s=steps / max(span, 1e-9))
