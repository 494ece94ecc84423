"""The jitted training step: forward with optional remat, CE + balance loss, gradient
accumulation over micro-batches, clipping + AdamW (docs/training.md).

The model is split once into a graph definition and its ``nnx.Param`` state; the step is a pure
function of a ``TrainState`` pytree (params, optimizer state, step, RNG), so it jits, shards and
checkpoints like any JAX pytree.

Example::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(schedule)
    state = init_state(params, tx, seed=0)
    step = make_train_step(graphdef, rest, tx, schedule, model.config, remat="full")
    state, metrics = jax.jit(step, donate_argnums=0)(state, batch)  # batch: [A, B, T] arrays
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..attention import SegmentMask
from ..lora import set_dropout_keys
from ..model import ModelOutput
from ..rope import cos_sin
from .losses import cross_entropy, expert_load, head_cross_entropy, total_balance_loss

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # nnx.State of the model's nnx.Param variables (master weights)
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates done
    rng: jax.Array  # uint32 key data; advanced every step (LoRA dropout draws from it)


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(seed)))


def attention_mask(segments: jax.Array, document_mask: bool = True) -> SegmentMask:
    """Causal, and (with ``document_mask``) within the same packed document: a SegmentMask, so
    that long rows attend blockwise (``dsv2_jax.attention``) instead of holding [B, T, T]."""
    return SegmentMask(segments if document_mask else jnp.zeros_like(segments))


def train_forward(model, input_ids, positions, mask, remat: str = "none") -> ModelOutput:
    """``model.forward`` without a cache, with ``jax.checkpoint`` around each decoder layer.

    Same computation as ``model.forward(ids, positions, mask=mask)`` (tested); the layer loop
    is spelled out here so that a remat policy can wrap each layer.
    """
    hidden, routings = train_hidden(model, input_ids, positions, mask, remat)
    return ModelOutput(logits=model.lm_head(hidden).astype(jnp.float32), routings=routings)


def train_hidden(model, input_ids, positions, mask, remat: str = "none"):
    """:func:`train_forward` up to the final norm: ``(hidden [B, T, H], routings)``; the step's
    loss takes lm_head's product itself (``losses.head_cross_entropy``)."""
    policy = REMAT_POLICIES[remat]

    def layer_fn(layer, x, cos, sin, mask):
        y, routing, _ = layer(x, cos, sin, mask)
        return y, routing

    if remat != "none":
        plain = layer_fn

        def layer_fn(layer, x, cos, sin, mask):
            # jax.checkpoint over the layer's state as an explicit argument: nnx.remat would
            # write back into the layer's variables, which it refuses for variables created
            # outside its trace (a LoRA run's frozen base)
            graphdef, state = nnx.split(layer)

            def pure(state, x, cos, sin, mask):
                return plain(nnx.merge(graphdef, state), x, cos, sin, mask)

            return jax.checkpoint(pure, policy=policy)(state, x, cos, sin, mask)
    cos, sin = cos_sin(model.config, positions)
    x = model.embed_tokens(input_ids)
    routings = []
    for layer in model.layers:
        x, routing = layer_fn(layer, x, cos, sin, mask)
        if routing is not None:
            routings.append(routing)
    return model.norm(x), tuple(routings)


def lm_loss(model, batch, mask, remat: str = "none"):
    """``(mean CE, n_tokens, routings)`` of one [B, T] batch: the decoder, then lm_head fused
    into the cross-entropy (no [B, T, vocab] logits) unless lm_head is quantized or adapted."""
    hidden, routings = train_hidden(model, batch["inputs"], batch["positions"], mask, remat)
    head = model.lm_head
    if head.quantized or head.lora is not None:
        ce, n = cross_entropy(head(hidden), batch["targets"], batch["loss_mask"])
    else:
        ce, n = head_cross_entropy(hidden, head.weight[...], batch["targets"], batch["loss_mask"],
                                   compute_dtype=head.dtype)
    return ce, n, routings


def _micro_loss(model, cfg, mb, n_total, accum, remat, document_mask):
    b, t = mb["inputs"].shape
    mask = attention_mask(mb["segments"], document_mask)
    ce, n, routings = lm_loss(model, mb, mask, remat)
    out = ModelOutput(logits=None, routings=routings)
    ce_sum = ce * n
    # With document masks each packed document is a sequence of the balance loss too.
    bal = total_balance_loss(out, cfg, b, t, segments=mb["segments"] if document_mask else None)
    loads = [expert_load(r, cfg.n_routed_experts) for r in out.routings]
    loads = jnp.stack(loads) if loads else jnp.zeros((0, max(cfg.n_routed_experts, 1)))
    # Summed over the A micro-batches this is mean-CE over all target tokens + mean balance.
    loss = ce_sum / n_total + bal / accum
    return loss, (ce_sum, bal, loads)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation,
                    schedule: Callable, config, *, remat: str = "none", document_mask: bool = True,
                    nan_at_step: int | None = None, param_shardings=None):
    """``step(state, batch) -> (state, metrics)``; batch arrays are [A, B_micro, T].

    ``config`` is the model's DeepseekV2Config (its aux_loss_alpha / seq_aux set the balance loss).

    Gradients of the A micro-batches are summed in float32 (``lax.scan``), then clipped and
    applied once. Metrics (float32): loss, ce, balance_loss, grad_norm, lr (of this update),
    tokens (targets in the loss), expert_load [n_moe_layers, E] (fraction of tokens routed to
    each expert, averaged over micro-batches). ``nan_at_step`` (1-based) makes that step's loss
    and gradients NaN, to test the NaN guard.

    The batch is a dict of [A, B, T] arrays (``dsv2_jax.training.data.pack_rows`` gives [B, T]):
    inputs, targets, loss_mask, segments (document number within the row), positions. With
    ``document_mask`` the balance loss takes each packed document as one sequence (its own f, P
    and T, docs/training.md#expert-balance-loss); without it, each packed row.

    ``param_shardings`` (a NamedSharding per parameter, ``dsv2_jax.sharding.tree_shardings``)
    pins the float32 gradient accumulator to the parameters' layout, so FSDP / expert-sharded
    runs never hold a full copy of the gradients; it does not change the values.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")

    def step(state: TrainState, batch: dict[str, jax.Array]):
        accum = batch["inputs"].shape[0]
        n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        scale = jnp.float32(1.0)
        if nan_at_step is not None:  # NaN times the loss: the loss and every gradient are NaN
            scale = jnp.where(state.step + 1 == nan_at_step, jnp.float32(jnp.nan), 1.0)

        step_key = jax.random.wrap_key_data(state.rng)

        def loss_fn(params, mb, i):
            model = nnx.merge(graphdef, params, rest)
            set_dropout_keys(model, jax.random.fold_in(step_key, i))  # LoRA dropout, if any
            loss, aux = _micro_loss(model, config, mb, n_total, accum, remat, document_mask)
            return loss * scale, aux

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(carry, mb_i):
            mb, i = mb_i
            grads, loss, ce, bal, loads = carry
            (l, (c, b, ld)), g = grad_fn(state.params, mb, i)
            grads = jax.tree.map(jnp.add, grads, g)
            if param_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            return (grads, loss + l, ce + c, bal + b, loads + ld), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        if param_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        n_exp = max(config.n_routed_experts, 1)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0),
                jnp.zeros((n_moe, n_exp), jnp.float32))
        if accum == 1:  # no loop: XLA optimises across the whole step
            (grads, loss, ce_sum, bal, loads), _ = body(init, (jax.tree.map(lambda a: a[0], batch), 0))
        else:
            (grads, loss, ce_sum, bal, loads), _ = jax.lax.scan(body, init, (batch, jnp.arange(accum)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {
            "loss": loss,
            "ce": ce_sum / n_total,
            "balance_loss": bal / accum,
            "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": n_total,
            "expert_load": loads / accum,
        }
        return TrainState(params, opt_state, state.step + 1, rng), metrics

    return step


def make_eval_step(graphdef, rest, *, document_mask: bool = True):
    """``eval(params, batch) -> (ce_sum, n_tokens)`` for one [B, T] batch (no remat, no grad)."""

    def evaluate(params, batch):
        model = nnx.merge(graphdef, params, rest)
        mask = attention_mask(batch["segments"], document_mask)
        ce, n, _ = lm_loss(model, batch, mask)
        return ce * n, n

    return evaluate
