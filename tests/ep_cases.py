"""Expert-parallel checks that need fake devices, run in a fresh process by the tests.

``run(CASE, FOLDER, ...)`` starts ``python tests/ep_cases.py CASE FOLDER ...`` with 8 fake CPU
devices (XLA_FLAGS must be set before jax starts its backend, and the pytest process already has
one device), which prints one JSON line of measured numbers; the tests assert on them.
Importing this module changes nothing in the importing process.

The reference is always the same checkpoint loaded without a mesh and run on one device:
the plain single-device MoE path (gathered matmul / tiled grouped matmul).
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

import dsv2_jax  # noqa: E402
from dsv2_jax import sharding as sh  # noqa: E402
from dsv2_jax.cache import init_cache  # noqa: E402
from dsv2_jax.mla import AttentionMode  # noqa: E402

# Prefill B·T = 128 tokens (sorted grouped path, tokens split over every device and gathered
# per expert group); decode B rows (gathered-weights path); a lone row of ODD tokens that no
# mesh axis divides (tokens replicated, partial sums psum'ed).
B, T, DECODE, ODD = 8, 16, 1, 5


def tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, (B, T + DECODE)).astype(np.int32)


def prefill_and_decode(model, ids):
    """Prefill T tokens into the latent cache (materialised MLA), then DECODE absorbed steps
    fed the given next tokens. Returns prefill logits [B, T, V], decode logits [B, DECODE, V]
    and the logits of the first ODD tokens of row 0 alone [1, ODD, V]."""
    cfg = model.config
    s = T + DECODE
    cache = init_cache(cfg, B, s, model.dtype)
    causal = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    out = model.forward(ids[:, :T], cache=cache, cache_index=0, mask=causal, mode=AttentionMode.SELF)
    cache, steps = out.cache, []
    for i in range(DECODE):
        slot = T + i
        mask = jnp.broadcast_to(jnp.arange(s) <= slot, (B, 1, s))
        pos = jnp.full((B, 1), slot, jnp.int32)
        o = model.forward(ids[:, slot:slot + 1], pos, cache=cache, cache_index=slot, mask=mask,
                          mode=AttentionMode.LATENT)
        cache = o.cache
        steps.append(o.logits[:, 0])
    return out.logits, jnp.stack(steps, 1), model(ids[:1, :ODD])


_run = jax.jit(prefill_and_decode)
# Cheaper (no cache): the B·T forward (sorted grouped path) and the ODD one (gathered path).
_forward = jax.jit(lambda model, ids: (model(ids), model(ids[:1, :ODD])))


def compare(folder: str, sizes: dict, with_cache: bool = True) -> dict:
    """Max |logit difference| of prefill / decode / odd (``with_cache``; else forward / odd)
    between the checkpoint at ``folder`` on one device and loaded on each mesh of ``sizes``."""
    fn, phases = (_run, ("prefill", "decode", "odd")) if with_cache else (_forward, ("forward", "odd"))
    ref = dsv2_jax.load(folder, dtype="float32")
    ids = jnp.asarray(tokens(ref.config.vocab_size))
    want = [np.asarray(a) for a in fn(ref, ids)]
    res = {"scale": float(np.abs(want[0]).max())}
    for label, kw in sizes.items():
        mesh = sh.make_mesh(**kw)
        model = dsv2_jax.load(folder, dtype="float32", mesh=mesh)
        experts = model.layers[1].mlp.experts_up_proj
        leaves = ({"weight": experts.weight} if not experts.quantized else
                  {"qweight": experts.qweight, "qzeros": experts.qzeros, "scales": experts.scales})
        for name, var in leaves.items():
            res[f"{label}/expert_spec/{name}"] = str(var[...].sharding.spec)
        res[f"{label}/q_proj_spec"] = str(model.layers[0].self_attn.q_proj.weight[...].sharding.spec) \
            if not model.layers[0].self_attn.q_proj.quantized else None
        res[f"{label}/uses_shard_map"] = model.layers[1].mlp.expert_mesh is not None
        got = [np.asarray(a) for a in fn(model, jax.device_put(ids, sh.batch_sharding(mesh, B)))]
        for name, g, w in zip(phases, got, want):
            res[f"{label}/{name}"] = float(np.abs(g - w).max())
    return res


def case_logits(folder: str, eps: list[int]) -> dict:
    return compare(folder, {f"ep{ep}": dict(expert=ep) for ep in eps})


def case_awq_fsdp(folder: str, awq_folder: str) -> dict:
    """AWQ experts split 8 ways; a dense model with FSDP and expert axes together."""
    res = {f"awq/{k}": v for k, v in compare(awq_folder, {"ep8": dict(expert=8)}, with_cache=False).items()}
    res.update({f"dense/{k}": v for k, v in
                compare(folder, {"fsdp2_ep4": dict(fsdp=2, expert=4)}, with_cache=False).items()})
    # A random init straight into (fsdp 2, expert 4) shardings equals the eager one.
    from flax import nnx

    from dsv2_jax import DeepseekV2, DeepseekV2Config

    cfg = DeepseekV2Config.from_json(os.path.join(folder, "config.json"))
    factory = lambda mesh=None: DeepseekV2(cfg, rngs=nnx.Rngs(0), mesh=mesh)  # noqa: E731
    mesh = sh.make_mesh(fsdp=2, expert=4)
    made = sh.create_sharded(lambda: factory(mesh), mesh)
    leaves = zip(jax.tree.leaves(nnx.state(factory())), jax.tree.leaves(nnx.state(made)))
    res["init/diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in leaves)
    res["init/expert_spec"] = str(made.layers[1].mlp.experts_down_proj.weight[...].sharding.spec)
    res["init/uses_shard_map"] = made.layers[1].mlp.expert_mesh is not None
    return res


def case_cuda_lowering() -> dict:
    """Trace the expert-parallel dispatch as on a GPU (the Triton grouped kernels for dense and
    AWQ experts) and lower it for CUDA: catches what shard_map or Pallas would
    refuse there, without a GPU (docs/platform.md)."""
    from dsv2_jax import backend, moe
    from dsv2_jax.quant.awq import AWQWeight

    e, h, i, n, k = 8, 128, 64, 64, 3
    rng = np.random.default_rng(0)

    def awq_stack(n_in, n_out):
        ws = [AWQWeight.quantize(rng.normal(size=(n_in, n_out)).astype(np.float32), group_size=64)
              for _ in range(e)]
        return jax.tree.map(lambda *a: jnp.stack(a), *ws)

    x = jnp.asarray(rng.normal(size=(n, h)), jnp.bfloat16)
    routing = moe.Routing(jnp.zeros((n, e)), jnp.asarray(rng.integers(0, e, (n, k)), jnp.int32),
                          jnp.ones((n, k), jnp.float32))
    weights = {"dense": [jnp.zeros(s, jnp.bfloat16) for s in ((e, h, i), (e, h, i), (e, i, h))],
               "awq": [awq_stack(h, i), awq_stack(h, i), awq_stack(i, h)]}
    mesh = sh.make_mesh(expert=4)
    res = {}
    with backend.target("gpu"):  # the dispatch picks its GPU kernels at trace time
        for label, ws in weights.items():
            with backend.cuda_lowering(mesh) as gpu_mesh:
                f = jax.jit(lambda x, r, *w: moe.dispatch_experts_parallel(x, r, *w, e, gpu_mesh))
                text = f.trace(x, routing, *ws).lower(lowering_platforms=("cuda",)).as_text()
            res[f"{label}/ragged_dot"] = "ragged_dot(" in text
            res[f"{label}/triton"] = "xla.gpu.triton" in text
            res[f"{label}/reduce_scatter"] = "reduce_scatter" in text
    return res


def loss_fn(params, graphdef, rest, ids):
    """Mean next-token cross-entropy + the expert-balance loss (docs/training.md#expert-balance-loss)."""
    from flax import nnx

    from dsv2_jax.training.losses import cross_entropy, total_balance_loss

    model = nnx.merge(graphdef, params, rest)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model.forward(inputs)
    ce, _ = cross_entropy(out.logits, targets)
    return ce + total_balance_loss(out, model.config, *inputs.shape)


_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)


def split(model):
    from flax import nnx

    return nnx.split(model, nnx.Param, ...)


def case_grads(folder: str, eps: list[int]) -> dict:
    ref = dsv2_jax.load(folder, dtype="float32")
    ids = jnp.asarray(tokens(ref.config.vocab_size))
    g, params, rest = split(ref)
    want_loss, want = _grad(params, g, rest, ids)
    want = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(want)}
    res = {"loss": float(want_loss), "grad_scale": max(float(np.abs(v).max()) for v in want.values())}
    for ep in eps:
        mesh = sh.make_mesh(expert=ep)
        g, params, rest = split(dsv2_jax.load(folder, dtype="float32", mesh=mesh))
        loss, got = _grad(params, g, rest, jax.device_put(ids, sh.batch_sharding(mesh, B)))
        got = dict(jax.tree_util.tree_leaves_with_path(got))
        errs = {jax.tree_util.keystr(k): float(np.abs(np.asarray(got[k]) - v).max()) for k, v in want.items()}
        worst = max(errs, key=errs.get)
        res[f"ep{ep}/loss"] = abs(float(loss) - res["loss"])
        res[f"ep{ep}/grad"] = errs[worst]
        res[f"ep{ep}/worst"] = worst
        res[f"ep{ep}/n_grads"] = len(errs)
        spec = [v.sharding.spec for k, v in got.items() if "experts_down_proj" in jax.tree_util.keystr(k)]
        res[f"ep{ep}/expert_grad_spec"] = str(spec[0])
    return res


def case_lora_grads(folder: str, ep: str) -> dict:
    """LoRA adapters on the attention, the shared and (stacked) routed experts, B random:
    adapter gradients with the experts and their adapters split ``ep`` ways (the adapters
    placed by ``tree_shardings``, as train.run does) against one device."""
    from flax import nnx

    from dsv2_jax.lora import LoRAConfig, LoRAParam, add_lora

    lora = LoRAConfig(rank=2, alpha=4, target_modules=("q_proj", "gate_proj", "up_proj", "down_proj"),
                      routed_experts=True)

    def adapted(mesh=None):
        model = dsv2_jax.load(folder, dtype="float32", mesh=mesh)
        add_lora(model, lora)
        g, params, rest = nnx.split(model, LoRAParam, ...)
        params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), params)
        if mesh is not None:
            params = jax.device_put(params, sh.tree_shardings(params, mesh))
        return g, params, rest

    g, params, rest = adapted()
    ids = jnp.asarray(tokens(nnx.merge(g, params, rest).config.vocab_size))
    want_loss, want = _grad(params, g, rest, ids)
    want = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(want)}
    mesh = sh.make_mesh(expert=int(ep))
    g, params, rest = adapted(mesh)
    loss, got = _grad(params, g, rest, jax.device_put(ids, sh.batch_sharding(mesh, B)))
    got = dict(jax.tree_util.tree_leaves_with_path(got))
    errs = {jax.tree_util.keystr(k): float(np.abs(np.asarray(got[k]) - v).max()) for k, v in want.items()}
    worst = max(errs, key=errs.get)
    spec = [str(v.sharding.spec) for k, v in got.items() if "experts_up_proj" in jax.tree_util.keystr(k)]
    # The same adapters saved in PEFT's format and loaded onto the mesh: placed split, same logits.
    import tempfile

    from dsv2_jax.lora import save_adapter

    g1, p1, r1 = adapted()
    single = nnx.merge(g1, p1, r1)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(single, f"{tmp}/adapter", lora)
        on_mesh = dsv2_jax.load(folder, dtype="float32", mesh=mesh, adapter=f"{tmp}/adapter")
    loaded_spec = str(on_mesh.layers[1].mlp.experts_up_proj.lora.lora_a[...].sharding.spec)
    forward = nnx.jit(lambda m, x: m(x))  # eager over 8 fake devices is slow
    loaded_err = float(np.abs(np.asarray(forward(on_mesh, ids)) - np.asarray(forward(single, ids))).max())
    return {"loss": abs(float(loss) - float(want_loss)), "grad": errs[worst], "worst": worst,
            "n_grads": len(errs), "grad_scale": max(float(np.abs(v).max()) for v in want.values()),
            "expert_adapter_spec": spec[0], "loaded_spec": loaded_spec, "loaded_logits": loaded_err}


def case_gpu_paths(folder: str, awq_folder: str) -> dict:
    """The GPU code paths (Pallas kernels in interpret mode, no gather path, shard_map unchecked)
    against the CPU paths on one device: gradients with and without expert parallelism (a data
    axis too, whose gradient all-reduce shard_map must still insert), and logits."""
    from dsv2_jax import backend

    res = {}
    ref = dsv2_jax.load(folder, dtype="float32")
    ids = jnp.asarray(tokens(ref.config.vocab_size))
    g, params, rest = split(ref)
    want_loss, want = _grad(params, g, rest, ids)
    want = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(want)}
    res["grad_scale"] = max(float(np.abs(v).max()) for v in want.values())
    for label, sizes in (("one", None), ("data2_ep4", dict(data=2, expert=4))):
        mesh = None if sizes is None else sh.make_mesh(**sizes)
        g, params, rest = split(dsv2_jax.load(folder, dtype="float32", mesh=mesh))
        x = ids if mesh is None else jax.device_put(ids, sh.batch_sharding(mesh, B))
        with backend.target("gpu", interpret=True):
            fn = jax.value_and_grad(loss_fn)
            loss, got = jax.jit(fn, static_argnums=1)(params, g, rest, x)
            jaxpr = str(jax.make_jaxpr(fn, static_argnums=1)(params, g, rest, x))
        # 2 MoE layers x 3 projections: a forward, a dx and a dW kernel each
        res[f"{label}/kernels"] = {k: jaxpr.count(f"name={k}\n") + jaxpr.count(f"name={k} ")
                                   for k in ("grouped_matmul", "grouped_matmul_dx", "grouped_matmul_dw")}
        got = dict(jax.tree_util.tree_leaves_with_path(got))
        errs = {jax.tree_util.keystr(k): float(np.abs(np.asarray(got[k]) - v).max()) for k, v in want.items()}
        worst = max(errs, key=errs.get)
        res[f"{label}/loss"] = abs(float(loss) - float(want_loss))
        res[f"{label}/grad"], res[f"{label}/worst"], res[f"{label}/n_grads"] = errs[worst], worst, len(errs)
    with backend.target("gpu", interpret=True):
        for name, path, sizes, cached in (("dense", folder, dict(data=2, expert=4), True),
                                          ("awq", awq_folder, dict(expert=8), False)):
            res.update({f"{name}/{k}": v for k, v in compare(path, {"ep": sizes}, with_cache=cached).items()})
    return res


SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def case_flash_sharded() -> dict:
    """The GPU flash-attention path of MLA for a model built on a (data 2, expert 4) mesh: the
    Pallas kernel (interpreted) runs in shard_map over the batch axes, each device on its own
    sequences. Its output and gradients against the CPU path (blockwise attention in JAX, no
    mesh) of the same module, 8 packed rows of 640 tokens (past the 512-token block)."""
    from flax import nnx

    from dsv2_jax import backend
    from dsv2_jax.attention import SegmentMask
    from dsv2_jax.config import DeepseekV2Config
    from dsv2_jax.mla import MLA
    from dsv2_jax.rope import cos_sin

    cfg = DeepseekV2Config.v2_lite(hidden_size=64, num_attention_heads=2, kv_lora_rank=32,
                                   qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                                   rope_scaling=None, max_position_embeddings=1024)
    mesh = sh.make_mesh(data=2, expert=4)
    b, t = 8, 640
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((b, t, cfg.hidden_size)), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(4), t // 4)[None] * np.ones((b, 1), int), jnp.int32)
    cos, sin = cos_sin(cfg, jnp.broadcast_to(jnp.arange(t), (b, t)))
    cot = jnp.asarray(rng.standard_normal((b, t, cfg.num_attention_heads * cfg.v_head_dim)), jnp.float32)
    out = {}
    for label, m in (("cpu", None), ("gpu", mesh)):
        attn = MLA(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32, mesh=m)
        graphdef, params = nnx.split(attn)

        def loss(params, x):
            y, _ = nnx.merge(graphdef, params).heads(x, cos, sin, SegmentMask(segments))
            return jnp.sum(y * cot), y

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        ctx = backend.target("gpu", interpret=True) if m is not None else backend.target("cpu")
        with ctx:
            if m is not None:
                out["shard_map"] = "shard_map" in str(jax.make_jaxpr(loss)(params, x))
            (_, y), grads = f(params, x)
        out[label] = (np.asarray(y), [np.asarray(g) for g in jax.tree.leaves(grads)])
    (y0, g0), (y1, g1) = out.pop("cpu"), out.pop("gpu")
    out["out"] = float(np.abs(y0 - y1).max())
    out["out_scale"] = float(np.abs(y0).max())
    out["grad"] = max(float(np.abs(a - c).max() / (np.abs(a).max() + 1e-12)) for a, c in zip(g0, g1))
    out["n_grads"] = len(g0)
    return out


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather (sync or async start) in optimized HLO text."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s*all-gather(-start)?\(", line)
        if m:
            shapes += [tuple(int(d) for d in s.split(",") if d) for s in SHAPE.findall(m.group(1))]
    return shapes


def case_hlo(folder: str) -> dict:
    """Compile one AdamW step of the CE + balance loss under expert parallelism and list the
    all-gathers; the same step with the MoE on the single-device path is the control."""
    import optax

    from dsv2_jax.training.optim import make_optimizer

    from dsv2_jax import expert_weights as ew

    from dsv2_jax import moe

    res = {}
    tx = make_optimizer(1e-3)
    batched_limit, choose = ew.BATCHED_TILES_MAX_BYTES, moe._path
    for label, sizes, ep_on in [("ep4_data2", dict(data=2, expert=4), True),
                                ("ep4_fsdp2", dict(fsdp=2, expert=4), True),
                                ("control", dict(data=2, expert=4), False)]:
        # The control's experts take the loop over tiles (each reads its expert's weights), which
        # makes XLA all-gather the sharded stacks whole: proof that the check can fire.
        ew.BATCHED_TILES_MAX_BYTES = batched_limit if ep_on else 0
        moe._path = choose if ep_on else (lambda *_: "sorted")  # not every expert at once
        mesh = sh.make_mesh(**sizes)
        # The control's MoE layers are built without the mesh: the single-device dispatch.
        model = dsv2_jax.load(folder, dtype="float32", mesh=mesh if ep_on else None)
        cfg = model.config
        g, params, rest = split(model)

        def step(params, opt_state, ids):
            loss, grads = jax.value_and_grad(loss_fn)(params, g, rest, ids)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        opt_state = tx.init(params)
        p_sh, o_sh = sh.tree_shardings(params, mesh), sh.tree_shardings(opt_state, mesh)
        params, opt_state = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
                             for t in (params, opt_state))
        ids = jax.ShapeDtypeStruct((B, T + DECODE), jnp.int32, sharding=sh.batch_sharding(mesh, B))
        hlo = jax.jit(step, in_shardings=(p_sh, o_sh, ids.sharding),
                      out_shardings=(p_sh, o_sh, None)).lower(params, opt_state, ids).compile().as_text()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        full = {(e, h, i), (e, i, h)}
        shapes = all_gathers(hlo)
        res[f"{label}/all_gathers"] = [list(s) for s in shapes]
        res[f"{label}/full_expert_gathers"] = sum(s in full for s in shapes)
        res[f"{label}/local_expert_gathers"] = sum(s in {(e // 4, h, i), (e // 4, i, h)} for s in shapes)
        res[f"{label}/reduce_scatters"] = len(re.findall(r"reduce-scatter(-start)?\(", hlo))
        res[f"{label}/opt_state_specs"] = sorted({
            str(v.spec) for k, v in jax.tree_util.tree_leaves_with_path(o_sh)
            if "experts_down_proj" in jax.tree_util.keystr(k)})
    return res


def run(case: str, *args, timeout: int = 240) -> dict:
    """Run CASE in a fresh process with 8 fake CPU devices; its measured numbers as a dict."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=str(here.parent), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = subprocess.run([sys.executable, str(here / "ep_cases.py"), case, *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"ep_cases {case} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def main():
    # Before the first device query (importing jax does not start a backend); run() sets it too.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    case, *rest = sys.argv[1:]
    folder = rest.pop(0) if rest else None
    if case == "logits":
        out = case_logits(folder, [int(x) for x in rest[0].split(",")])
    elif case == "awq_fsdp":
        out = case_awq_fsdp(folder, rest[0])
    elif case == "cuda_lowering":
        out = case_cuda_lowering()
    elif case == "grads":
        out = case_grads(folder, [int(x) for x in rest[0].split(",")])
    elif case == "lora_grads":
        out = case_lora_grads(folder, rest[0])
    elif case == "hlo":
        out = case_hlo(folder)
    elif case == "flash_sharded":
        out = case_flash_sharded()
    elif case == "gpu_paths":
        out = case_gpu_paths(folder, rest[0])
    else:
        raise SystemExit(f"unknown case {case!r}")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
