"""Run checkpoints with Orbax: RUN_DIR/checkpoints/<step>/{params, opt_state, meta}.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoints usable; saves are asynchronous (the device arrays are
copied to host before ``save`` returns, the files are written in the background). ``meta`` is
JSON: the step, the RNG key data and the data iterator's state.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsv2_jax.errors import CheckpointError, CheckpointSaveError
from dsv2_jax.sharding import put
from dsv2_jax.training.step import TrainState


_save_failed = False  # a CheckpointSaveError was raised: its echoes in other logs are dropped


def _quiet_orbax_save_failures(record: logging.LogRecord) -> bool:
    """Drop Orbax's own tracebacks of a failed background save (and asyncio's "exception was
    never retrieved" for its write tasks, logged at exit): RunCheckpoints raises the same
    failure as one CheckpointSaveError naming the step, the cause and what is intact."""
    if record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname:
        return False
    return not (_save_failed and "exception was never retrieved" in str(record.msg))


def _silence_closed_loop_callbacks() -> None:
    """When a save fails, TensorStore's writer threads still complete their futures into
    Orbax's event loop, already closed, and each ``RuntimeError: Event loop is closed`` would
    print a traceback (through ``sys.unraisablehook``, from native threads, nothing can catch
    it); the failure itself is raised as CheckpointSaveError."""
    previous = sys.unraisablehook
    if getattr(previous, "_dsv2_closed_loop", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    hook._dsv2_closed_loop = True
    sys.unraisablehook = hook


def _reason(e: Exception) -> str:
    text = str(e)
    if "No space left on device" in text or getattr(e, "errno", None) == errno.ENOSPC:
        detail = e.strerror if isinstance(e, OSError) and e.strerror and "space" not in e.strerror else ""
        return "no space left on device" + (f": {detail}" if detail else "")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}" + ("..." if len(first) > 300 else "")


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                    enable_async_checkpointing=async_save, create=True)
        self._in_flight: int | None = None  # the step of the last save started, until waited for
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_quiet_orbax_save_failures)
        _silence_closed_loop_callbacks()
        self._open()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _open(self) -> None:
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
        """Start saving ``state`` (asynchronously); errors of this save, or of the one before
        it still in flight, raise CheckpointSaveError."""
        step = int(state.step)
        meta = {"step": step, "rng": [int(x) for x in jax.device_get(state.rng).ravel()],
                "data": data_state}
        # A save that cannot fit fails half-way inside Orbax's writers; refuse it up front.
        need = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        free = shutil.disk_usage(self.directory).free
        if need > free:
            self.wait()  # the save before this one, if any, completes or fails first
            raise self._save_error(step, OSError(errno.ENOSPC, f"needs about {need / 2**20:.1f} "
                                                              f"MiB, {free / 2**20:.1f} MiB free"))
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "not saved"
            # Orbax first waits for the save before; its failure surfaces here.
            raise self._save_error(self._in_flight if self._in_flight is not None else step, e) from e
        self._in_flight = step

    def _save_error(self, step: int, e: Exception) -> CheckpointSaveError:
        global _save_failed
        _save_failed = True
        kept = [s for s in self._committed_steps() if s < step]
        return CheckpointSaveError(
            f"{self.directory}: saving checkpoint {step} failed ({_reason(e)}); "
            + (f"checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"))

    def _committed_steps(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())

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

    def restore_latest(self, like: TrainState):
        """The newest checkpoint that reads back whole: ``(step, state, data_state, skipped)``.

        A checkpoint that fails to read (a truncated or deleted file, say) is moved aside to
        ``<step>.unreadable`` (so that the run can save that step again) and the one before it
        is tried; ``skipped`` lists ``(step, reason, moved_to)``. No readable checkpoint at all
        is a CheckpointError."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, like)
                return step, state, data_state, skipped
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                moved = self.directory / f"{step}.unreadable"
                if jax.process_index() == 0:
                    if moved.exists():
                        shutil.rmtree(moved)
                    os.replace(self.directory / str(step), moved)
                self.manager.close()
                self._open()
                skipped.append((step, why, moved))
        raise CheckpointError(f"{self.directory}: no checkpoint could be read back "
                              f"({'; '.join(f'{s}: {w}' for s, w, _ in skipped)})")

    def wait(self) -> None:
        """Wait for the saves in flight; a failed one raises CheckpointSaveError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step = self._in_flight if self._in_flight is not None else self.manager.latest_step()
            raise self._save_error(step if step is not None else -1, e) from e
        finally:
            self._in_flight = None

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
