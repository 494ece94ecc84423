"""The routed experts' weights, stacked ``[E, in, out]``: dense, or AWQ 4-bit kept packed.

``ExpertWeights`` is the module; :meth:`ExpertWeights.stacked` gives the value the MoE
dispatch passes around (through ``jax.shard_map`` too): a dense array or a stacked
``AWQWeight``. The MoE layer never looks inside that value; it calls the functions here:

- :func:`tie` — the packed words made data-dependent on the layer's input (``layers.tie_to``);
- :func:`gathered_matmul` — few (token, expert) pairs (decode): each row reads its own expert;
- :func:`grouped_matmul` — pairs sorted by expert: one grouped matmul. On GPU that is a Pallas
  kernel (``kernels.awq_grouped_matmul`` for packed experts, ``kernels.grouped_matmul`` with its
  backward for dense ones); on CPU a tiled matmul that skips empty tiles. XLA's ``ragged_dot``
  multiplies every row by every expert on both backends (docs/platform.md);
- :func:`checked_in_shard_map` — whether ``shard_map`` may check varying-axes types.

With a LoRA adapter per expert (``dsv2_jax.lora``, ``ExpertWeights.lora``) the value is an
:class:`Adapted`: the base stack (dense or packed) plus ``a [E, in, r]`` and ``b [E, r, out]``;
each function above adds ``(x @ a[e]) @ b[e] · scaling`` with the same grouped / gathered
matmuls (on a GPU the dense grouped kernel and its backward), so QLoRA on packed experts and
expert parallelism (``a`` and ``b`` are stacked over E like the base) need nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import backend, kernels
from .layers import QuantizedWeight, check_group_size, normal_init, tie_to
from .quant.awq import AWQWeight, dequantize, empty_awq_arrays
from .quant.ops import awq_grouped_linear
from .sharding import vary_like, zeros_like_varying



@dataclasses.dataclass(frozen=True)
class Adapted:
    """Stacked experts with one LoRA adapter each: ``x @ base[e] + (x @ a[e]) @ b[e] · scaling``."""

    base: jax.Array | AWQWeight  # [E, in, out]
    a: jax.Array  # [E, in, r]
    b: jax.Array  # [E, r, out]
    scaling: float


jax.tree_util.register_dataclass(Adapted, data_fields=["base", "a", "b"], meta_fields=["scaling"])

Stacked = jax.Array | AWQWeight | Adapted  # [E, in, out] dense, its packed AWQ form, + adapters


class ExpertWeights(nnx.Module):
    """A stack of E matrices [E, in, out] for the routed experts (dense or AWQ)."""

    def __init__(self, n: int, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, init_std: float = 0.02, quant=None, name: str = ""):
        if quant is not None and not quant.applies_to(name):
            quant = None
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.quantized = quant is not None
        if quant is None:
            self.weight = nnx.Param(normal_init(rngs, (n, in_features, out_features), init_std, param_dtype))
        else:
            check_group_size(quant.group_size, in_features, name)
            q, z, s = empty_awq_arrays(in_features, out_features, quant.group_size, stack=n)
            self.group_size = quant.group_size
            self.qweight, self.qzeros, self.scales = (
                QuantizedWeight(q), QuantizedWeight(z), QuantizedWeight(s))
        self.lora = nnx.data(None)  # a dsv2_jax.lora.ExpertLoRA (one adapter per expert)

    def base(self) -> jax.Array | AWQWeight:
        """The stacked weight without any adapter: dense, or a stacked AWQWeight."""
        if not self.quantized:
            return self.weight[...]
        return AWQWeight(self.qweight[...], self.qzeros[...], self.scales[...],
                         group_size=self.group_size, in_features=self.in_features,
                         out_features=self.out_features)

    def stacked(self) -> Stacked:
        """The weight as the dispatch passes it: the base, or :class:`Adapted` with an adapter."""
        if self.lora is None:
            return self.base()
        return Adapted(self.base(), self.lora.lora_a[...], self.lora.lora_b[...], self.lora.scaling)


def _is_dense(w: Stacked) -> bool:
    return isinstance(w, jax.Array)


def out_features(w: jax.Array | AWQWeight) -> int:
    return w.shape[-1] if _is_dense(w) else w.out_features


def tie(w: Stacked, x: jax.Array) -> Stacked:
    """Packed experts are unpacked only once ``x`` (this layer's input) exists (see
    ``layers.tie_to``); dense weights are returned as they are."""
    if isinstance(w, Adapted):
        return dataclasses.replace(w, base=tie(w.base, x))
    return w if _is_dense(w) else dataclasses.replace(w, qweight=tie_to(x, w.qweight))


def _plus_adapter(matmul, x: jax.Array, w: Adapted, rows) -> jax.Array:
    """``matmul(x, base) + matmul(matmul(x, a), b) · scaling`` in ``x.dtype`` (as ``lora.LoRA``)."""
    a, b = w.a.astype(x.dtype), w.b.astype(x.dtype)
    delta = matmul(matmul(x, a, rows), b, rows) * jnp.asarray(w.scaling, x.dtype)
    return matmul(x, w.base, rows) + delta


def checked_in_shard_map(*ws: Stacked) -> bool:
    """Whether ``shard_map(check_vma=True)`` accepts a dispatch over ``ws``: the Pallas kernels
    (GPU) declare outputs without shard_map's varying-axes type, so those paths run unchecked
    (tests/test_expert_parallel_grads.py checks the gradients of that path against one device)."""
    return not backend.on_gpu()


def expert(w: jax.Array | AWQWeight, e, dtype) -> jax.Array:
    """Expert ``e`` of the stack (dense or packed; an :class:`Adapted` stack never gets here:
    the matmuls add its adapter themselves) as a dense [in, out] in ``dtype``."""
    if _is_dense(w):
        return w[e].astype(dtype)
    return dequantize(jax.tree.map(lambda a: a[e], w), jnp.float32).astype(dtype)


def gathered_matmul(x: jax.Array, w: Stacked, expert_ids: jax.Array) -> jax.Array:
    """Few rows (decode): row m of x [M, in] times expert ``expert_ids[m]`` -> [M, out]."""
    if isinstance(w, Adapted):
        return _plus_adapter(gathered_matmul, x, w, expert_ids)
    if _is_dense(w):
        wsel = jnp.take(w, expert_ids, axis=0).astype(x.dtype)  # [M, in, out]
    else:
        wsel = dequantize(jax.tree.map(lambda a: jnp.take(a, expert_ids, axis=0), w),
                          jnp.float32).astype(x.dtype)
    return jnp.einsum("mk,mkn->mn", x, wsel)


def is_dense(w: Stacked) -> bool:
    """Whether the stack (the base of an :class:`Adapted` one) is plain dense weights."""
    return _is_dense(w.base if isinstance(w, Adapted) else w)


def every_expert_matmul(x: jax.Array, w: Stacked, _rows=None) -> jax.Array:
    """x [N, in] (the same rows for every expert) or [E, N, in] times each expert: [E, N, out].
    Dense stacks only (a packed one would be dequantized whole); the weights are read in place,
    with no per-row copy (the CPU path for few tokens, ``moe._dispatch``)."""
    if isinstance(w, Adapted):
        return _plus_adapter(every_expert_matmul, x, w, None)
    if x.ndim == 2:
        x = jnp.broadcast_to(x, (w.shape[0], *x.shape))
    return jnp.matmul(x, w.astype(x.dtype))


def grouped_matmul(x: jax.Array, w: Stacked, group_sizes: jax.Array) -> jax.Array:
    """x [M, in] sorted by expert, ``group_sizes`` int32 [E] -> [M, out] in ``x.dtype``.
    Rows past ``sum(group_sizes)`` belong to no expert and come out zero."""
    if isinstance(w, Adapted):
        return _plus_adapter(grouped_matmul, x, w, group_sizes)
    if not backend.on_gpu():
        return _tiled_grouped_matmul(x, w, group_sizes)
    if not _is_dense(w):
        return awq_grouped_linear(x, w, group_sizes).astype(x.dtype)
    # Not ragged_dot: XLA's GPU rewrite of it multiplies every row by every expert (padded).
    return kernels.grouped_matmul(x, w, group_sizes, implementation="triton")


# Dense experts whose per-tile weight copies (tiles × in × out) stay under this many bytes run as
# one batched matmul over all tiles (gathers in and out); bigger (or packed) ones loop over tiles.
BATCHED_TILES_MAX_BYTES = 64 << 20
# Up to this many experts the batched tiles copy their weights with a one-hot matmul (E times
# the copy's bytes in FLOPs) instead of a gather, whose transpose in the backward pass is a
# scatter-add.
ONE_HOT_MAX_EXPERTS = 64


def _tiled_grouped_matmul(x, w, group_sizes):
    """Rows sorted by expert, cut into tiles of one expert each; empty tiles are skipped.

    XLA's CPU ragged_dot multiplies every row by every expert (E times the work); this costs
    at most (rows + used_experts * tile) rows of matmul instead. Small dense experts (training
    on a CPU) take one batched matmul over gathered tiles, whose backward is gathers and
    scatters XLA runs well: 3.7x faster for a 16-expert layer's forward and backward than the
    loop over tiles (bench/train_vs_hf.py, docs/figures.md#training-speed).
    """
    m, k = x.shape
    e = group_sizes.shape[0]
    n = out_features(w)
    tile = _tile_size(m, e)
    n_tiles = _tile_count(m, e, tile)
    if _is_dense(w) and n_tiles * k * n * x.dtype.itemsize <= BATCHED_TILES_MAX_BYTES:
        return _batched_tiles(x, w, group_sizes, tile)
    tiles_per = -(-group_sizes // tile)
    tile_end = jnp.cumsum(tiles_per)  # inclusive
    row_off = jnp.cumsum(group_sizes) - group_sizes
    x_pad = jnp.concatenate([x, jnp.zeros((tile, k), x.dtype)])
    w = vary_like(w, x)

    def one(i):
        ex = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), e - 1)
        first_tile = tile_end[ex] - tiles_per[ex]
        start = row_off[ex] + (i - first_tile) * tile
        rows = start + jnp.arange(tile)
        valid = (i < tile_end[-1]) & (rows < row_off[ex] + group_sizes[ex])

        def compute(_):
            xw = jax.lax.dynamic_slice_in_dim(x_pad, start, tile)
            return jnp.dot(xw, expert(w, ex, x.dtype))

        skip = lambda _: zeros_like_varying((tile, n), x.dtype, x, w)  # noqa: E731
        y = jax.lax.cond(i < tile_end[-1], compute, skip, None)
        return y, jnp.where(valid, rows, m)

    ys, rows = jax.lax.map(one, jnp.arange(n_tiles))
    out = jnp.zeros((m + 1, n), x.dtype).at[rows.reshape(-1)].set(ys.reshape(-1, n))
    return out[:m]


class _Tiles(NamedTuple):
    """Rows sorted by expert cut into ``n`` tiles of ``size`` rows, each of one expert."""
    size: int
    n: int
    expert: jax.Array  # [n] int32: the expert of each tile (tiles past the last: clamped)
    rows: jax.Array  # [n, size]: the sorted row each tile place holds, or m (filler) if none
    first: jax.Array  # [E]: the first tile of each expert
    row_off: jax.Array  # [E]: the first sorted row of each expert


def _tile_size(m: int, e: int) -> int:
    return int(min(128, max(8, 1 << max(0, (m // e - 1)).bit_length())))


def _tile_count(m: int, e: int, tile: int) -> int:
    """Static bound on sum_e ceil(group_e / tile) for m rows over e experts."""
    return -(-m // tile) + e


def _tiles(group_sizes, m: int, tile: int) -> _Tiles:
    e = group_sizes.shape[0]
    n_tiles = _tile_count(m, e, tile)
    tiles_per = -(-group_sizes // tile)
    tile_end = jnp.cumsum(tiles_per)  # inclusive
    row_off = jnp.cumsum(group_sizes) - group_sizes
    i = jnp.arange(n_tiles)
    ex = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), e - 1)
    first = tile_end - tiles_per
    rows = (row_off[ex] + (i - first[ex]) * tile)[:, None] + jnp.arange(tile)  # [tiles, tile]
    valid = (i < tile_end[-1])[:, None] & (rows < (row_off[ex] + group_sizes[ex])[:, None])
    return _Tiles(tile, n_tiles, ex, jnp.where(valid, rows, m), first, row_off)


def _tile_weights(w, t: _Tiles, dtype) -> jax.Array:
    """Each tile's copy of its expert's weight: [tiles, in, out] in ``dtype``."""
    e, k, n = w.shape
    if e <= ONE_HOT_MAX_EXPERTS:
        # a product with the one-hot tile-to-expert matrix: exact, and a matmul in both
        # directions, where a gather's transpose is a scatter-add
        one_hot = (t.expert[:, None] == jnp.arange(e)).astype(dtype)
        return jnp.dot(one_hot, w.astype(dtype).reshape(e, k * n)).reshape(t.n, k, n)
    return w.at[t.expert].get(mode="promise_in_bounds", indices_are_sorted=True).astype(dtype)


def _tile_inputs(x, source_rows, t: _Tiles) -> jax.Array:
    """[tiles, tile, in]: tile place (i, j) holds ``x[source_rows[t.rows[i, j]]]`` (a zero row
    for filler places); ``source_rows`` None reads sorted row ``t.rows`` of x itself."""
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    idx = t.rows
    if source_rows is not None:
        idx = jnp.concatenate([source_rows, jnp.full((1,), x.shape[0], source_rows.dtype)])[idx]
    # Every index is in bounds (the filler row is the last): no fill-mode select over the copy.
    return x_pad.at[idx].get(mode="promise_in_bounds")


def _batched_tiles(x, w, group_sizes, tile):
    """:func:`_tiled_grouped_matmul` as one batched matmul: tile i (of expert ex[i]) gathers
    its rows of x and its expert's weight; each output row gathers its value back from its
    tile. Rows of no tile (past the groups) and tiles past the last one read a zero row."""
    m = x.shape[0]
    e = group_sizes.shape[0]
    t = _tiles(group_sizes, m, tile)
    yt = jnp.einsum("tmk,tkn->tmn", _tile_inputs(x, None, t), _tile_weights(w, t, x.dtype))
    # Output row r: its expert, then its place in that expert's tiles.
    r = jnp.arange(m)
    group_end = jnp.cumsum(group_sizes)
    er = jnp.minimum(jnp.searchsorted(group_end, r, side="right"), e - 1)
    return _from_tiles(yt, t, er, r, r < group_end[-1]).astype(x.dtype)


def _from_tiles(yt, t: _Tiles, expert, sorted_row, held) -> jax.Array:
    """Rows of the tile-layout result ``yt`` [tiles, tile, N]: for each (expert, sorted row),
    its place among that expert's tiles; rows not ``held`` are zero."""
    pos = jnp.where(held, t.first[expert] * t.size + sorted_row - t.row_off[expert], 0)
    y = yt.reshape(t.n * t.size, -1).at[pos].get(mode="promise_in_bounds")
    return jnp.where(held[:, None], y, 0)


def tiled_ffn_fits(m: int, *ws: Stacked) -> bool:
    """Whether :func:`tiled_ffn` serves these stacks for ``m`` pairs: on the CPU, plain dense
    stacks whose per-tile weight copies fit ``BATCHED_TILES_MAX_BYTES``."""
    if backend.on_gpu() or not all(_is_dense(w) and not isinstance(w, Adapted) for w in ws):
        return False
    e = ws[0].shape[0]
    n_tiles = _tile_count(m, e, _tile_size(m, e))
    return all(n_tiles * w.shape[1] * w.shape[2] * w.dtype.itemsize <= BATCHED_TILES_MAX_BYTES for w in ws)


def tiled_ffn(x, token_of, pair_expert, inverse, group_sizes, w_gate, w_up, w_down) -> jax.Array:
    """The routed FFN ``down(silu(x W_gate) * x W_up)`` of every (token, expert) pair, in pair
    order: [N·K, H] in x.dtype; pairs of no expert here (``pair_expert`` == E) give zeros.

    x [N, H] tokens; the pairs sorted by expert are ``token_of`` (each sorted pair's token)
    with ``group_sizes`` [E]; ``inverse`` [N·K] is each pair's sorted position. The whole FFN
    stays in the tile layout of :func:`grouped_matmul`'s batched CPU form: one gather of the
    tokens into tiles and one gather of the results back to pair order, where three grouped
    matmuls gather and scatter around each product (a 16-expert layer's forward and backward
    59 vs 78 ms, 2,048 tokens top-4, 256 x 64; bench/train_parts.py)."""
    m = token_of.shape[0]
    e = group_sizes.shape[0]
    t = _tiles(group_sizes, m, _tile_size(m, e))
    xt = _tile_inputs(x, token_of, t)
    h = (jax.nn.silu(jnp.einsum("tmk,tkn->tmn", xt, _tile_weights(w_gate, t, x.dtype)))
         * jnp.einsum("tmk,tkn->tmn", xt, _tile_weights(w_up, t, x.dtype)))
    yt = jnp.einsum("tmk,tkn->tmn", h, _tile_weights(w_down, t, x.dtype))
    held = pair_expert < e
    return _from_tiles(yt, t, jnp.minimum(pair_expert, e - 1), inverse, held).astype(x.dtype)
