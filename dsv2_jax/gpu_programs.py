"""The project's real programs at full DeepSeek-V2-Lite size, compiled for a GPU without one.

Each function builds abstract parameters (nothing is allocated), places them on a mesh of
simulated GPUs (:mod:`dsv2_jax.gpu_aot`) with the project's own sharding rules, and compiles
the same jitted code a user runs: the decode loop and a prefill chunk of
``dsv2_jax.generation``, one MoE layer's forward and backward, the training step of
``dsv2_jax.training.step``. They return a :class:`dsv2_jax.gpu_aot.Report`::

    JAX_PLATFORMS=cpu python -m dsv2_jax.gpu_programs train --devices 8 --target h100

prints what one device of an 8 × H100 node would hold. Used by ``tests/test_gpu_compile.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from . import gpu_aot
from . import sharding as sh
from .config import DeepseekV2Config, QuantConfig


def v2_lite(quant: str = "bf16", **overrides) -> DeepseekV2Config:
    """V2-Lite's config; ``quant='awq'`` stores the linears as AutoAWQ GEMM 4-bit, group 64."""
    cfg = DeepseekV2Config.v2_lite(**overrides)
    if quant == "awq":
        cfg = dataclasses.replace(cfg, quantization=QuantConfig(group_size=64))
    elif quant != "bf16":
        raise ValueError(f"quant={quant!r}: expected 'bf16' or 'awq'")
    return cfg


def _mesh(target: str, devices: int, expert: int = 1):
    shape = (1, devices // expert, expert)  # data, fsdp, expert
    return gpu_aot.mesh(target, devices, axes=sh.MESH_AXES, shape=shape)


def _placed(tree, mesh, rules=sh.RULES):
    return gpu_aot.abstract(tree, mesh, jax.tree.map(lambda s: s.spec, sh.tree_shardings(tree, mesh, rules)))


def _model(cfg, mesh, param_dtype="bfloat16", dtype="bfloat16"):
    from .model import DeepseekV2

    moe_mesh = mesh if sh.axis_size(mesh, sh.EXPERT) > 1 else None
    return nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype,
                                             mesh=moe_mesh))


def _cache(cfg, mesh, batch: int, context: int):
    from .cache import init_cache

    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, jnp.bfloat16))
    return gpu_aot.abstract(cache, mesh, jax.tree.map(lambda _: sh.batch_spec(mesh, batch), cache))


def decode_loop(quant: str = "bf16", batch: int = 1, context: int = 4096, target: str = "h200",
                kernels: bool = False) -> gpu_aot.Report:
    """``generation._decode_loop`` (greedy) over a cache of ``context`` slots on one GPU."""
    from . import generation
    from .sampling import SamplerVariant, SamplingParams, SamplingValues

    cfg = v2_lite(quant)
    mesh = _mesh(target, 1)
    graphdef, state = nnx.split(_model(cfg, mesh))
    state = _placed(state, mesh)
    params = SamplingParams()
    rep = gpu_aot.abstract
    carry = generation.DecodeState(
        cache=_cache(cfg, mesh, batch, context),
        logits=jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32),
        key=jax.eval_shape(lambda: jax.random.key(0)),
        tokens=jax.ShapeDtypeStruct((batch, 256), jnp.int32), done=jax.ShapeDtypeStruct((batch,), bool),
        step=jax.ShapeDtypeStruct((), jnp.int32), slot=jax.ShapeDtypeStruct((), jnp.int32),
        pad=jax.ShapeDtypeStruct((batch,), jnp.int32), max_new=jax.ShapeDtypeStruct((), jnp.int32))
    carry = rep(carry, mesh)
    values = rep(jax.eval_shape(lambda: SamplingValues.of(params)), mesh)
    static = dict(variant=SamplerVariant.of(params), vocab_limit=cfg.vocab_size, eos_id=-1, ignore_eos=True)

    def run(state, values, carry):
        return generation._decode_loop(graphdef, state, values, carry, **static)

    return gpu_aot.compile(run, state, values, carry, donate_argnums=(2,), kernels=kernels)


def prefill_chunk(quant: str = "bf16", batch: int = 1, context: int = 4096, chunk: int | None = None,
                  target: str = "h200", kernels: bool = False) -> gpu_aot.Report:
    """The last prefill chunk of a ``context``-token prompt: ``chunk`` tokens per row (default:
    what ``generate`` uses for this batch) attending over all ``context`` cache slots
    (``generation._prefill_chunk``, mode CACHE)."""
    from . import generation
    from .mla import AttentionMode

    chunk = chunk or generation.prefill_chunk(batch, context)

    cfg = v2_lite(quant)
    mesh = _mesh(target, 1)
    graphdef, state = nnx.split(_model(cfg, mesh))
    state = _placed(state, mesh)
    rep = gpu_aot.abstract
    ids = rep(jax.ShapeDtypeStruct((batch, chunk), jnp.int32), mesh)
    pad = rep(jax.ShapeDtypeStruct((batch,), jnp.int32), mesh)
    start = rep(jax.ShapeDtypeStruct((), jnp.int32), mesh)
    cache = _cache(cfg, mesh, batch, context)

    def run(state, ids, pad, cache, start):
        return generation._prefill_chunk(graphdef, state, ids, pad, cache, start, mode=AttentionMode.CACHE,
                                         attend_len=context)

    return gpu_aot.compile(run, state, ids, pad, cache, start, donate_argnums=(3,), kernels=kernels)


def moe_layer(tokens: int = 4096, dtype: str = "bfloat16", target: str = "h200",
              kernels: bool = False) -> gpu_aot.Report:
    """One V2-Lite MoE layer (router, 64 routed + 2 shared experts) forward and backward over
    ``tokens`` tokens on one GPU: the gradient of a scalar loss with respect to the input and
    every weight, as a training step computes it."""
    from .moe import MoE

    cfg = v2_lite()
    mesh = _mesh(target, 1)
    layer = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype),
                                       dtype=jnp.dtype(dtype)))
    graphdef, params = nnx.split(layer)
    params = gpu_aot.abstract(params, mesh)
    x = gpu_aot.abstract(jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.dtype(dtype)), mesh)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return gpu_aot.compile(jax.grad(loss, argnums=(0, 1)), params, x, kernels=kernels)


def train_step(devices: int = 8, tokens_per_device: int = 4096, target: str = "h100",
               expert: int | None = None, remat: str = "full", rules=None) -> gpu_aot.Report:
    """The full V2-Lite training step (float32 master weights + AdamW, bf16 compute) on
    ``devices`` simulated GPUs, experts split ``expert`` ways (default: min(devices, 64)), one
    sequence of ``tokens_per_device`` tokens per device, laid out by ``rules`` (default: the
    training rules of ``dsv2_jax.sharding``)."""
    from .training import lr_schedule, make_optimizer
    from .training.step import init_state, make_train_step

    cfg = v2_lite()
    expert = min(devices, cfg.n_routed_experts) if expert is None else expert
    rules = sh.TRAIN_RULES if rules is None else rules
    mesh = _mesh(target, devices, expert)
    graphdef, params, rest = nnx.split(_model(cfg, mesh, param_dtype="float32"), nnx.Param, ...)
    schedule = lr_schedule(4.2e-4, 2000, 100_000)
    tx = make_optimizer(schedule)
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    state = _placed(state, mesh, rules)
    rest = _placed(rest, mesh, rules)
    param_sh = sh.tree_shardings(params, mesh, rules)
    i32 = jax.ShapeDtypeStruct((1, devices, tokens_per_device), jnp.int32)
    batch = {"inputs": i32, "targets": i32, "segments": i32, "positions": i32,
             "loss_mask": jax.ShapeDtypeStruct((1, devices, tokens_per_device), jnp.bool_)}
    batch = gpu_aot.abstract(batch, mesh, jax.tree.map(lambda _: sh.P(None, *sh.batch_spec(mesh, devices)), batch))

    def step(state, rest, batch):
        return make_train_step(graphdef, rest, tx, schedule, cfg, remat=remat, param_shardings=param_sh)(state, batch)

    return gpu_aot.compile(step, state, rest, batch, donate_argnums=(0,))


LORA_TARGETS = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def lora_step(base: str = "awq", tokens: int = 4096, rank: int = 16, target: str = "h200",
              remat: str = "full", mlp: bool = False, dropout: float = 0.0) -> gpu_aot.Report:
    """One LoRA (bf16 base) or QLoRA (AWQ g64 base) training step on one GPU: adapters of
    ``rank`` on the attention linears of every layer (``mlp``: and on every MLP linear, one per
    routed expert too; ``dropout`` on the adapters' input), one sequence of ``tokens`` tokens;
    the frozen base is an argument, AdamW state covers the adapters only."""
    from .lora import LoRAConfig, LoRAParam, add_lora
    from .model import DeepseekV2
    from .training import lr_schedule, make_optimizer
    from .training.step import init_state, make_train_step

    cfg = v2_lite(base)
    mesh = _mesh(target, 1)
    targets = LORA_TARGETS + (("gate_proj", "up_proj", "down_proj") if mlp else ())
    lora = LoRAConfig(rank=rank, alpha=2 * rank, target_modules=targets, routed_experts=mlp,
                      dropout=dropout)

    def build():
        model = DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype="bfloat16", dtype="bfloat16")
        add_lora(model, lora)
        return model

    graphdef, params, rest = nnx.split(nnx.eval_shape(build), LoRAParam, ...)
    schedule = lr_schedule(2e-4, 10, 1000)
    tx = make_optimizer(schedule)
    state = gpu_aot.abstract(jax.eval_shape(lambda p: init_state(p, tx, 0), params), mesh)
    rest = gpu_aot.abstract(rest, mesh)
    i32 = jax.ShapeDtypeStruct((1, 1, tokens), jnp.int32)
    batch = gpu_aot.abstract({"inputs": i32, "targets": i32, "segments": i32, "positions": i32,
                              "loss_mask": jax.ShapeDtypeStruct((1, 1, tokens), jnp.bool_)}, mesh)

    def step(state, rest, batch):
        return make_train_step(graphdef, rest, tx, schedule, cfg, remat=remat)(state, batch)

    return gpu_aot.compile(step, state, rest, batch, donate_argnums=(0,))


PROGRAMS = {"decode": decode_loop, "prefill": prefill_chunk, "moe": moe_layer, "train": train_step,
            "lora": lora_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile a full-size V2-Lite program for a GPU target "
                                "on this machine (no GPU needed) and print its memory per device.")
    p.add_argument("program", choices=sorted(PROGRAMS))
    p.add_argument("--target", choices=sorted(gpu_aot.TARGETS), default=None)
    p.add_argument("--quant", choices=["bf16", "awq"], default="bf16",
                   help="decode / prefill weights; lora: the base (awq = QLoRA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096, help="moe: tokens; train: tokens per device")
    p.add_argument("--devices", type=int, default=8, help="train: simulated GPUs")
    p.add_argument("--kernels", action="store_true", help="also list every launch (registers, spills)")
    p.add_argument("--lora-mlp", action="store_true",
                   help="lora: adapters on the MLPs and each routed expert too")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="lora: the adapters' dropout")
    a = p.parse_args(argv)
    if a.lora_mlp and a.lora_dropout:
        p.error("--lora-dropout: dropout on the routed experts' adapters (--lora-mlp) is not built")
    kw = {} if a.target is None else {"target": a.target}
    if a.program in ("decode", "prefill"):
        r = PROGRAMS[a.program](a.quant, a.batch, a.context, kernels=a.kernels, **kw)
    elif a.program == "moe":
        r = moe_layer(a.tokens, kernels=a.kernels, **kw)
    elif a.program == "lora":
        r = lora_step(a.quant, a.tokens, mlp=a.lora_mlp, dropout=a.lora_dropout, **kw)
    else:
        r = train_step(a.devices, a.tokens, **kw)
    out = {"program": a.program, "target": r.target, "devices": r.devices, "memory_gib": r.memory.gib()}
    if r.kernels is not None:
        out["kernels"] = [dataclasses.asdict(k) for k in r.kernels]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
