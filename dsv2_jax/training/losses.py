"""Training losses: next-token cross-entropy and the expert-balance loss (docs/training.md#expert-balance-loss).

Example::

    out = model.forward(ids[:, :-1], attention_mask=mask[:, :-1])
    ce, n_tokens = cross_entropy(out.logits, ids[:, 1:], mask[:, 1:])
    loss = ce + total_balance_loss(out, model.config, *ids[:, :-1].shape, mask=mask[:, :-1])

The training step fuses the last product into the loss instead (``head_cross_entropy``): the
same value from the final hidden states and lm_head's weight, without a [B, T, vocab] array.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .. import backend
from ..moe import Routing


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the tokens where ``loss_mask`` is true.

    logits [B, T, V], targets [B, T] int (already shifted: the target of position t),
    loss_mask [B, T] (bool or 0/1; ``None`` counts every token). Computed in float32.
    Returns ``(loss, n_tokens)``: the float32 mean and the float32 count of masked-in tokens;
    with no token masked in the loss is 0, not NaN.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets: expected shape {logits.shape[:-1]} (logits {logits.shape}), "
                         f"got {targets.shape}")
    logits = logits.astype(jnp.float32)
    # log-sum-exp minus the target's logit, the target picked by a compare with an iota rather
    # than a gather: the gradient (softmax - one-hot) is then one elementwise pass, where a
    # gather's transpose scatters into a zeroed [B, T, V] buffer (bench/train_vs_hf.py).
    hit = jnp.arange(logits.shape[-1]) == targets[..., None]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    mask = _float_mask(loss_mask, targets.shape)
    n = jnp.sum(mask)
    loss = jnp.sum(nll * mask) / jnp.maximum(n, 1.0)
    return loss, n


def _float_mask(loss_mask, shape) -> jax.Array:
    """``loss_mask`` as float32 0/1 of ``shape`` (all ones for None), its shape checked."""
    if loss_mask is None:
        return jnp.ones(shape, jnp.float32)
    if loss_mask.shape != shape:
        raise ValueError(f"loss_mask: expected shape {shape}, got {loss_mask.shape}")
    return loss_mask.astype(jnp.float32)


def head_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                       loss_mask: jax.Array | None = None, *,
                       compute_dtype=None) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy(hidden @ weight, targets, loss_mask)`` without the [B, T, V] logits.

    hidden [B, T, H] (the final norm's output), weight [H, V] (lm_head's), targets and loss_mask
    as in :func:`cross_entropy`; both products run in ``compute_dtype`` (default: hidden's)
    with float32 logits. Returns ``(loss, n_tokens)`` like :func:`cross_entropy`.

    Positions are taken in chunks along T (``head_chunk``): each chunk's logits exist only
    inside one loop iteration, so memory is O(B · chunk · V), not O(B · T · V) (V2-Lite:
    1.6 GiB of float32 logits per 4,096-token sequence, as much again for their gradient).
    Under differentiation the same pass also forms the gradients, which are linear in the
    incoming cotangent: per chunk ``p = softmax - one-hot`` (masked), ``dx = p @ W^T`` and
    ``dW += x^T @ p``, so the backward pass only scales them and nothing is recomputed. On
    this CPU the loss with its gradients takes 164 ms where autodiff of the logits form takes
    363 ms and torch 280 ms (8 × 256 tokens, H 256, V 8,192; bench/train_parts.py).
    """
    if hidden.ndim != 3 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
        raise ValueError(f"head_cross_entropy: expected hidden [B, T, H] and weight [H, V], got "
                         f"{hidden.shape} and {weight.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets: expected shape {hidden.shape[:2]} (hidden {hidden.shape}), "
                         f"got {targets.shape}")
    mask = _float_mask(loss_mask, targets.shape)
    dtype = jnp.dtype(compute_dtype or hidden.dtype)
    n = jnp.sum(mask)
    total = _head_nll_sum(hidden, weight, targets.astype(jnp.int32), mask, dtype)
    return total / jnp.maximum(n, 1.0), n


def head_chunk(batch: int, seq_len: int, vocab: int) -> int:
    """Positions per chunk of :func:`head_cross_entropy`: about 256 rows (batch × chunk) on the
    CPU, where that measured fastest; on a GPU as many rows as 256 MiB of float32 logits hold
    (V2-Lite: 655). Chunks are equalised so that padding T to a whole number of them adds
    fewer than one row per chunk."""
    rows = 256 if not backend.on_gpu() else max(256, (256 << 20) // (4 * vocab))
    chunk = max(1, min(seq_len, rows // max(batch, 1)))
    n_chunks = math.ceil(seq_len / chunk)
    return math.ceil(seq_len / n_chunks)


def _head_pass(x, w, targets, mask, dtype, grads: tuple[bool, bool] | None):
    """The chunk loop: the summed masked NLL and, with ``grads`` (a pair of flags for x and w),
    the gradients of that sum."""
    b, t, h = x.shape
    v = w.shape[1]
    c = head_chunk(b, t, v)
    n = math.ceil(t / c)
    pad = n * c - t
    if pad:  # masked-out filler positions, sliced off the input gradient below
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    wc = w.astype(dtype)
    want_dx, want_dw = grads or (False, False)
    # dx = p @ W^T: on the CPU against a transposed copy made once (a plain product, 8% faster
    # for the whole loop); on a GPU the product reads W as it is
    w_dx = wc.T if want_dx and not backend.on_gpu() else None

    def body(i, carry):
        xc = jax.lax.dynamic_slice_in_dim(x, i * c, c, 1).astype(dtype)
        tc = jax.lax.dynamic_slice_in_dim(targets, i * c, c, 1)
        mc = jax.lax.dynamic_slice_in_dim(mask, i * c, c, 1)
        logits = jax.lax.dot_general(xc, wc, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        s = jnp.sum(e, axis=-1, keepdims=True)
        # the target's logit gathered: under the custom VJP no gather is transposed
        target = jnp.take_along_axis(logits, tc[..., None], axis=-1, mode="clip")
        total = carry[0] + jnp.sum((top + jnp.log(s) - target)[..., 0] * mc)
        if not grads:
            return (total,)
        hit = jnp.arange(v) == tc[..., None]
        p = ((e / s - hit) * mc[..., None]).astype(dtype)
        dx, dw = carry[1], carry[2]
        if want_dx:
            if w_dx is None:
                dxc = jax.lax.dot_general(p, wc, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            else:
                dxc = jax.lax.dot_general(p, w_dx, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dxc.astype(dx.dtype), i * c, 1)
        if want_dw:
            dw = dw + jax.lax.dot_general(xc.reshape(-1, h), p.reshape(-1, v), (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
        return total, dx, dw

    init = (jnp.zeros((), jnp.float32),)
    if grads:
        init += (jnp.zeros((b, n * c, h), x.dtype) if want_dx else None,
                 jnp.zeros((h, v), jnp.float32) if want_dw else None)
    out = jax.lax.fori_loop(0, n, body, init)
    if not grads:
        return out[0]
    total, dx, dw = out
    return total, (dx[:, :t] if want_dx else None), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_nll_sum(x, w, targets, mask, dtype):
    return _head_pass(x, w, targets, mask, dtype, None)


def _head_fwd(x, w, targets, mask, dtype):
    # symbolic zeros tell which of x and w are differentiated: a LoRA run's frozen lm_head
    # gets no weight gradient computed
    total, dx, dw = _head_pass(x.value, w.value, targets.value, mask.value, dtype,
                               (x.perturbed, w.perturbed))
    return total, (dx, None if dw is None else dw.astype(w.value.dtype))


def _head_bwd(dtype, res, g):
    del dtype
    dx, dw = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    return (None if dx is None else dx * g.astype(dx.dtype),
            None if dw is None else dw * g.astype(dw.dtype), None, None)


_head_nll_sum.defvjp(_head_fwd, _head_bwd, symbolic_zeros=True)


def _check_routing(routing: Routing, batch: int, seq_len: int, n_experts: int, k: int) -> None:
    want = (batch * seq_len, n_experts)
    if routing.scores.shape != want:
        raise ValueError(f"routing.scores: expected [batch*seq_len, n_experts] = {list(want)}, "
                         f"got {list(routing.scores.shape)}")
    if routing.topk_idx.shape != (batch * seq_len, k):
        raise ValueError(f"routing.topk_idx: expected [batch*seq_len, k] = {[batch * seq_len, k]}, "
                         f"got {list(routing.topk_idx.shape)}")


def balance_loss(routing: Routing, batch: int, seq_len: int, alpha: float, n_experts: int,
                 k: int, mask: jax.Array | None = None, seq_aux: bool = True,
                 segments: jax.Array | None = None) -> jax.Array:
    """The expert-balance loss of one MoE layer (float32 scalar).

    Per sequence of T real tokens: ``f_i = E / (K T) * #{t : i in topk(t)}``,
    ``P_i = mean_t s_{i,t}``, loss ``= alpha * sum_i f_i P_i``; the mean over sequences that
    have at least one real token. A perfectly balanced router gives ``alpha``.

    What a "sequence" is: each row of the batch; with ``segments`` [B, T] (the document number
    of each token within its packed row, as the data pipeline gives it) each document, with its
    own f, P and T, as DeepSeek's per-sequence loss (seq_aux) means it for packed documents;
    with ``seq_aux=False`` the whole batch (the reference's batch-level variant). ``mask``
    [B, T] marks real tokens: padding counts in neither f nor P nor T.

    ``f`` comes from the top-k indices and carries no gradient; the gradient reaches the
    router only through ``P``, i.e. through the softmax scores.
    """
    _check_routing(routing, batch, seq_len, n_experts, k)
    if mask is None:
        m = jnp.ones((batch, seq_len), jnp.float32)
    else:
        if mask.shape != (batch, seq_len):
            raise ValueError(f"mask: expected shape {(batch, seq_len)}, got {mask.shape}")
        m = mask.astype(jnp.float32)
    if segments is not None and segments.shape != (batch, seq_len):
        raise ValueError(f"segments: expected shape {(batch, seq_len)}, got {segments.shape}")
    if not seq_aux:
        seq_of = jnp.zeros((batch * seq_len,), jnp.int32)
    elif segments is None:
        seq_of = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), seq_len)
    else:  # a document number < T within its row: row * T + document is unique
        seq_of = (jnp.arange(batch, dtype=jnp.int32)[:, None] * seq_len
                  + jnp.clip(segments.astype(jnp.int32), 0, seq_len - 1)).reshape(-1)
    n_seq = batch * seq_len  # a static bound on the number of sequences
    m = m.reshape(-1, 1)  # [N, 1]
    scores = routing.scores.astype(jnp.float32)  # [N, E]
    chosen = jax.lax.stop_gradient(
        jax.nn.one_hot(routing.topk_idx, n_experts, dtype=jnp.float32).sum(axis=1))  # [N, E]
    n_real = jax.ops.segment_sum(m[:, 0], seq_of, num_segments=n_seq)  # [S]
    denom = jnp.maximum(n_real, 1.0)[:, None]
    f = n_experts / k * jax.ops.segment_sum(chosen * m, seq_of, num_segments=n_seq) / denom
    p = jax.ops.segment_sum(scores * m, seq_of, num_segments=n_seq) / denom  # [S, E]
    per_seq = alpha * jnp.sum(f * p, axis=-1)  # [S]
    has_tokens = (n_real > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def total_balance_loss(model_output, cfg, batch: int, seq_len: int,
                       mask: jax.Array | None = None, segments: jax.Array | None = None) -> jax.Array:
    """Sum of :func:`balance_loss` over the MoE layers of a ``ModelOutput``.

    Uses ``cfg.aux_loss_alpha``, ``cfg.n_routed_experts``, ``cfg.num_experts_per_tok`` and
    ``cfg.seq_aux``; ``segments`` makes each packed document a sequence. 0 for a model without
    MoE layers or with ``aux_loss_alpha == 0``.
    """
    total = jnp.zeros((), jnp.float32)
    if not cfg.aux_loss_alpha:
        return total
    for routing in model_output.routings:
        total = total + balance_loss(routing, batch, seq_len, cfg.aux_loss_alpha,
                                     cfg.n_routed_experts, cfg.num_experts_per_tok,
                                     mask=mask, seq_aux=cfg.seq_aux, segments=segments)
    return total


def expert_load(routing: Routing, n_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of tokens routed to each expert, float32 [E] (a metric; no gradient).

    Entry i is ``#{t : i in topk(t)} / N`` over the N real tokens (``mask`` [N] or any shape
    that flattens to N). Entries lie in [0, 1] and sum to K; a balanced router gives K/E each.
    """
    n, _ = routing.topk_idx.shape
    chosen = jax.nn.one_hot(routing.topk_idx, n_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    if mask is None:
        m = jnp.ones((n,), jnp.float32)
    else:
        m = jnp.reshape(mask, (-1,)).astype(jnp.float32)
        if m.shape != (n,):
            raise ValueError(f"mask: expected {n} entries (one per routed token), got {mask.shape}")
    load = jnp.sum(chosen * m[:, None], axis=0) / jnp.maximum(jnp.sum(m), 1.0)
    return jax.lax.stop_gradient(load)
