"""Which code paths a trace takes: the GPU ones (Pallas kernels, ``ragged_dot``) or the CPU ones.

The model picks kernels at trace time from :func:`name`: by default the backend JAX runs on
(``jax.default_backend()``). :func:`target` overrides that for the traces inside it, so that a
program can be compiled for a GPU from a machine without one (``dsv2_jax.gpu_aot``), where
``jax.default_backend()`` still says ``"cpu"``::

    with dsv2_jax.backend.target("gpu"):
        compiled = jax.jit(step).trace(*abstract_args).lower().compile()
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

BACKENDS = ("cpu", "gpu")
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsv2_jax_backend", default=None)
_interpret: contextvars.ContextVar[bool] = contextvars.ContextVar("dsv2_jax_interpret", default=False)


def name() -> str:
    """'gpu' or 'cpu' (any other JAX backend counts as 'cpu': it takes the portable paths)."""
    chosen = _target.get()
    if chosen is not None:
        return chosen
    return "gpu" if jax.default_backend() == "gpu" else "cpu"


def on_gpu() -> bool:
    return name() == "gpu"


def interpreting() -> bool:
    """Whether the Pallas kernels run in interpret mode (:func:`target` with ``interpret=True``)."""
    return _interpret.get()


@contextlib.contextmanager
def target(backend: str, *, interpret: bool = False):
    """Trace with ``backend``'s code paths ('gpu' or 'cpu') whatever JAX runs on.

    ``interpret=True`` (with 'gpu') runs every Pallas kernel in interpret mode, so the GPU
    paths of a whole model execute, slowly, on the CPU: tests compare them with the CPU paths.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend.target({backend!r}): expected one of {BACKENDS}")
    if interpret and backend != "gpu":
        raise ValueError("backend.target: interpret=True only applies to the 'gpu' paths")
    token, itoken = _target.set(backend), _interpret.set(interpret)
    try:
        yield
    finally:
        _target.reset(token)
        _interpret.reset(itoken)


# A Hopper GPU of XLA's device list: the Pallas Triton lowering reads its compute capability.
LOWERING_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def cuda_lowering(mesh: jax.sharding.Mesh | None = None):
    """Lets ``jit(f).trace(...).lower(lowering_platforms=("cuda",))`` lower Pallas Triton kernels
    on a machine without a GPU. jax 0.10 assumed compute capability 9.0 when it found no GPU;
    jax 0.11 asks the abstract mesh in context for the GPU it lowers for, and refuses without
    one. This sets an abstract mesh whose device is a Hopper GPU and yields it: with ``mesh``,
    its axes, and the traced function must shard over the yielded mesh (``shard_map`` wants
    the mesh in context); without, a one-device mesh. Lowering only: a GPU compile without a
    GPU goes through :mod:`dsv2_jax.gpu_aot`."""
    from jax.sharding import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind=LOWERING_DEVICE_KIND, num_cores=None, platform="gpu")
    if mesh is None:
        abstract = AbstractMesh((1,), ("_",), abstract_device=device)
    else:
        abstract = AbstractMesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names),
                                axis_types=tuple(mesh.axis_types), abstract_device=device)
    with jax.sharding.use_abstract_mesh(abstract):
        yield abstract
