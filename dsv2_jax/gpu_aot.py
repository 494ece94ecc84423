"""Compile a program for an H100 or H200 on a machine without a GPU (docs/platform.md).

XLA's whole GPU compiler (GPU HLO passes, buffer assignment, Triton -> PTX -> cubin) runs
on the CPU once the CUDA PJRT plugin and ``ptxas`` are installed (``pip install -e
".[gpu-compile]"``). The result is what a GPU user would get before anyone needs a GPU: real
per-device memory, the optimized GPU HLO, and every kernel's launch shape, registers, shared
memory and spills::

    import os; os.environ["JAX_PLATFORMS"] = "cpu"     # before JAX starts a backend
    from dsv2_jax import gpu_aot
    mesh = gpu_aot.mesh("h200", devices=8, axes=("expert",))
    x = gpu_aot.abstract(jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16), mesh)
    report = gpu_aot.compile(step, x, kernels=True)
    print(report.memory.peak / 2**30, report.kernels)

Traces run under ``backend.target("gpu")``, so the model takes its GPU paths (Pallas
kernels, ``ragged_dot``) although ``jax.default_backend()`` says "cpu". Every argument must be
placed on the mesh (:func:`abstract`): an argument without a sharding on the GPU topology
would silently turn the whole compile into a CPU compile, which :func:`compile` refuses.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec

from . import backend
from .errors import ConfigError

TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
INSTALL_HINT = 'pip install -e ".[gpu-compile]"  (jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12)'


def target_config(target: str) -> str:
    """The ``GpuTargetConfigProto`` text of ``target`` ('h100' or 'h200'), shipped as package data."""
    if target not in TARGETS:
        raise ConfigError(f"gpu target {target!r}: expected one of {sorted(TARGETS)}")
    return importlib.resources.files("dsv2_jax.gpu_targets").joinpath(TARGETS[target]).read_text()


def device_memory(target: str) -> int:
    """Bytes of device memory the target config declares."""
    return int(re.search(r"device_memory_size:\s*(\d+)", target_config(target)).group(1))


def ptxas() -> str:
    """Path of the ``ptxas`` from the pinned ``nvidia-cuda-nvcc-cu12`` package."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "bin" / "ptxas"
            if path.exists():
                return str(path)
    raise ConfigError(f"gpu_aot: ptxas not found (the nvidia-cuda-nvcc-cu12 package); {INSTALL_HINT}")


def check_installed() -> None:
    """A clear error unless the CUDA PJRT plugin and ptxas are installed and JAX runs on CPU."""
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise ConfigError(f"gpu_aot: the CUDA PJRT plugin is not installed; {INSTALL_HINT}")
    ptxas()
    platforms = os.environ.get("JAX_PLATFORMS", jax.config.jax_platforms or "")
    if platforms != "cpu":
        raise ConfigError(f"gpu_aot: JAX_PLATFORMS={platforms!r}; set JAX_PLATFORMS=cpu before JAX starts "
                          "a backend (with the plugin installed and no GPU, the CUDA backend fails to start)")


def mesh(target: str = "h200", devices: int = 1, axes: tuple[str, ...] = ("x",),
         shape: tuple[int, ...] | None = None) -> jax.sharding.Mesh:
    """A mesh over ``devices`` simulated GPUs of ``target`` (no GPU needed)."""
    from jax.experimental import topologies

    check_installed()
    shape = (devices,) if shape is None else tuple(shape)
    if len(shape) != len(axes) or math.prod(shape) != devices:
        raise ConfigError(f"gpu_aot.mesh: shape {shape} over axes {axes} does not hold {devices} devices")
    topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                        topology=f"1x1x{devices}")
    return topologies.make_mesh(topo, shape, axes)


def abstract_awq(mesh: jax.sharding.Mesh, in_features: int, out_features: int, *, stack: int | None = None,
                 group_size: int = 64):
    """An abstract AutoAWQ GEMM weight ``[in, out]`` (or ``stack`` of them) replicated on ``mesh``."""
    import jax.numpy as jnp

    from .quant.awq import AWQWeight

    lead = () if stack is None else (stack,)
    k, n, g = in_features, out_features, group_size
    S = jax.ShapeDtypeStruct
    w = AWQWeight(S(lead + (k, n // 8), jnp.int32), S(lead + (k // g, n // 8), jnp.int32),
                  S(lead + (k // g, n), jnp.float16), group_size=g, in_features=k, out_features=n)
    return abstract(w, mesh)


def abstract(tree, mesh: jax.sharding.Mesh, specs=None):
    """``tree`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs placed on ``mesh``;
    ``specs``: a matching tree of PartitionSpecs (or one for all leaves); default replicated."""
    leaves, treedef = jax.tree.flatten(tree)
    if specs is None or isinstance(specs, PartitionSpec):
        spec_leaves = [specs or PartitionSpec()] * len(leaves)
    else:
        spec_leaves = treedef.flatten_up_to(specs)
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))
           for x, s in zip(leaves, spec_leaves, strict=True)]
    return treedef.unflatten(out)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device from XLA's buffer assignment."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to an argument + temporaries: what must fit at once."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def gib(self) -> dict[str, float]:
        return {k: round(v / 2**30, 3) for k, v in (
            ("arguments", self.arguments), ("outputs", self.outputs), ("aliased", self.aliased),
            ("temporaries", self.temporaries), ("peak", self.peak))}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch in the compiled program, as XLA's thunk sequence and ``ptxas -v`` report it."""

    name: str
    grid: tuple[int, int, int]
    threads: tuple[int, int, int]
    shared_memory: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None


@dataclasses.dataclass
class Report:
    target: str
    devices: int
    memory: Memory
    hlo: str
    kernels: list[Kernel] | None = None

    def triton_calls(self) -> list[tuple[str, list[str]]]:
        """Each Pallas (Triton) custom call in the optimized HLO: its kernel name and the HLO
        instructions of its operands (``%w_qweight.1`` is a parameter read in place)."""
        calls = []
        for line in self.hlo.splitlines():
            if 'custom_call_target="__gpu$xla.gpu.triton"' not in line:
                continue
            name = re.search(r'name = \\?"([^"\\]+)', line)
            operands = re.search(r"custom-call\(([^)]*)\)", line)
            calls.append((name.group(1) if name else "?",
                          [o.strip() for o in operands.group(1).split(",")] if operands else []))
        return calls


def compile(fn, *args, target: str | None = None, kernels: bool = False, donate_argnums=(),
            static_argnums=()) -> Report:
    """Compile ``fn(*args)`` for the GPU topology the arguments are placed on.

    ``args``: pytrees of ShapeDtypeStructs from :func:`abstract` (static arguments as given).
    ``kernels=True`` also dumps the PTX and reports each launch's registers and spills
    (``ptxas -arch=sm_90a -v``, the same figures XLA's own ptxas run gives).
    """
    check_installed()
    devices = _devices_of(args, static_argnums)
    platforms = {d.platform for d in devices}
    if not platforms or not platforms <= {"gpu", "cuda"}:
        raise ConfigError(f"gpu_aot.compile: every array argument must be placed on a GPU topology mesh "
                          f"(gpu_aot.abstract); found devices of platform(s) {sorted(platforms)} — "
                          "the compile would silently target the CPU")
    jitted = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums)
    with backend.target("gpu"), jax.sharding.use_abstract_mesh(_lowering_mesh(args, static_argnums, devices)):
        lowered = jitted.trace(*args).lower()
    dump = tempfile.mkdtemp(prefix="dsv2_gpu_aot_") if kernels else None
    try:
        # The PTX of every kernel: newer XLA (jax 0.11) dumps it only for emitters named here.
        options = {"xla_dump_to": dump, "xla_dump_emitter_re": ".*"} if dump else None
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
        hlo = compiled.as_text()
        if "fusion_backend_config" not in hlo and "custom_call_target" not in hlo:
            raise ConfigError("gpu_aot.compile: the compiled HLO has no GPU fusions or custom calls; "
                              "this was not a GPU compile")
        m = compiled.memory_analysis()
        memory = Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                        m.temp_size_in_bytes)
        found = _kernels(Path(dump)) if dump else None
    finally:
        if dump:
            shutil.rmtree(dump, ignore_errors=True)
    cfg_target = target or _target_of(devices)
    return Report(cfg_target, len(devices), memory, hlo, found)


def _devices_of(args, static_argnums) -> set:
    devices = set()
    for i, a in enumerate(args):
        if i in static_argnums:
            continue
        for leaf in jax.tree.leaves(a):
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                if hasattr(leaf, "shape"):
                    raise ConfigError(f"gpu_aot.compile: argument {i} has a leaf {leaf.shape} without a "
                                      "sharding; place every argument with gpu_aot.abstract")
                continue
            devices |= set(sharding.device_set)
    return devices


def _lowering_mesh(args, static_argnums, devices) -> jax.sharding.AbstractMesh:
    """The abstract mesh to trace under: that of the arguments' mesh, whose device is the
    simulated GPU. jax 0.11's Pallas Triton lowering asks the mesh in context for the GPU it
    lowers for (the default device here is the CPU); ``shard_map`` wants the same mesh."""
    for i, a in enumerate(args):
        if i in static_argnums:
            continue
        for leaf in jax.tree.leaves(a):
            mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
            if mesh is not None:
                return mesh.abstract_mesh
    d = next(iter(devices))
    device = jax.sharding.AbstractDevice(device_kind=d.device_kind, num_cores=getattr(d, "core_count", None),
                                         platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("_",), abstract_device=device)


def _target_of(devices) -> str:
    kind = next(iter(devices)).device_kind if devices else ""
    return "h200" if "H200" in kind else "h100" if "H100" in kind else kind


_LAUNCH = re.compile(r"(kCustomKernel|kKernel)\s+\[[^\]]*\]\s+(\S+)\s+grid:\s*\[(\d+),\s*(\d+),\s*(\d+)\]\s+"
                     r"threads:\s*\[(\d+),\s*(\d+),\s*(\d+)\]\s+shared_memory:\s*(\d+)")
_PTXAS_FN = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
                       r"stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers", re.S)


def _kernels(dump: Path) -> list[Kernel]:
    regs: dict[str, tuple[int, int, int]] = {}
    exe = ptxas()
    for ptx in sorted(dump.glob("*.ptx")):
        out = subprocess.run([exe, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True, check=False)
        for name, _stack, st, ld, r in _PTXAS_FN.findall(out.stdout + out.stderr):
            regs[name] = (int(r), int(st), int(ld))
    launches = []
    for seq in sorted(dump.glob("*thunk_sequence.txt")):
        for m in _LAUNCH.finditer(seq.read_text()):
            name = m.group(2)
            r = regs.get(name, (None, None, None))
            launches.append(Kernel(name, tuple(map(int, m.group(3, 4, 5))), tuple(map(int, m.group(6, 7, 8))),
                                   int(m.group(9)), *r))
    return launches
