"""Run checkpoints with Orbax: RUN_DIR/checkpoints/<step>/{params, opt_state, meta}.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoints usable; saves are asynchronous (the device arrays are
copied to host before ``save`` returns, the files are written in the background). ``meta`` is
JSON: the step, the RNG key data and the data iterator's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsv2_jax.sharding import put
from dsv2_jax.training.step import TrainState


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
        step = int(state.step)
        meta = {"step": step, "rng": [int(x) for x in jax.device_get(state.rng).ravel()],
                "data": data_state}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restore ``step`` into arrays shaped and placed like ``like``; returns (state, data state)."""
        got = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like.params)),
            opt_state=ocp.args.StandardRestore(_abstract(like.opt_state)),
            meta=ocp.args.JsonRestore()))
        meta = got.meta
        # sharding.put: like.rng may be replicated over the devices of several processes
        rng = put(np.asarray(meta["rng"], np.uint32).reshape(like.rng.shape), like.rng.sharding)
        step_arr = put(np.asarray(meta["step"], np.int32), like.step.sharding)
        return TrainState(got.params, got.opt_state, step_arr, rng), meta["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_params(directory: Path, abstract_params, step: int | None = None, shardings=None):
    """Only the parameters of a run's checkpoint (export, init_from). Returns (params, step).

    The arrays land on the first device, or at ``shardings`` (a NamedSharding per parameter,
    e.g. ``dsv2_jax.sharding.tree_shardings(abstract_params, mesh)``: each process then reads
    only its own shards)."""
    manager = ocp.CheckpointManager(Path(directory).absolute(),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"{directory}: no checkpoints")
        elif step not in manager.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint for step {step} "
                                    f"(have {sorted(manager.all_steps())})")
        if shardings is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: one, abstract_params)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_params, shardings)
        got = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
        return got.params, step
    finally:
        manager.close()
