"""DeepSeekMoE: softmax router, greedy / group-limited top-k, shared + routed SwiGLU experts.

Routing is a pure function in float32 (DESIGN.md §2). Routed experts are stored stacked
([E, in, out]) and dispatched dropless. Few (token, expert) pairs (decode) gather their own
expert's weights; many pairs are sorted by expert and run one grouped matmul per projection
(tiles of one expert each on CPU, ``ragged_dot`` or the AWQ grouped Pallas kernel on GPU),
then scattered back weighted by the router probabilities.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DeepseekV2Config
from .layers import ExpertWeights, Linear


@dataclasses.dataclass
class Routing:
    """Router output for N tokens: what the MoE layer and the balance loss need."""

    scores: jax.Array  # [N, E] softmax probabilities, float32
    topk_idx: jax.Array  # [N, K] int32
    topk_weight: jax.Array  # [N, K] float32, already scaled (routed_scaling_factor)


jax.tree_util.register_dataclass(Routing, data_fields=["scores", "topk_idx", "topk_weight"], meta_fields=[])


def route(cfg: DeepseekV2Config, router_logits: jax.Array) -> Routing:
    """Top-k routing of float32 router logits [N, E]."""
    scores = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    k = cfg.num_experts_per_tok
    select_from = scores
    if cfg.topk_method == "group_limited_greedy":
        n, e = scores.shape
        g = cfg.n_group
        group_scores = scores.reshape(n, g, e // g).max(axis=-1)  # [N, G]
        _, group_idx = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], group_idx].set(True)
        expert_mask = jnp.repeat(group_mask, e // g, axis=-1)
        select_from = jnp.where(expert_mask, scores, 0.0)
    topk_weight, topk_idx = jax.lax.top_k(select_from, k)
    if cfg.norm_topk_prob and k > 1:
        # The original DeepSeek code renormalises and then skips routed_scaling_factor.
        topk_weight = topk_weight / (jnp.sum(topk_weight, axis=-1, keepdims=True) + 1e-20)
    else:
        topk_weight = topk_weight * cfg.routed_scaling_factor
    return Routing(scores, topk_idx.astype(jnp.int32), topk_weight)


GATHER_MAX_ROWS = 64  # (token, expert) pairs up to which each pair gathers its expert's weights


def _expert_weight(w, e, dtype):
    """Expert e of a stack ([E, in, out] array or stacked AWQWeight) as a dense [in, out]."""
    if isinstance(w, jax.Array):
        return w[e].astype(dtype)
    from .quant.awq import dequantize

    return dequantize(jax.tree.map(lambda a: a[e], w), jnp.float32).astype(dtype)


def _gathered_matmul(x, w, expert):
    """Few rows (decode): row m multiplies its own expert's weight, read once per row."""
    if isinstance(w, jax.Array):
        wsel = jnp.take(w, expert, axis=0).astype(x.dtype)  # [M, in, out]
    else:
        from .quant.awq import dequantize

        wsel = dequantize(jax.tree.map(lambda a: jnp.take(a, expert, axis=0), w),
                          jnp.float32).astype(x.dtype)
    return jnp.einsum("mk,mkn->mn", x, wsel)


def _tiled_grouped_matmul(x, w, group_sizes):
    """Rows sorted by expert, cut into tiles of one expert each; empty tiles are skipped.

    XLA's CPU ragged_dot multiplies every row by every expert (E times the work); this costs
    at most (rows + used_experts * tile) rows of matmul instead.
    """
    m, k = x.shape
    e = group_sizes.shape[0]
    n = w.shape[-1] if isinstance(w, jax.Array) else w.out_features
    tile = int(min(128, max(8, 1 << max(0, (m // e - 1)).bit_length())))
    n_tiles = -(-m // tile) + e  # static bound on sum_e ceil(group_e / tile)
    tiles_per = -(-group_sizes // tile)
    tile_end = jnp.cumsum(tiles_per)  # inclusive
    row_off = jnp.cumsum(group_sizes) - group_sizes
    x_pad = jnp.concatenate([x, jnp.zeros((tile, k), x.dtype)])

    def one(i):
        ex = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), e - 1)
        first_tile = tile_end[ex] - tiles_per[ex]
        start = row_off[ex] + (i - first_tile) * tile
        rows = start + jnp.arange(tile)
        valid = (i < tile_end[-1]) & (rows < row_off[ex] + group_sizes[ex])

        def compute(_):
            xw = jax.lax.dynamic_slice_in_dim(x_pad, start, tile)
            return jnp.dot(xw, _expert_weight(w, ex, x.dtype))

        y = jax.lax.cond(i < tile_end[-1], compute, lambda _: jnp.zeros((tile, n), x.dtype), None)
        return y, jnp.where(valid, rows, m)

    ys, rows = jax.lax.map(one, jnp.arange(n_tiles))
    out = jnp.zeros((m + 1, n), x.dtype).at[rows.reshape(-1)].set(ys.reshape(-1, n))
    return out[:m]


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """x [M, in] sorted by expert, w [E, in, out] (dense or AWQWeight) -> [M, out]."""
    on_gpu = jax.default_backend() == "gpu"
    if not isinstance(w, jax.Array) and on_gpu:
        from .quant.dispatch import awq_grouped_linear

        return awq_grouped_linear(x, w, group_sizes).astype(x.dtype)
    if on_gpu:
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    return _tiled_grouped_matmul(x, w, group_sizes)


def dispatch_experts(x: jax.Array, routing: Routing, w_gate, w_up, w_down,
                     n_experts: int) -> jax.Array:
    """Dropless routed-expert FFN for x [N, H]: sum_k weight_k * expert_k(x)."""
    n, k = routing.topk_idx.shape
    flat_expert = routing.topk_idx.reshape(-1)  # [N*K]
    if n * k <= GATHER_MAX_ROWS:
        xs = jnp.repeat(x, k, axis=0)  # [N*K, H], pair order
        h = jax.nn.silu(_gathered_matmul(xs, w_gate, flat_expert)) * _gathered_matmul(xs, w_up, flat_expert)
        y = _gathered_matmul(h, w_down, flat_expert)
        y = y.astype(jnp.float32) * routing.topk_weight.reshape(-1)[:, None]
        return jnp.sum(y.reshape(n, k, -1), axis=1).astype(x.dtype)
    order = jnp.argsort(flat_expert, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_expert, length=n_experts).astype(jnp.int32)
    xs = jnp.take(x, token_of, axis=0)  # [N*K, H] rows grouped by expert
    h = jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes)) * grouped_matmul(xs, w_up, group_sizes)
    y = grouped_matmul(h, w_down, group_sizes)  # [N*K, H]
    weight = jnp.take(routing.topk_weight.reshape(-1), order)[:, None]
    y = (y.astype(jnp.float32) * weight).astype(x.dtype)
    return jnp.zeros_like(x).at[token_of].add(y)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int, *, rngs, param_dtype, dtype, quant=None,
                 prefix: str = "mlp"):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, quant=quant)
        self.gate_proj = Linear(hidden, intermediate, name=f"{prefix}.gate_proj", **kw)
        self.up_proj = Linear(hidden, intermediate, name=f"{prefix}.up_proj", **kw)
        self.down_proj = Linear(intermediate, hidden, name=f"{prefix}.down_proj", **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nnx.Module):
    """The router's weight [H, E], kept in float32 whatever the model dtype."""

    def __init__(self, hidden: int, n_experts: int, *, rngs, init_std: float = 0.02):
        w = jax.random.normal(rngs.params(), (hidden, n_experts), jnp.float32) * init_std
        self.weight = nnx.Param(w)

    def __call__(self, x):
        return jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))


class MoE(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs, param_dtype, dtype, quant=None,
                 prefix: str = "mlp"):
        self.cfg = cfg
        self.dtype = dtype
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        self.gate = Router(h, e, rngs=rngs)
        kw = dict(rngs=rngs, param_dtype=param_dtype, quant=quant)
        # AutoAWQ names them mlp.experts.N.gate_proj; a skip entry matching that skips all N.
        self.experts_gate_proj = ExpertWeights(e, h, i, name=f"{prefix}.experts.0.gate_proj", **kw)
        self.experts_up_proj = ExpertWeights(e, h, i, name=f"{prefix}.experts.0.up_proj", **kw)
        self.experts_down_proj = ExpertWeights(e, i, h, name=f"{prefix}.experts.0.down_proj", **kw)
        self.has_shared = bool(cfg.n_shared_experts)
        if self.has_shared:
            self.shared_experts = MLP(h, i * cfg.n_shared_experts, rngs=rngs,
                                      param_dtype=param_dtype, dtype=dtype, quant=quant,
                                      prefix=f"{prefix}.shared_experts")

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Routing]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        routing = route(self.cfg, self.gate(flat))
        y = dispatch_experts(
            flat.astype(self.dtype), routing,
            self.experts_gate_proj.stacked(), self.experts_up_proj.stacked(),
            self.experts_down_proj.stacked(), self.cfg.n_routed_experts,
        )
        if self.has_shared:
            y = y + self.shared_experts(flat)
        return y.reshape(shape), routing
