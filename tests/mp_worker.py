"""One process of the multi-process test (tests/test_multiprocess.py), or its reference.

    python tests/mp_worker.py FOLDER OUT.npz single
    python tests/mp_worker.py FOLDER OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID

``single``: one process, one device, no mesh (the plain single-device model). Otherwise the
process joins a jax.distributed run over gloo with 2 CPU devices of its own, loads the model
into a ("data", "fsdp", "expert") = (1, 1, 4) mesh, so the expert axis spans both processes,
and runs the same forward pass and one AdamW step of cross-entropy + balance loss, then greedy
``dsv2_jax.generate``. Process 0 writes the gathered logits, loss, gradients, updated parameters
and generated tokens; every process writes which routed experts it read from the checkpoint.
"""

from __future__ import annotations

import os
import re
import sys

folder, out, mode, *dist = sys.argv[1:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={1 if mode == 'single' else 2}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if mode != "single":
    from dsv2_jax.distributed import initialize

    initialize(mode, int(dist[0]), int(dist[1]))

import optax  # noqa: E402
import safetensors  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import dsv2_jax  # noqa: E402
from dsv2_jax import sharding as sh  # noqa: E402
from dsv2_jax.training.losses import cross_entropy, total_balance_loss  # noqa: E402
from dsv2_jax.training.optim import make_optimizer  # noqa: E402

read: list[str] = []
_safe_open = safetensors.safe_open


class _Recording:
    """safe_open that records the tensors read (load() imports safe_open at call time)."""

    def __init__(self, *a, **k):
        self.f = _safe_open(*a, **k)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, k):
        read.append(k)
        return self.f.get_tensor(k)


safetensors.safe_open = _Recording


def loss_fn(params, graphdef, rest, ids):
    model = nnx.merge(graphdef, params, rest)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model.forward(inputs)
    ce, _ = cross_entropy(out.logits, targets)
    return ce + total_balance_loss(out, model.config, *inputs.shape), out.logits


def train_step(tx, graphdef, rest):
    """One optimizer step (one compile): the forward's logits, the loss, the gradients and
    the new params."""
    def step(params, opt_state, ids):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, rest, ids)
        updates, _ = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), loss, grads, logits

    return step


def main():
    ids = np.random.default_rng(0).integers(2, 512, (4, 17)).astype(np.int32)
    # Adam's first update is lr·g/(|g| + eps): with the default eps 1e-8 float noise in
    # near-zero gradients (~1e-8 here) moves it by up to lr. eps 1e-3 bounds that by lr/eps·noise.
    tx = make_optimizer(1e-2, eps=1e-3)
    if mode == "single":
        model = dsv2_jax.load(folder, dtype="float32")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt_state = tx.init(params)
        before = jax.tree.map(np.asarray, params)
        params, loss, grads, logits = jax.jit(train_step(tx, graphdef, rest))(params, opt_state, ids)
        gather = np.asarray
        res_moved = max(float(np.abs(np.asarray(a) - b).max())
                        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)))
    else:
        mesh = sh.make_mesh(expert=4)
        model = dsv2_jax.load(folder, dtype="float32", mesh=mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        batch = sh.batch_sharding(mesh, ids.shape[0])
        ids_g = jax.make_array_from_callback(ids.shape, batch, lambda idx: ids[idx])
        p_sh = sh.tree_shardings(params, mesh)
        o_sh = sh.tree_shardings(jax.eval_shape(tx.init, params), mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        step = jax.jit(train_step(tx, graphdef, rest), in_shardings=(p_sh, o_sh, batch),
                       out_shardings=(p_sh, None, p_sh, None))
        params, loss, grads, logits = step(params, opt_state, ids_g)
        gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))  # noqa: E731
        spec = str(model.layers[1].mlp.experts_gate_proj.weight[...].sharding.spec)
    gen = dsv2_jax.generate(model, prompt_ids=[[5, 6, 7, 8, 9], [10, 11, 12]], max_new_tokens=6,
                            ignore_eos=True)
    res = {"logits": gather(logits), "loss": gather(loss)}
    if mode == "single":
        res["moved"] = np.array(res_moved)
    for k, v in jax.tree_util.tree_leaves_with_path(params):
        res["param:" + jax.tree_util.keystr(k)] = gather(v)
    for k, v in jax.tree_util.tree_leaves_with_path(grads):
        res["grad:" + jax.tree_util.keystr(k)] = gather(v)
    experts = sorted({int(m.group(1)) for k in read if (m := re.search(r"experts\.(\d+)\.", k))})
    meta = {"generated": np.array(gen.token_ids), "experts_read": np.array(experts), "tensors_read": np.array(len(read)),
            "devices": np.array(jax.device_count()), "processes": np.array(jax.process_count())}
    if mode == "single":
        np.savez(out, **res, **meta)
    else:
        meta["expert_spec"] = np.array(spec)
        np.savez(f"{out}.{jax.process_index()}.meta.npz", **meta)
        if jax.process_index() == 0:
            np.savez(out, **res)
    print("done", jax.process_index(), flush=True)


if __name__ == "__main__":
    main()
