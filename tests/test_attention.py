"""Blockwise attention (dsv2_jax.attention) against a NumPy softmax over the dense mask; a long
training forward (blockwise inside MLA) against the materialised one; MLA over the latent cache
(a prefill chunk block by block, a decode step over the filled blocks only) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv2_jax import DeepseekV2, DeepseekV2Config
from dsv2_jax import mla as mla_mod
from dsv2_jax.attention import SegmentMask, blockwise_attention
from dsv2_jax.cache import LayerCache
from dsv2_jax.model import slot_mask
from dsv2_jax.rope import cos_sin
from dsv2_jax.training.step import train_forward
from tiny import LITE


def numpy_attention(q_nope, q_pe, k_nope, k_pe, v, segments, scale):
    t = q_nope.shape[1]
    s = np.einsum("btnd,bsnd->bnts", q_nope, k_nope) + np.einsum("btnd,bsd->bnts", q_pe, k_pe)
    allowed = np.tril(np.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    s = np.where(allowed[:, None], s * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)


def segments_of(t, rng, b=2):
    """Packed rows: documents of random lengths (a row may hold one long document)."""
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False)) if t > 1 else []
        rows.append(np.searchsorted(cuts, np.arange(t), side="right"))
    return np.stack(rows).astype(np.int32)


def packed_row(layers: int, t: int):
    """A random tiny model (LITE with ``layers`` layers) and one packed row of t tokens:
    (model, ids [1, T], segments [1, T], positions [1, T] restarting in each document)."""
    cfg = DeepseekV2Config.from_dict(dict(LITE, num_hidden_layers=layers, max_position_embeddings=4096,
                                          rope_scaling=None))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (1, t)), jnp.int32)
    segments = segments_of(t, rng, 1)
    positions = np.concatenate([np.arange(n) for n in np.bincount(segments[0])])[None]
    return DeepseekV2(cfg, rngs=nnx.Rngs(0)), ids, jnp.asarray(segments), jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("t, block", [(1, 4), (7, 4), (512, 128), (4096, 512)])
def test_blockwise_equals_dense_softmax_with_document_masks(t, block):
    rng = np.random.default_rng(t)
    b, nh, dn, dr, dv = 2, 2, 16, 8, 16
    q_nope, k_nope = (rng.standard_normal((b, t, nh, dn)).astype(np.float32) for _ in range(2))
    q_pe = rng.standard_normal((b, t, nh, dr)).astype(np.float32)
    k_pe = rng.standard_normal((b, t, dr)).astype(np.float32)
    v = rng.standard_normal((b, t, nh, dv)).astype(np.float32)
    segments = segments_of(t, rng, b)
    got = jax.jit(blockwise_attention, static_argnames=("scale", "block"))(
        *(jnp.asarray(a) for a in (q_nope, q_pe, k_nope, k_pe, v)), SegmentMask(jnp.asarray(segments)),
        scale=0.2, block=block)
    want = numpy_attention(q_nope, q_pe, k_nope, k_pe, v, segments, 0.2)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_long_training_forward_and_gradient_equal_the_materialised_form():
    """T = 1,100 > mla.BLOCK: the train step's forward runs blockwise; the logits and the
    gradients equal model.forward with the dense [B, T, T] mask."""
    model, ids, segments, positions = packed_row(2, 1100)
    mask = SegmentMask(segments)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, blockwise: bool):
        m = nnx.merge(graphdef, params, rest)
        if blockwise:
            logits = train_forward(m, ids, positions, mask).logits
        else:
            logits = m.forward(ids, positions, mask=mask.dense()).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (l1, got), g1 = jax.value_and_grad(loss, has_aux=True)(params, True)
    (l2, want), g2 = jax.value_and_grad(loss, has_aux=True)(params, False)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    assert err <= 1e-5


@pytest.mark.parametrize("mode, start, t, block", [("prefill", 1024, 64, 512), ("decode", 700, 1, 1024),
                                                   ("decode", 1500, 1, None)])
def test_attention_over_the_cache_equals_numpy(mode, start, t, block):
    """V2-Lite's attention shapes (16 heads, latent 512, rope 64, nope/v 128), a 2,048-slot cache,
    two rows (the second left-padded by 37). A prefill chunk (materialised, key blocks of 512
    expanded one at a time) and a decode step (absorbed: a loop over the filled 1,024-slot blocks
    while at most half the cache is filled, one pass over all slots after) equal a float64 NumPy
    softmax over the dense mask. The block loops read no block past the filled ones: those
    slots hold NaN and the output stays finite."""
    cfg = DeepseekV2Config.v2_lite(hidden_size=256, rope_scaling=None, max_position_embeddings=4096)
    attn = mla_mod.MLA(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32)
    rng = np.random.default_rng(start)
    b, s_len, pad = 2, 2048, np.array([0, 37])
    c_kv = rng.standard_normal((b, s_len, cfg.kv_lora_rank)).astype(np.float32)
    k_pe = rng.standard_normal((b, s_len, cfg.qk_rope_head_dim)).astype(np.float32)
    c_kv[:, start + t:], k_pe[:, start + t:] = 1e4, -1e4  # read in the last block, masked: must not count
    if block:
        filled_blocks = -(-(start + t) // block) * block
        c_kv[:, filled_blocks:] = np.nan  # past the filled blocks: never read
        k_pe[:, filled_blocks:] = np.nan
    x = jnp.asarray(rng.standard_normal((b, t, cfg.hidden_size)), jnp.float32)
    positions = jnp.asarray(start + np.arange(t)[None] - pad[:, None], jnp.int32)
    cos, sin = cos_sin(cfg, positions)
    real = jnp.asarray(np.arange(s_len)[None] >= pad[:, None])
    cache = LayerCache(jnp.asarray(c_kv), jnp.asarray(k_pe))
    mask = slot_mask(b, t, cache, jnp.int32(start), real)
    form = mla_mod.AttentionMode.CACHE if mode == "prefill" else mla_mod.AttentionMode.LATENT
    got, _ = jax.jit(lambda x, cos, sin, mask, cache: attn.heads(x, cos, sin, mask, cache, jnp.int32(start),
                                                                 form))(x, cos, sin, mask, cache)
    got = np.asarray(got).reshape(b, t, cfg.num_attention_heads, cfg.v_head_dim)
    assert np.isfinite(got).all()

    # NumPy, float64: the new entries written at their slots, keys expanded, softmax over the mask.
    q_nope, q_pe = (np.asarray(a, np.float64) for a in attn.query(x, cos, sin))
    new_ckv, new_kpe = attn.latent(x, cos, sin)
    c_kv[:, start:start + t], k_pe[:, start:start + t] = np.asarray(new_ckv), np.asarray(new_kpe)
    keys = slice(0, start + t)  # every other slot is masked for every query
    w = np.asarray(attn.kv_b_weight(), np.float64)
    kv = np.einsum("bsr,rnd->bsnd", c_kv[:, keys].astype(np.float64), w)
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    scores = np.einsum("btnd,bsnd->bnts", q_nope, k_nope) + np.einsum("btnd,bsd->bnts", q_pe, k_pe[:, keys])
    slots = np.arange(start + t)
    allowed = (slots[None, None] <= (start + np.arange(t))[None, :, None]) & (slots[None, None] >= pad[:, None, None])
    scores = np.where(allowed[:, None], scores * cfg.softmax_scale, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), v)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, err
