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
