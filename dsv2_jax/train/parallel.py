"""Where training state and batches live on the device mesh: the training side of
:mod:`dsv2_jax.sharding`.

The mesh has the axes ``("data", "fsdp", "expert")`` (``make_mesh``). Parameters and the AdamW
moments follow ``dsv2_jax.sharding``'s logical-axis rules (``tree_shardings``: replicated over
``data``, the hidden-size axis split over ``fsdp``, routed experts split over ``expert``; a
moment gets the sharding of its parameter); the step counter and RNG key are replicated.
Batches are split along their sequence axis over every mesh axis, so each device runs its own
rows and XLA reduces the gradients; the MoE layers bring the tokens to their experts
(``sharding.set_expert_mesh`` on the model before it is split, as ``train.run`` does).

Example::

    mesh = make_mesh(data=2, expert=2)                  # 4 devices
    params = sharding.put(params, param_shardings(params, mesh))
    batch = put_batch(numpy_batch, mesh)                # [A, B, T] arrays, B split over the mesh
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .. import sharding

DATA = sharding.DATA


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1) -> Mesh:
    """The ``("data", "fsdp", "expert")`` mesh over every device (of every process); one size
    may be -1 (the devices left over). See :func:`dsv2_jax.sharding.make_mesh`."""
    return sharding.make_mesh(data, fsdp, expert)


def param_shardings(params, mesh: Mesh):
    """One NamedSharding per parameter leaf, from ``dsv2_jax.sharding.RULES``."""
    return sharding.tree_shardings(params, mesh)


def state_shardings(state, mesh: Mesh):
    """Shardings for a whole TrainState (or its ``jax.eval_shape``): optimizer moments follow
    their parameters; the step counter and RNG key are replicated."""
    return sharding.tree_shardings(state, mesh)


def batch_sharding(mesh: Mesh, ndim: int = 3, n: int | None = None) -> NamedSharding:
    """Batches of sequences: the sequence axis (second to last; [A, B, T] micro-batched or
    [B, T]) split over the mesh (``sharding.batch_spec``; axes that do not divide ``n``, the
    number of sequences, are dropped)."""
    return sharding.batch_sharding(mesh, n, dim=ndim - 2)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays holding the *global* batch -> global device arrays.

    Each process passes the whole global batch and keeps its own rows (single-process runs
    keep everything); multi-host input pipelines that read only their share can pass those
    rows to ``jax.make_array_from_process_local_data`` directly.
    """
    out = {}
    for k, v in batch.items():
        s = batch_sharding(mesh, v.ndim, v.shape[v.ndim - 2])
        out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
    return out
