"""Compile every GPU program at full V2-Lite size for an H200 / H100 on this CPU-only machine.

    JAX_PLATFORMS=cpu python bench/gpu_compile_report.py [--only kernels moe inference train] [--json OUT]

Needs ``pip install -e ".[gpu-compile]"``. Prints two tables (docs/figures.md#gpu-compile):

- kernels: every Pallas kernel launch at V2-Lite matmul shapes and M = 1, 8, 64, 512 rows
  (attention, dense layer, shared experts through ``awq_linear``; routed experts through the
  grouped kernels, M tokens × 6 experts): grid, registers, shared memory, spills;
- programs: peak memory per device of the decode loop and a prefill chunk (bf16 / AWQ,
  batch 1 / 64, 4K / 32K context, one H200), one MoE layer's forward + backward over 4,096
  tokens, and the full training step on 8 / 16 / 64 simulated H100-80GB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, in, out) of every quantized linear of V2-Lite (lm_head stays bf16)
LINEARS = [("q_proj", 2048, 3072), ("kv_a_proj_with_mqa", 2048, 576), ("kv_b_proj", 512, 4096),
           ("o_proj", 2048, 2048), ("dense gate/up", 2048, 10944), ("dense down", 10944, 2048),
           ("shared gate/up", 2048, 2816), ("shared down", 2816, 2048)]
EXPERTS = [("expert gate/up", 2048, 1408), ("expert down", 1408, 2048)]
ROWS = (1, 8, 64, 512)


def kernel_table(target="h200"):
    import jax
    import jax.numpy as jnp

    from dsv2_jax import gpu_aot, kernels
    from dsv2_jax.quant import ops

    mesh = gpu_aot.mesh(target)
    S = jax.ShapeDtypeStruct
    rows = []

    def add(label, m, report, only=None):
        for k in report.kernels:
            if only is None or k.name in only:
                rows.append({"shape": label, "M": m, **k.__dict__})

    pallas = {"awq_matmul", "awq_dequant", "awq_grouped_matmul", "grouped_matmul", "grouped_matmul_dx",
              "grouped_matmul_dw"}
    for name, k, n in LINEARS:
        w = gpu_aot.abstract_awq(mesh, k, n)
        for m in ROWS:
            x = gpu_aot.abstract(S((m, k), jnp.bfloat16), mesh)
            add(f"AWQ {name} {k}→{n}", m, gpu_aot.compile(ops.awq_linear, x, w, kernels=True), pallas)
    for name, k, n in EXPERTS:
        w = gpu_aot.abstract_awq(mesh, k, n, stack=64)
        wd = gpu_aot.abstract(S((64, k, n), jnp.bfloat16), mesh)
        g = gpu_aot.abstract(S((64,), jnp.int32), mesh)
        for m in ROWS:
            x = gpu_aot.abstract(S((6 * m, k), jnp.bfloat16), mesh)
            dy = gpu_aot.abstract(S((6 * m, n), jnp.bfloat16), mesh)
            add(f"AWQ {name} E=64 {k}→{n}", 6 * m,
                gpu_aot.compile(ops.awq_grouped_linear, x, w, g, kernels=True), pallas)

            def fwd_bwd(x, w, g, dy):
                y, vjp = jax.vjp(lambda x, w: kernels.grouped_matmul(x, w, g, implementation="triton"), x, w)
                return y, vjp(dy)

            add(f"bf16 {name} E=64 {k}→{n} (fwd, dx, dW)", 6 * m,
                gpu_aot.compile(fwd_bwd, x, wd, g, dy, kernels=True), pallas)
    return rows


def program_table(only):
    from dsv2_jax import gpu_programs as gp

    out = []

    def add(label, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        row = {"program": label, "target": r.target, "devices": r.devices, **r.memory.gib(),
               "compile_s": round(time.perf_counter() - t0, 1)}
        out.append(row)
        print(json.dumps(row), flush=True)

    if "moe" in only:
        add("MoE layer fwd+bwd, bf16, 4096 tokens", gp.moe_layer, 4096)
    if "inference" in only:
        for quant in ("bf16", "awq"):
            for batch in (1, 64):
                for context in (4096, 32768):
                    add(f"decode loop {quant} B={batch} S={context}", gp.decode_loop, quant, batch, context)
                    add(f"prefill chunk 512 {quant} B={batch} S={context}", gp.prefill_chunk, quant, batch,
                        context)
    if "train" in only:
        for devices in (8, 16, 64):
            add(f"train step, {devices}×H100, 4096 tok/device", gp.train_step, devices)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=["kernels", "moe", "inference", "train"],
                   choices=["kernels", "moe", "inference", "train"])
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    result = {}
    if "kernels" in a.only:
        result["kernels"] = kernel_table()
        print("| shape | M | kernel | grid | regs | smem B | spill B |\n|---|---|---|---|---|---|---|")
        for r in result["kernels"]:
            print(f"| {r['shape']} | {r['M']} | {r['name']} | {list(r['grid'])} | {r['registers']} | "
                  f"{r['shared_memory']} | {r['spill_stores']} |", flush=True)
    result["programs"] = program_table(set(a.only))
    if result["programs"]:
        print("| program | args GiB | temp GiB | peak GiB |\n|---|---|---|---|")
        for r in result["programs"]:
            print(f"| {r['program']} | {r['arguments']:.2f} | {r['temporaries']:.2f} | {r['peak']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
