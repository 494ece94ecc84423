"""DeepSeekMoE: softmax router, greedy / group-limited top-k, shared + routed SwiGLU experts.

Routing is a pure function in float32 (docs/model.md#routing). Routed experts are stored stacked
([E, in, out], ``expert_weights``) and dispatched dropless. On the CPU, few tokens (decode)
take one of two paths: when their N·K (token, expert) pairs cover at least half the dense
experts, every token runs through every expert (each expert's weights read once, in place);
fewer pairs gather their own expert's weights. Otherwise (and always on a GPU, where the
grouped Pallas kernels read each selected expert's weights once) the pairs are sorted by
expert and run one grouped matmul per projection (``expert_weights.grouped_matmul``), are put
back in pair order. Each token's K outputs are summed in float32 in a fixed order, weighted by
the router probabilities (no scatter-add, whose order on a GPU varies from run to run).

Expert parallelism (:func:`dispatch_experts_parallel`): when the model was built for a mesh
whose ``expert`` axis has size P > 1 (``DeepseekV2(cfg, mesh=...)``, ``dsv2_jax.load(...,
mesh=)``), each device holds E/P experts and the dispatch runs inside ``jax.shard_map``;
otherwise the single-device path above runs. The
design is *replicated tokens + local sort + local grouped matmul + reduce*:

1. the tokens of one expert group (the P devices along ``expert``) are all-gathered, so every
   device sees all N tokens of the group and their routing (computed before, outside);
2. each device keeps the (token, expert) pairs whose expert it holds, sorts them by expert
   and runs the same grouped matmul as one device does, over its E/P experts only; pairs
   of other devices sort to the end and are never multiplied. With gathered tokens this runs
   over the N/P tokens of one source device at a time (:func:`_dispatch_in_chunks`), so the
   pair buffers have N/P·K rows, not N·K;
3. the weighted partial sums are reduce-scattered back (each device keeps the rows of its
   own tokens). When no mesh axis divides N (decode of a few rows) the tokens are already
   replicated: there is no all-gather and the last step is a psum (an all-reduce).

Communication per MoE layer and device, for N tokens of hidden size H in the group and b
bytes per value: the all-gather receives (P-1)/P·N·H·b and the reduce-scatter sends as much,
2·(P-1)/P·N·H·b in all (one all-reduce's worth; the psum case costs the same), whatever the
top-k K. An all-to-all dispatch sends each of the device's N/P tokens to its K experts and
back, 2·(P-1)/P·(N/P)·K·H·b: K/P times the gathered cost, so it moves fewer bytes only once
P > K (K = 6 for V2-Lite), and it needs capacity buffers (dropping tokens) or dynamic shapes.
The gathered design is dropless with static shapes: each chunk's buffer has room for all its
tokens' pairs and the grouped matmul skips the rows of other devices, so per device the tiled CPU
matmul computes its own pairs plus at most one partial tile per local expert (the few-pairs
decode path gathers weights for all N·K <= 64 pairs and zeroes the others' weights). Weights
never move: the only collectives on expert weights are the gradient all-reduce over ``data``
and the FSDP all-gather of the local E/P experts over ``fsdp`` (never the full [E, in, out]).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from . import backend
from . import expert_weights as ew
from .config import DeepseekV2Config
from .expert_weights import ExpertWeights
from .layers import Linear
from .sharding import EXPERT, axis_size, batch_spec


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
# Dense experts on the CPU: N tokens whose pairs cover at least half the experts (N·K >= E/2) go
# through every expert while the [E, N, I] intermediate has at most this many values.
EVERY_EXPERT_MAX_VALUES = 1 << 20
# Dense expert matrices up to this size take those two few-token paths; bigger ones (V2-Lite's
# 2048 x 1408: 5.6 MiB in bf16) run the sorted path's loop over tiles, which reads only the
# selected experts' weights (bench/moe_dispatch.py --shapes v2lite: 2.1x faster than gathering
# at N = 1, 6.3x faster than every expert at N = 8, bf16).
SMALL_EXPERT_BYTES = 1 << 20


def dispatch_experts(x: jax.Array, routing: Routing, w_gate, w_up, w_down,
                     n_experts: int) -> jax.Array:
    """Dropless routed-expert FFN for x [N, H]: sum_k weight_k * expert_k(x)."""
    return _dispatch(x, routing.topk_idx, routing.topk_weight, w_gate, w_up, w_down, n_experts)


def _dispatch(x, topk_idx, topk_weight, w_gate, w_up, w_down, n_experts, valid=None):
    """The routed FFN over the experts of ``w_*`` ([n_experts, ...]).

    ``valid`` [N, K] (expert parallelism) marks the pairs whose expert is held here; the
    others get weight 0, and in the sorted path sort after every held expert's rows, where
    the grouped matmul leaves them zero without computing them.
    """
    n, k = topk_idx.shape
    w_gate, w_up, w_down = (ew.tie(w, x) for w in (w_gate, w_up, w_down))
    flat_expert = topk_idx.reshape(-1)  # [N*K]
    flat_weight = topk_weight.reshape(-1)
    if valid is not None:
        flat_valid = valid.reshape(-1)
        flat_expert = jnp.where(flat_valid, flat_expert, n_experts)
        flat_weight = jnp.where(flat_valid, flat_weight, 0.0)
    path = _path(n, k, n_experts, w_gate)
    if path == "every":
        # Each expert's weights read once, in place: cheaper than gathering a copy per pair
        # (or per tile) once the pairs cover half the experts; E/K times the pairs' FLOPs.
        h = (jax.nn.silu(ew.every_expert_matmul(x, w_gate))
             * ew.every_expert_matmul(x, w_up))  # [E, N, I]
        y = ew.every_expert_matmul(h, w_down)  # [E, N, H]
        idx = jnp.minimum(flat_expert, n_experts - 1).reshape(n, k)
        y = y[idx, jnp.arange(n)[:, None]].astype(jnp.float32)  # [N, K, H]: each pair's output
        return jnp.sum(y * flat_weight.reshape(n, k, 1), axis=1).astype(x.dtype)
    if path == "gather":
        flat_expert = jnp.minimum(flat_expert, n_experts - 1)
        xs = jnp.repeat(x, k, axis=0)  # [N*K, H], pair order
        h = jax.nn.silu(ew.gathered_matmul(xs, w_gate, flat_expert)) * ew.gathered_matmul(xs, w_up, flat_expert)
        y = ew.gathered_matmul(h, w_down, flat_expert)
        y = y.astype(jnp.float32) * flat_weight[:, None]
        return jnp.sum(y.reshape(n, k, -1), axis=1).astype(x.dtype)
    order = jnp.argsort(flat_expert, stable=True)
    token_of = order // k
    # Sentinel ids (== n_experts) fall outside bincount's length: they join no group.
    group_sizes = jnp.bincount(flat_expert, length=n_experts).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype), unique_indices=True)
    if ew.tiled_ffn_fits(n * k, w_gate, w_up, w_down):  # small dense experts on the CPU
        y = ew.tiled_ffn(x, token_of, flat_expert, inverse, group_sizes, w_gate, w_up, w_down)
    else:
        xs = jnp.take(x, token_of, axis=0)  # [N*K, H] rows grouped by expert
        h = jax.nn.silu(ew.grouped_matmul(xs, w_gate, group_sizes)) * ew.grouped_matmul(xs, w_up, group_sizes)
        y = ew.grouped_matmul(h, w_down, group_sizes)  # [N*K, H]
        # Back to pair order (a permutation: a gather, no scatter-add)
        y = jnp.take(y, inverse, axis=0, unique_indices=True)
    # each token's K outputs summed in float32 in a fixed order: deterministic on every backend
    y = y.astype(jnp.float32) * flat_weight[:, None]
    return jnp.sum(y.reshape(n, k, -1), axis=1).astype(x.dtype)


def _path(n: int, k: int, n_experts: int, w) -> str:
    """How ``_dispatch`` runs N tokens' K pairs over the stack ``w``: ``"every"`` (every token
    through every expert), ``"gather"`` (each pair gathers its expert's weights) or ``"sorted"``
    (pairs sorted by expert, one grouped matmul: always on a GPU). Measured on a 2-core CPU
    (bench/moe_dispatch.py): for small dense experts (16 top-4 and 64 top-6 of 512 x 256 and
    512 x 128) every expert is fastest from N·K >= E/2 up to E·N·I of about 1M values, and
    gathering below that; big experts are fastest sorted at every N measured."""
    if backend.on_gpu():
        return "sorted"
    dense = ew.is_dense(w)
    base = w.base if isinstance(w, ew.Adapted) else w
    small = dense and math.prod(base.shape[1:]) * base.dtype.itemsize <= SMALL_EXPERT_BYTES
    if small and 2 * n * k >= n_experts and n * n_experts * base.shape[-1] <= EVERY_EXPERT_MAX_VALUES:
        return "every"
    if n * k <= GATHER_MAX_ROWS and (small or not dense):
        return "gather"
    return "sorted"


def _dispatch_in_chunks(x, idx, weight, valid, w_gate, w_up, w_down, n_experts, chunks: int):
    """:func:`_dispatch` over ``chunks`` equal slices of the tokens in turn (``lax.map``), each
    slice recomputed in the backward pass (``jax.checkpoint``), so its buffers hold the pairs of
    N/chunks tokens. The expert-parallel dispatch gathers the P devices' tokens and keeps room
    for all N·K of their pairs, of which this device holds about 1/P: at V2-Lite's 4,096 tokens
    per device over 8 devices that is 196,608 rows of 2,048 (768 MiB in bf16) per buffer, and a
    MoE layer's backward holds a dozen such. One slice per source device keeps every pair of a
    token in one slice (still dropless, the same static shapes) and divides those buffers by P.
    The work is the same: the grouped matmul skips rows of experts held elsewhere."""
    n = x.shape[0]
    split = lambda a: a.reshape(chunks, n // chunks, *a.shape[1:])  # noqa: E731

    def one(part):
        xc, ic, wc, vc = part
        return _dispatch(xc, ic, wc, w_gate, w_up, w_down, n_experts, vc)

    y = jax.lax.map(jax.checkpoint(one), tuple(split(a) for a in (x, idx, weight, valid)))
    return y.reshape(n, *y.shape[2:])


def _token_spec(mesh, n: int):
    """How the N tokens enter the shard_map: split over the batch axes that divide N; and
    whether those include ``expert`` (then each expert shard gathers the group's tokens)."""
    spec = batch_spec(mesh, n)
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return spec, EXPERT in axes


def dispatch_experts_parallel(x: jax.Array, routing: Routing, w_gate, w_up, w_down,
                              n_experts: int, mesh) -> jax.Array:
    """:func:`dispatch_experts` with the experts split over ``mesh``'s ``expert`` axis.

    Same result up to float summation order; see the module docstring for the design and its
    communication. ``w_*`` are the full stacked weights (dense, AWQWeight, or either with
    per-expert adapters: ``expert_weights.Adapted``), sharded or not:
    ``shard_map`` hands each device its E/P experts.
    """
    ep = axis_size(mesh, EXPERT)
    if n_experts % ep:
        raise ValueError(f"expert parallelism: n_routed_experts = {n_experts} is not divisible by "
                         f"the mesh's expert axis ({ep})")
    e_local = n_experts // ep
    tok, gather = _token_spec(mesh, x.shape[0])

    def local(x, idx, weight, wg, wu, wd):
        if gather:  # tokens arrive split over "expert" too: every expert shard needs all of them
            x, idx, weight = (jax.lax.all_gather(a, EXPERT, axis=0, tiled=True) for a in (x, idx, weight))
        here = idx - jax.lax.axis_index(EXPERT) * e_local  # [N, K] index among the local experts
        valid = (here >= 0) & (here < e_local)
        if gather:  # one chunk per source device: buffers of N/P·K pairs, not N·K
            y = _dispatch_in_chunks(x, here, weight, valid, wg, wu, wd, e_local, ep)
            return jax.lax.psum_scatter(y, EXPERT, scatter_dimension=0, tiled=True)
        y = _dispatch(x, here, weight, wg, wu, wd, e_local, valid)
        return jax.lax.psum(y, EXPERT)

    w_spec = P(EXPERT)  # a prefix: every leaf of an AWQWeight / Adapted is stacked [E, ...] too
    f = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_spec, w_spec, w_spec),
                      out_specs=tok, check_vma=ew.checked_in_shard_map(w_gate, w_up, w_down))
    return f(x, routing.topk_idx, routing.topk_weight, w_gate, w_up, w_down)


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
        # HIGHEST: a float32 dot may otherwise run as TF32 (or bf16 passes) on a GPU, and the
        # rounding flips the top-k choice of experts near ties.
        return jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)


class MoE(nnx.Module):
    """Router + routed experts (+ shared experts). With ``mesh`` whose ``expert`` axis has
    size P > 1 the routed experts are split P ways and dispatched inside ``jax.shard_map``."""

    def __init__(self, cfg: DeepseekV2Config, *, rngs, param_dtype, dtype, quant=None,
                 prefix: str = "mlp", mesh=None):
        self.cfg = cfg
        self.dtype = dtype
        ep = 1 if mesh is None else axis_size(mesh, EXPERT)
        if cfg.n_routed_experts % ep:
            raise ValueError(f"expert parallelism: n_routed_experts = {cfg.n_routed_experts} is not "
                             f"divisible by the mesh's expert axis ({ep})")
        # The mesh the routed experts are split over; None runs the single-device dispatch.
        self.expert_mesh = mesh if ep > 1 else None
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
        weights = (self.experts_gate_proj.stacked(), self.experts_up_proj.stacked(),
                   self.experts_down_proj.stacked())
        if self.expert_mesh is not None:
            y = dispatch_experts_parallel(flat.astype(self.dtype), routing, *weights,
                                          self.cfg.n_routed_experts, self.expert_mesh)
        else:
            y = dispatch_experts(flat.astype(self.dtype), routing, *weights, self.cfg.n_routed_experts)
        if self.has_shared:
            y = y + self.shared_experts(flat)
        return y.reshape(shape), routing
