"""Multi-process runs on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program; one of them also hosts the coordinator. On CPU the
collectives go through gloo, so two processes on one machine behave like two hosts. After
``initialize``, ``jax.devices()`` lists the devices of every process, so a mesh from
``dsv2_jax.sharding.make_mesh`` spans them all: ``dsv2_jax.load(..., mesh=mesh)`` then has each
process read and hold only its own experts and shards, and every jitted call (forward,
``generate``, a train step) runs across the processes.

Example (two processes on this machine, one terminal each)::

    python -m infer.generate --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0
    python -m infer.generate --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

or from Python, in each process::

    from dsv2_jax import distributed, sharding
    distributed.initialize("127.0.0.1:12355", num_processes=2, process_id=RANK)
    model = dsv2_jax.load(path, mesh=sharding.make_mesh(expert=jax.device_count()))
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, TextIO

import jax


def add_arguments(parser) -> None:
    """The --coordinator / --num-processes / --process-id flags shared by the programs."""
    parser.add_argument("--coordinator", help="jax.distributed coordinator host:port: a multi-process "
                                              "run (default: DSV2_COORDINATOR, else one process)")
    parser.add_argument("--num-processes", type=int, help="processes in the run (DSV2_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="this process, 0..N-1 (DSV2_PROCESS_ID)")


def join(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> bool:
    """Join a multi-process run when a coordinator is given (argument or DSV2_COORDINATOR);
    otherwise stay a single process. Returns whether this is a multi-process run. Must run
    before JAX touches a device."""
    if coordinator or os.environ.get("DSV2_COORDINATOR"):
        initialize(coordinator, num_processes, process_id)
        return True
    if num_processes is not None or process_id is not None:
        raise ValueError("--num-processes / --process-id: a multi-process run also needs "
                         "--coordinator HOST:PORT (or DSV2_COORDINATOR)")
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the run. Arguments fall back to DSV2_COORDINATOR / DSV2_NUM_PROCESSES /
    DSV2_PROCESS_ID, then to JAX's own cluster detection (SLURM, etc.) when all are unset."""
    coordinator = coordinator or os.environ.get("DSV2_COORDINATOR")
    if num_processes is None and "DSV2_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DSV2_NUM_PROCESSES"])
    if process_id is None and "DSV2_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DSV2_PROCESS_ID"])
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("distributed: --coordinator needs --num-processes and --process-id "
                         "(or DSV2_NUM_PROCESSES / DSV2_PROCESS_ID)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"distributed: process_id = {process_id}: expected 0..{num_processes - 1}")
    # CPU processes need a collectives implementation to talk to each other; GPU runs ignore it.
    # (No backend query here: backends must not start before jax.distributed.initialize.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


@contextlib.contextmanager
def results_stdout() -> Iterator[TextIO]:
    """A stream for a program's results, with file descriptor 1 sent to stderr meanwhile.

    Native libraries write their logs to fd 1 (Gloo's ``[Gloo] Rank 0 is connected to 3 peer
    ranks`` in multi-process runs), and ``print()`` in library code goes to ``sys.stdout``;
    inside this block both land on stderr, and only what the program writes to the yielded
    stream reaches the real stdout, so ``--json`` output stays JSON. fd 1 is restored after.

    Example::

        with results_stdout() as out:
            print(json.dumps(result), file=out)
    """
    sys.stdout.flush()
    saved = os.dup(1)
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    try:
        yield out
    finally:
        with contextlib.suppress(OSError, ValueError):
            out.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        with contextlib.suppress(OSError, ValueError):
            out.close()
