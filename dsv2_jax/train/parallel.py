"""Where training state and batches live on the device mesh.

Today: pure data parallelism. The mesh has a ``data`` axis over all devices; batches are split
along their sequence axis over ``data``; parameters and optimizer state are replicated, and
XLA all-reduces the gradients. Expert-parallel and FSDP layouts plug in here and nowhere else:
:func:`make_mesh` grows the ``fsdp`` / ``expert`` axes, and :func:`param_shardings` /
:func:`state_shardings` return a ``NamedSharding`` per leaf from ``dsv2_jax.sharding``'s
logical-axis rules (``tree_shardings``: AdamW moments follow their parameters) instead of the
replicated one; the jitted step then runs on sharded state unchanged (the MoE layers also need
``set_expert_mesh`` on the model before it is split). ``mesh.expert`` / ``mesh.fsdp`` > 1 are
refused by the config until then.

Example::

    mesh = make_mesh(data=-1)
    params = jax.device_put(params, param_shardings(params, mesh))
    batch = put_batch(numpy_batch, mesh)     # [A, B, T] arrays, B split over "data"
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(data: int = -1) -> Mesh:
    """A 1-axis mesh ``("data",)``; ``data=-1`` uses every device."""
    n = jax.device_count()
    if data == -1:
        data = n
    if data != n:
        raise ValueError(f"mesh.data = {data}: this run sees {n} devices; data parallelism over "
                         f"a subset is not supported (use -1 or {n})")
    return jax.make_mesh((data,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def param_shardings(params, mesh: Mesh):
    """One sharding per parameter leaf: replicated (pure data parallelism).

    The seam for expert-parallel / FSDP: map each parameter path to a PartitionSpec here.
    """
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda _: replicated, params)


def state_shardings(state, mesh: Mesh):
    """Shardings for a whole TrainState: optimizer moments follow their parameters."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda _: replicated, state)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Batches of sequences: the sequence axis (second to last; [A, B, T] micro-batched or
    [B, T]) split over the data axis."""
    return NamedSharding(mesh, P(*([None] * (ndim - 2)), DATA, None))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays holding the *global* batch -> global device arrays.

    Each process passes the whole global batch and keeps its own rows (single-process runs
    keep everything); multi-host input pipelines that read only their share can pass those
    rows to ``jax.make_array_from_process_local_data`` directly.
    """
    out = {}
    for k, v in batch.items():
        sharding = batch_sharding(mesh, v.ndim)
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out
