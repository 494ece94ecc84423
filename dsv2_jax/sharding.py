"""Where parameters, optimizer state and activations live on the device mesh.

The mesh has three named axes, outermost first (``make_mesh``):

- ``data``: plain data parallelism. Batches are split over it; parameters are replicated.
- ``fsdp``: data parallelism with sharded parameters (ZeRO-3 / FSDP). Batches are split over it
  too; every weight's ``embed`` (hidden-size) axis is split over it, and XLA gathers a weight
  just before it is used.
- ``expert``: expert parallelism. Each device holds ``n_routed_experts / expert`` routed
  experts; batches are split over it as well outside the MoE layers, and the MoE dispatch
  (``dsv2_jax.moe.dispatch_experts_parallel``) brings the tokens to the experts. The MoE layers
  learn the mesh when the model is built (``DeepseekV2(cfg, mesh=...)``, ``load(..., mesh=)``).

One table, :data:`RULES`, maps *logical* axes (what a tensor axis means: ``embed``, ``vocab``,
``heads``, ``experts``, ...) to mesh axes; :data:`PARAM_AXES` names the logical axes of every
parameter by the module that owns it. The same rules give the shardings of a model for
inference, of a ``TrainState`` (optimizer moments mirror their parameters: any leaf whose path
ends in a parameter's path gets the parameter's sharding), and of batches. A mesh axis that does
not divide a dimension is dropped for that tensor (it stays replicated along it), so every
config shards without padding.

Example::

    mesh = make_mesh(data=2, expert=4)            # 8 devices
    model = dsv2_jax.load(path, dtype="float32", mesh=mesh)   # each tensor read into its sharding
    logits = model(ids)                            # MoE layers dispatch across "expert"
    state_sh = tree_shardings(train_state, mesh)   # params and AdamW moments alike
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, EXPERT = "data", "fsdp", "expert"
MESH_AXES = (DATA, FSDP, EXPERT)

# logical axis -> mesh axes it is split over (in order), or None (replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    # activations
    "batch": (DATA, FSDP, EXPERT),
    "seq": None,
    # parameters
    "vocab": (FSDP,),
    "embed": (FSDP,),
    "heads": None,  # q/kv_b/o projections (heads × head_dim flattened)
    "q_lora": None,
    "kv_lora": None,
    "mlp": None,  # dense FFN and shared-expert intermediate
    "experts": (EXPERT,),
    "expert_mlp": None,  # routed-expert intermediate
    "router": None,  # the router's expert axis: every device routes every token
    "norm": None,
}

# Training holds float32 master weights and two AdamW moments (12 bytes per parameter): every
# parameter is split over every device, not just the routed experts. Weights that are not
# routed experts also split their ``embed``/``vocab`` axis over ``expert`` (FSDP over the
# expert axis; XLA gathers a weight just before its use and reduce-scatters its gradient).
# Routed experts already use ``expert`` for their expert axis, so they are unchanged. Inference
# keeps RULES: a decode step would otherwise all-gather every weight at every token.
TRAIN_RULES: dict[str, tuple[str, ...] | None] = {
    **RULES, "vocab": (FSDP, EXPERT), "embed": (FSDP, EXPERT)}

# Logical axes of each parameter ([in, out] linears; stacked experts [E, in, out]), keyed by the
# module that owns it. AWQ leaves (qweight [in, out/8], qzeros [in/G, out/8], scales [in/G, out])
# keep the meaning of the axes they pack, so they use the same entry.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "q_proj": ("embed", "heads"),
    "q_a_proj": ("embed", "q_lora"),
    "q_b_proj": ("q_lora", "heads"),
    "kv_a_proj_with_mqa": ("embed", "kv_lora"),
    "kv_b_proj": ("kv_lora", "heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "gate": ("embed", "router"),
    "experts_gate_proj": ("experts", "embed", "expert_mlp"),
    "experts_up_proj": ("experts", "embed", "expert_mlp"),
    "experts_down_proj": ("experts", "expert_mlp", "embed"),
}
_LEAVES = ("weight", "embedding", "qweight", "qzeros", "scales")
EXPERT_MODULES = ("experts_gate_proj", "experts_up_proj", "experts_down_proj")


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, *, devices=None) -> Mesh:
    """A ``("data", "fsdp", "expert")`` mesh over all devices (of every process).

    One size may be -1: it takes the devices left over. ``expert`` is the innermost axis, so
    experts spread over the devices that talk fastest (those of one host first).

    Example::

        make_mesh(expert=8)            # data = 1 on 8 devices: pure expert parallelism
        make_mesh(data=2, expert=4)    # 8 devices: 2 data-parallel groups of 4 expert shards
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    sizes = {DATA: data, FSDP: fsdp, EXPERT: expert}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)]
    if bad or len(free) > 1:
        raise ValueError(f"make_mesh: sizes {sizes}: expected positive integers, at most one -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % known:
            raise ValueError(f"make_mesh: {n} devices do not split into {sizes} ({known} does not divide {n})")
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(f"make_mesh: data × fsdp × expert = {math.prod(sizes.values())} "
                         f"({sizes}), but there are {n} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def axis_size(mesh, name: str) -> int:
    """Size of a mesh axis; 1 when the mesh has no such axis."""
    return dict(mesh.shape).get(name, 1)


# ---------------------------------------------------------------------------
# logical axes -> PartitionSpec


def spec(logical: Sequence[str | None], shape: Sequence[int], mesh,
         rules: Mapping[str, tuple[str, ...] | None] = RULES) -> P:
    """PartitionSpec for a tensor whose axes mean ``logical``.

    Each axis takes the mesh axes its rule names, in order, as long as they exist in the mesh,
    are not used by an earlier axis of the same tensor, and keep the dimension divisible.
    """
    sizes = dict(mesh.shape)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = []
        for ax in (rules.get(name) or ()) if name is not None else ():
            if ax not in sizes or ax in used or sizes[ax] == 1:
                continue
            if dim % (math.prod(sizes[a] for a in axes) * sizes[ax]):
                continue
            axes.append(ax)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def path_names(path) -> list[str]:
    """The names along a pytree key path (dict keys, attributes, indices), as strings."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    if names and names[-1] == "value":  # nnx.Variable's own field
        names.pop()
    return names


def param_logical_axes(path, ndim: int) -> tuple[str | None, ...] | None:
    """Logical axes of the parameter (or optimizer moment) at ``path``; None if not a parameter.

    ``path`` is a key path (``jax.tree_util`` keys or plain names) ending in the parameter's
    module and leaf, e.g. ``('layers', 1, 'mlp', 'experts_up_proj', 'weight')``.
    """
    names = path_names(path) if path and not isinstance(path[0], (str, int)) else [str(p) for p in path]
    if len(names) >= 3 and names[-1] in ("lora_a", "lora_b") and names[-2] == "lora":
        # LoRA adapters: those of the routed experts ([E, in, r], [E, r, out]) split like the
        # experts; the others (a few MB) are replicated
        return ("experts",) + (None,) * (ndim - 1) if names[-3] in EXPERT_MODULES else None
    if len(names) < 2 or names[-1] not in _LEAVES:
        return None
    module = names[-2]
    if "norm" in module:
        return ("norm",) * ndim
    axes = PARAM_AXES.get(module)
    if axes is None:
        return None
    if len(axes) != ndim:
        raise ValueError(f"sharding: parameter {'.'.join(names)} has {ndim} dims; the rule for "
                         f"{module!r} names {len(axes)} ({axes})")
    return axes


def tree_shardings(tree: Any, mesh, rules: Mapping = RULES) -> Any:
    """A NamedSharding per array leaf of ``tree`` (an nnx.State, params, a TrainState, ...).

    Parameters and anything whose path ends like one (AdamW ``mu``/``nu``) follow
    :data:`PARAM_AXES` and ``rules``; everything else (step counters, RNG keys) is replicated.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: sharding_for(path, getattr(x, "shape", ()), mesh, rules), tree)


def sharding_for(path, shape, mesh, rules: Mapping = RULES) -> NamedSharding:
    """The NamedSharding of one leaf at ``path`` (key path or names) with ``shape``."""
    axes = param_logical_axes(path, len(shape))
    if axes is None:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec(axes, shape, mesh, rules))


def batch_spec(mesh, n: int | None = None, rules: Mapping = RULES) -> P:
    """Spec of the leading (batch or token) axis of activations: split over ``rules['batch']``,
    dropping mesh axes from the right until they divide ``n`` (when given)."""
    axes = [a for a in (rules.get("batch") or ()) if axis_size(mesh, a) > 1]
    while axes and n is not None and n % math.prod(axis_size(mesh, a) for a in axes):
        axes.pop()
    return P(tuple(axes) if len(axes) > 1 else axes[0]) if axes else P()


def batch_sharding(mesh, n: int | None = None, dim: int = 0) -> NamedSharding:
    """Sharding of inputs (token ids, targets, masks) whose axis ``dim`` holds ``n`` sequences,
    split per :func:`batch_spec`: ``dim=0`` for [B, T], ``dim=1`` for micro-batched [A, B, T]."""
    return NamedSharding(mesh, P(*([None] * dim), *batch_spec(mesh, n)))


def put_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host arrays holding the *global* batch ([B, T] or micro-batched [A, B, T]) -> global
    device arrays, the sequence axis (second to last) split per :func:`batch_spec`.

    Each process passes the whole global batch and keeps its own rows (single-process runs
    keep everything); multi-host input pipelines that read only their share can pass those
    rows to ``jax.make_array_from_process_local_data`` directly.
    """
    out = {}
    for k, v in batch.items():
        s = batch_sharding(mesh, v.shape[v.ndim - 2], dim=v.ndim - 2)
        out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
    return out


# ---------------------------------------------------------------------------
# placing values


def put(tree: Any, shardings: Any) -> Any:
    """Place host or device values at ``shardings``; works when the mesh spans processes.

    Every process must hold the same full values (same seed, same checkpoint); each keeps only
    the shards of its own devices.
    """
    def one(x, s):
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def shard_model(model, mesh, rules: Mapping = RULES):
    """Move every variable of ``model`` to its sharding on ``mesh``. Returns the same model
    (changed in place). The MoE layers split their experts over the mesh they were built with
    (``DeepseekV2(cfg, mesh=...)``), so build the model with the same mesh.

    Example::

        mesh = make_mesh(expert=4)
        model = shard_model(DeepseekV2(cfg, rngs=nnx.Rngs(0), mesh=mesh), mesh)
    """
    state = nnx.state(model)
    nnx.update(model, put(state, tree_shardings(state, mesh, rules)))
    return model


def create_sharded(factory, mesh, rules: Mapping = RULES):
    """Build ``factory()`` (e.g. a randomly initialised model) straight into its shardings:
    initialisation runs under ``jit`` with those as output shardings, so no device or
    process ever holds a full copy. The values are those of ``factory()`` run eagerly, up to
    float rounding (XLA fuses the init arithmetic differently under ``jit``).

    Example::

        mesh = make_mesh(fsdp=2, expert=4)
        model = create_sharded(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), mesh=mesh), mesh)
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    state = jax.jit(lambda: nnx.state(factory()), out_shardings=tree_shardings(abstract, mesh, rules))()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# shard_map's varying-axes types (jax 0.10 calls the type field ``manual_axis_type``, older
# releases ``vma``): the compatibility shim lives here, once.


def varying_axes(a) -> frozenset:
    """The shard_map axes ``a`` varies over (empty outside shard_map)."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def zeros_like_varying(shape, dtype, *like):
    """Zeros that vary over the same shard_map axes as ``like`` (a no-op outside shard_map),
    so that both branches of a ``cond`` have one type."""
    vma = frozenset().union(*(varying_axes(a) for a in jax.tree.leaves(like)))
    z = jax.numpy.zeros(shape, dtype)
    return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def vary_like(w, x):
    """``w`` (any pytree) cast to vary over every shard_map axis ``x`` varies over.

    Inside shard_map a weight replicated over ``data`` / ``fsdp`` meets tokens split over them;
    JAX casts it where they meet, and the transpose of that cast is the gradient's psum. Casting
    once, up front, keeps that psum out of any per-tile ``cond``: devices whose tiles differ
    would take different branches and wait forever on each other's collective.
    """
    want = varying_axes(x)

    def cast(a):
        extra = tuple(sorted(want - varying_axes(a)))
        return jax.lax.pcast(a, extra, to="varying") if extra else a

    return jax.tree.map(cast, w) if want else w
