"""Compiled memory of a full-size DeepSeek-V2-Lite LoRA / QLoRA training step.

    python bench/lora_memory.py [--tokens 4096] [--rank 16] [--base bf16 awq]

The real training step (``dsv2_jax.training.step.make_train_step``: forward, backward through
the frozen base into the adapters, clipping, AdamW on the adapters) for V2-Lite with adapters
on q_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj of every layer, one sequence of
``--tokens`` tokens, remat ``full``, bf16 compute; the base in bf16 or AWQ 4-bit g64 (QLoRA).
Everything is abstract (nothing allocated) and compiled for this machine's CPU; XLA's memory
analysis gives the arguments (base + adapters + AdamW state), the temporaries and their sum,
the peak a device would need. On the CPU the AWQ base is dequantized by the pure-JAX reference
(one linear at a time); the GPU kernels read it packed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def compiled_memory(base: str, tokens: int, rank: int, remat: str = "full") -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax import DeepseekV2, DeepseekV2Config
    from dsv2_jax.config import QuantConfig
    from dsv2_jax.lora import LoRAConfig, LoRAParam, add_lora
    from dsv2_jax.training import lr_schedule, make_optimizer
    from dsv2_jax.training.step import init_state, make_train_step

    cfg = DeepseekV2Config.v2_lite()
    if base == "awq":
        cfg = dataclasses.replace(cfg, quantization=QuantConfig(group_size=64))
    lora = LoRAConfig(rank=rank, alpha=2 * rank, target_modules=TARGETS)

    def build():
        model = DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype="bfloat16", dtype="bfloat16")
        add_lora(model, lora)
        return model

    model = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(model, LoRAParam, ...)
    schedule = lr_schedule(2e-4, 10, 1000)
    tx = make_optimizer(schedule)
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), params)

    def step(state, rest, batch):  # the frozen base is an argument (abstract here), not a constant
        return make_train_step(graphdef, rest, tx, schedule, cfg, remat=remat)(state, batch)
    i32 = jax.ShapeDtypeStruct((1, 1, tokens), jnp.int32)
    batch = {"inputs": i32, "targets": i32, "segments": i32, "positions": i32,
             "loss_mask": jax.ShapeDtypeStruct((1, 1, tokens), jnp.bool_)}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, rest, batch).compile()
    mem = compiled.memory_analysis()
    n_lora = sum(x.size for x in jax.tree.leaves(params))
    gib = 2.0 ** 30
    return {"base": base, "tokens": tokens, "rank": rank, "adapter_params": int(n_lora),
            "arguments_gib": mem.argument_size_in_bytes / gib,
            "temporaries_gib": mem.temp_size_in_bytes / gib,
            "peak_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / gib,
            "compile_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--base", nargs="+", default=["bf16", "awq"], choices=["bf16", "awq"])
    args = p.parse_args(argv)
    for base in args.base:
        r = compiled_memory(base, args.tokens, args.rank)
        print(f"V2-Lite {'QLoRA (AWQ g64 base)' if base == 'awq' else 'LoRA (bf16 base)'}, rank "
              f"{r['rank']} on {', '.join(TARGETS)} ({r['adapter_params'] / 1e6:.1f} M adapter "
              f"parameters), {r['tokens']} tokens, remat full: arguments {r['arguments_gib']:.2f} "
              f"GiB + temporaries {r['temporaries_gib']:.2f} GiB = {r['peak_gib']:.2f} GiB "
              f"(compiled in {r['compile_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
