"""Next-token sampling: repetition penalty, temperature, top-k, top-p, min-p.

Pure jnp functions over a batch of logits [B, V]. `SamplingParams` is a frozen dataclass of
plain Python values that a user passes. Inside the generation loop it splits in two: a small
static `SamplerVariant` (greedy or not; whether top-k / top-p need a sort; whether a repetition
penalty needs the seen-token mask) that picks the compiled code, and `SamplingValues`, the
numbers themselves as traced arrays, so a new temperature, top-p, top-k, min-p, penalty or seed
runs the same compiled loop. The order of operations is Hugging Face's: repetition penalty,
then temperature, top-k, top-p, min-p, then a categorical draw.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from dsv2_jax.sampling import SamplingParams, sample
    >>> params = SamplingParams(temperature=0.7, top_p=0.9, seed=0)
    >>> logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
    >>> sample(logits, params.key(), params).shape
    (1,)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from . import backend

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are greedy decoding with no filters.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of tokens whose probability sums to >= top_p (1.0 = off).
    min_p: keep tokens with probability >= min_p * the top token's probability (0 = off).
    repetition_penalty: CTRL/HF penalty on tokens already in prompt or output (1.0 = off).
    seed: seeds `key()`, the PRNG key a generation loop starts from.

    Invalid values raise ValueError at construction (see `validate`).

    Example:
        >>> SamplingParams(temperature=0.6, top_p=0.95, seed=1)
        SamplingParams(temperature=0.6, top_k=0, top_p=0.95, min_p=0.0, repetition_penalty=1.0, seed=1)
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first bad argument; return self when all are valid."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> jax.Array:
        """`jax.random.key(seed)`: the key a generation loop splits one subkey per step from."""
        return jax.random.key(self.seed)


def apply_repetition_penalty(logits: jax.Array, seen_mask: jax.Array, penalty: float) -> jax.Array:
    """Penalize tokens already seen (CTRL rule, as HF): positive logits / penalty, negative * penalty.

    logits [B, V] float, seen_mask [B, V] bool (token appears in the prompt or the output so far).

    Example:
        >>> apply_repetition_penalty(jnp.array([[2.0, -2.0, 1.0]]), jnp.array([[True, True, False]]), 2.0)
        Array([[ 1., -4.,  1.]], dtype=float32)
    """
    # Dividing a negative logit would raise it, so negatives are multiplied instead.
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen_mask, penalized, logits)


def _top_p_threshold(sorted_desc: jax.Array, top_p) -> jax.Array:
    """Smallest logit of the nucleus, given each row's logits sorted descending. Returns [B, 1]."""
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A token is in the nucleus when the mass strictly above it is still < top_p; that keeps the
    # smallest prefix reaching top_p, and always the top token (its mass above is 0).
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_above < top_p, axis=-1, keepdims=True)  # >= 1
    return jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)


@dataclasses.dataclass(frozen=True)
class SamplerVariant:
    """The static part of a sampler: which code the compiled loop contains."""

    greedy: bool  # argmax: no temperature, filters or draw
    sort: bool  # top-k or top-p is on: the logits are sorted each step
    penalty: bool  # a repetition penalty: the loop carries the seen-token mask

    @classmethod
    def of(cls, params: SamplingParams) -> "SamplerVariant":
        return cls(greedy=params.greedy, sort=not params.greedy and (params.top_k > 0 or params.top_p < 1),
                   penalty=params.repetition_penalty != 1.0)


@dataclasses.dataclass(frozen=True)
class SamplingValues:
    """The traced part of a sampler: scalars (float32 / int32 arrays), a pytree."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def of(cls, params: SamplingParams) -> "SamplingValues":
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return cls(f32(params.temperature), jnp.asarray(params.top_k, jnp.int32), f32(params.top_p),
                   f32(params.min_p), f32(params.repetition_penalty))


jax.tree_util.register_dataclass(
    SamplingValues, data_fields=["temperature", "top_k", "top_p", "min_p", "repetition_penalty"],
    meta_fields=[])


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Apply top-k, then top-p, then min-p (HF's order) to already temperature-scaled logits."""
    return _filter(logits, SamplerVariant.of(params), SamplingValues.of(params))


def _filter(logits: jax.Array, variant: SamplerVariant, v: SamplingValues) -> jax.Array:
    """:func:`filter_logits` with traced values: top-k's k and top-p's p need no recompile."""
    if variant.sort:
        vocab = logits.shape[-1]
        sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
        k = jnp.where((v.top_k <= 0) | (v.top_k >= vocab), vocab, v.top_k)
        in_top_k = jnp.arange(vocab) < k
        # Ties with the k-th value are all kept (HF's TopKLogitsWarper); the nucleus is taken
        # within the top-k set, over the probabilities of those k alone.
        kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
        nucleus = _top_p_threshold(jnp.where(in_top_k, sorted_desc, NEG_INF), v.top_p)
        threshold = jnp.where(v.top_p >= 1, kth, jnp.maximum(kth, nucleus))
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    # min-p compares with the top token, which every filter keeps, so its place in the order
    # only matters through what top-k/top-p already removed. min_p = 0: log 0 = -inf, no-op.
    max_logit = jnp.max(logits, axis=-1, keepdims=True)
    cut = jnp.where(v.min_p > 0, jnp.log(jnp.maximum(v.min_p, 1e-30)), NEG_INF)
    return jnp.where(logits - max_logit < cut, NEG_INF, logits)


def sample(
    logits: jax.Array,
    key: jax.Array,
    params: SamplingParams,
    seen_mask: jax.Array | None = None,
) -> jax.Array:
    """Pick one token per row of logits [B, V]; returns int32 ids [B].

    Greedy (argmax) when `params.temperature == 0`, else temperature, filters and a categorical
    draw with `key`. The repetition penalty applies in both modes and needs `seen_mask` [B, V].

    Example:
        >>> sample(jnp.array([[0.1, 3.0, 0.2]]), jax.random.key(0), SamplingParams())
        Array([1], dtype=int32)
    """
    return sample_traced(logits, key, SamplerVariant.of(params), SamplingValues.of(params), seen_mask)


def greedy(logits: jax.Array) -> jax.Array:
    """The index of each row's largest logit (the lowest index among ties), int32 [...].

    On the CPU ``lax.top_k(·, 1)`` (XLA's TopK routine) finds it 2-3x faster than ``argmax``'s
    variadic (value, index) reduce over a 32K vocabulary (0.24 vs 0.46 ms at batch 8), with
    the same tie rule; GPUs keep ``argmax``."""
    if backend.on_gpu():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.top_k(logits, 1)[1][..., 0].astype(jnp.int32)


def sample_traced(logits: jax.Array, key: jax.Array, variant: SamplerVariant,
                  values: SamplingValues, seen_mask: jax.Array | None = None) -> jax.Array:
    """:func:`sample` with ``variant`` static and ``values`` traced (inside jit)."""
    logits = logits.astype(jnp.float32)
    if variant.penalty:
        if seen_mask is None:
            raise ValueError("repetition_penalty != 1 needs seen_mask [B, V] (tokens in prompt and output)")
        logits = apply_repetition_penalty(logits, seen_mask, values.repetition_penalty)
    if variant.greedy:
        return greedy(logits)
    logits = _filter(logits / values.temperature, variant, values)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def seen_mask_from_tokens(tokens: jax.Array, vocab_size: int, valid: jax.Array | None = None) -> jax.Array:
    """[B, V] bool mask of the ids present in tokens [B, T]; `valid` [B, T] bool excludes padding.

    Example:
        >>> seen_mask_from_tokens(jnp.array([[2, 0]]), 4)
        Array([[ True, False,  True, False]], dtype=bool)
    """
    batch = tokens.shape[0]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], tokens.shape)
    hit = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
    # .max so a padded position never clears a real hit on the same id.
    return jnp.zeros((batch, vocab_size), bool).at[rows, tokens].max(hit)


def mark_seen(seen_mask: jax.Array, token: jax.Array) -> jax.Array:
    """Add the just-sampled ids token [B] to seen_mask [B, V]."""
    return seen_mask.at[jnp.arange(seen_mask.shape[0]), token].set(True)
