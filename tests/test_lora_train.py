"""LoRA / QLoRA training: gradients against PEFT (torch autograd), one AdamW step by hand, only
adapters in the optimizer state, QLoRA on the AWQ demo, export, resume after SIGKILL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from hf_ref import load_hf
from test_lora import randomize
from tiny import LITE, write_checkpoint

import dsv2_jax
from dsv2_jax.demo import demo_model_path
from dsv2_jax.lora import LoRAConfig, LoRAParam, adapters, add_lora, save_adapter
from dsv2_jax.training.losses import cross_entropy

TARGETS = ("q_proj", "kv_b_proj", "o_proj")
IDS = np.random.default_rng(0).integers(2, 250, (2, 12))


def our_grads(model):
    graphdef, lp, rest = nnx.split(model, LoRAParam, ...)

    def loss(lp):
        logits = nnx.merge(graphdef, lp, rest)(jnp.asarray(IDS[:, :-1]))
        return cross_entropy(logits, jnp.asarray(IDS[:, 1:]))[0]

    return jax.grad(loss)(lp)


def test_adapter_gradients_equal_peft_autograd(tmp_path):
    from peft import PeftModel

    base = write_checkpoint(tmp_path / "base", LITE, seed=7)
    model = dsv2_jax.load(base, dtype="float32")
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS)
    add_lora(model, cfg)
    randomize(model)
    save_adapter(model, tmp_path / "adapter", cfg)
    hf = PeftModel.from_pretrained(load_hf(base), str(tmp_path / "adapter"), is_trainable=True)
    logits = hf(torch.tensor(IDS[:, :-1])).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.tensor(IDS[:, 1:]).reshape(-1)).backward()
    theirs = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
    grads = our_grads(model)
    n = 0
    for path, var in nnx.to_flat_state(grads):
        name = ".".join(["model", "layers", *map(str, path[1:-2])])
        which = {"lora_a": "lora_A", "lora_b": "lora_B"}[path[-1]]
        want = theirs[f"base_model.model.{name}.{which}.default.weight"].T
        np.testing.assert_allclose(np.asarray(var[...]), want, rtol=2e-3, atol=2e-6)
        n += 1
    assert n == len(theirs) == 2 * 3 * LITE["num_hidden_layers"]


def tiny_lora_run(tmp_path, base, **sections):
    from dsv2_jax.training.testing import write_tiny_run

    lora = {"rank": 4, "alpha": 8, "target_modules": list(TARGETS)}
    lora.update(sections.pop("lora", {}))
    return write_tiny_run(tmp_path, model={"preset": None, "init_from": str(base),
                                           "overrides": {"aux_loss_alpha": 0.0}},
                          lora=lora, **sections)


def test_one_step_is_adamw_on_the_adapters_alone(tmp_path):
    """Only adapter leaves in the state; the first update is AdamW's by hand from the
    gradients (themselves checked against PEFT above)."""
    from dsv2_jax import sharding
    from dsv2_jax.training import build
    from dsv2_jax.training.config import load_config
    from dsv2_jax.training.data import load_corpus, pack_rows
    from train.run import make_training

    base = write_checkpoint(tmp_path / "base", dict(LITE, vocab_size=258), seed=8)
    path = tiny_lora_run(tmp_path, base, schedule={"warmup_steps": 0, "peak_lr": 1e-2,
                                                   "total_steps": 4, "decay_points": []},
                         batch={"global_batch": 2, "micro_batch": 2},
                         # eps 1e-3: the first update g / (|g| + eps) is then smooth in g (with 1e-8
                         # it is sign(g), which flips on last-bit noise where g is near 0)
                         optimizer={"clip_norm": None, "eps": 1e-3})
    cfg = load_config(path)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    model_cfg, init = build.model_config(cfg)
    model = build.build_model(cfg, model_cfg, init, mesh=mesh)
    n_adapters = len(adapters(model))
    assert n_adapters == 3 * LITE["num_hidden_layers"]
    t = make_training(cfg, model, mesh)
    leaves = jax.tree.leaves(t.state.params)
    assert len(leaves) == 2 * n_adapters
    shapes = {tuple(x.shape) for x in leaves}
    opt_arrays = [x for x in jax.tree.leaves(t.state.opt_state) if x.ndim]
    assert len(opt_arrays) == 2 * len(leaves)  # AdamW's mu and nu, for the adapters only
    assert all(tuple(x.shape) in shapes for x in opt_arrays)
    before = jax.tree.map(np.asarray, t.state.params)
    # the gradient the step sees, computed outside it
    graphdef = t.graphdef
    tok = build.prepare_tokenizer(cfg, init, tmp_path / "tok", write=True)
    stream = load_corpus(cfg.data.train, tok).train
    batch = pack_rows(stream, np.arange(2), cfg.data.seq_len)
    mb = {k: jnp.asarray(v)[None] for k, v in batch.items()}

    def loss(p):
        from dsv2_jax.training.step import attention_mask, train_forward

        m = nnx.merge(graphdef, p, t.rest)
        out = train_forward(m, mb["inputs"][0], mb["positions"][0], attention_mask(mb["segments"][0]))
        ce, _ = cross_entropy(out.logits, mb["targets"][0], mb["loss_mask"][0])
        return ce

    grads = jax.tree.map(np.asarray, jax.grad(loss)(jax.tree.map(jnp.asarray, before)))
    state, metrics = t.step_fn(t.state, mb)
    assert float(metrics["grad_norm"]) == pytest.approx(
        np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in jax.tree.leaves(grads))), rel=1e-4)
    lr, wd, eps = 1e-2, cfg.optimizer.weight_decay, cfg.optimizer.eps
    checked = 0
    for p0, g, p1 in zip(jax.tree.leaves(before), jax.tree.leaves(grads),
                         jax.tree.leaves(jax.tree.map(np.asarray, state.params))):
        want = p0 - lr * (g / (np.abs(g) + eps) + wd * p0)  # m_hat = g, v_hat = g^2 at step 1
        # Where |g| is not well above eps the update amplifies float32 summation-order noise in
        # g (two differently compiled programs): compare where |g| >= 10 eps, bound the rest.
        sure = np.abs(g) >= 10 * eps
        np.testing.assert_allclose(p1[sure], want[sure], rtol=0, atol=2e-3 * lr)
        assert np.all(np.abs(p1 - p0 * (1 - lr * wd)) <= lr + 1e-7)
        checked += int(sure.sum())
    assert checked > 500
    # B starts at zero, so A's first gradient is zero: A only decays
    lora = next(iter(adapters(nnx.merge(graphdef, state.params, t.rest)).values()))
    assert np.abs(np.asarray(lora.lora_b[...])).max() > 0


def test_qlora_on_the_awq_demo_starts_exact_and_learns(tmp_path):
    base = demo_model_path()
    awq = dsv2_jax.load(base, dtype="float32")
    ids = jnp.asarray([awq.tokenizer.encode("ROMEO: But soft, what light", add_bos=True)])
    want = np.asarray(awq(ids))
    q = dsv2_jax.load(base, dtype="float32")
    add_lora(q, LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "kv_b_proj", "o_proj")))
    assert q.layers[1].self_attn.kv_b_proj.quantized  # the base stays packed
    np.testing.assert_array_equal(np.asarray(q(ids)), want)  # B = 0: exactly the AWQ base
    from train import run

    root = Path(__file__).resolve().parent.parent
    raw = yaml.safe_load((root / "configs" / "demo-qlora.yaml").read_text())
    raw.update(run_dir=str(tmp_path / "run"), model={"init_from": str(base)})
    raw["data"]["train"] = [str(root / "data" / "shakespeare-chat.jsonl")]
    raw["schedule"]["total_steps"] = 12
    raw["logging"] = {"every": 1, "progress": False, "tensorboard": False}
    raw["eval"] = {"every": 0}
    raw["remat"] = {"policy": "full"}  # remat over a frozen base (jax.checkpoint, not nnx.remat)
    (tmp_path / "qlora.yaml").write_text(yaml.safe_dump(raw))
    assert run.main(["--config", str(tmp_path / "qlora.yaml")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    print(f"\nQLoRA on the AWQ demo: loss {np.mean(losses[:3]):.3f} (steps 1-3) -> "
          f"{np.mean(losses[-3:]):.3f} (steps 10-12)")
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2


def test_routed_expert_adapter_gradients_equal_peft_autograd(tmp_path):
    """PEFT stores transformers 5's fused experts' adapters in its own layout (experts
    flattened into the rank axis, gate and up concatenated, B block-diagonal). Where each of
    our numbers lands there is found by loading an adapter whose entries are their own index;
    then the gradients of random adapters are compared entry by entry."""
    from peft import PeftModel

    base = write_checkpoint(tmp_path / "base", LITE, seed=11)
    cfg = LoRAConfig(rank=2, alpha=3, target_modules=("gate_proj", "up_proj", "down_proj"),
                     routed_experts=True)

    def ours_and_peft(fill):
        model = dsv2_jax.load(base, dtype="float32")
        add_lora(model, cfg)
        fill(model)
        folder = tmp_path / f"adapter-{fill.__name__}"
        save_adapter(model, folder, cfg)
        hf = PeftModel.from_pretrained(load_hf(base), str(folder), is_trainable=True)
        return model, hf, {n: p for n, p in hf.named_parameters() if "experts" in n and "lora_" in n}

    def routed(model):  # the routed experts' adapter variables, in a fixed order
        return [getattr(a, w) for n, a in sorted(adapters(model).items()) if "experts.*" in n
                for w in ("lora_a", "lora_b")]

    def numbered(model):
        start = 1
        for name, ad in adapters(model).items():
            if "experts.*" not in name:
                ad.lora_b.set_value(jnp.zeros_like(ad.lora_b[...]))  # PEFT 0.21 drops these
        for var in routed(model):
            size = var[...].size
            var.set_value(jnp.arange(start, start + size, dtype=jnp.float32).reshape(var[...].shape))
            start += size

    model, _, fused = ours_and_peft(numbered)
    where = {}  # our flat index -> (PEFT tensor, flat position)
    for pname, p in fused.items():
        flat = p.detach().numpy().reshape(-1)
        for pos in np.flatnonzero(flat):
            where[int(flat[pos]) - 1] = (pname, int(pos))
    total = sum(var[...].size for var in routed(model))
    assert len(where) == total  # every number of ours sits once in PEFT's tensors

    def random(model):
        randomize(model, seed=12)
        for name, ad in adapters(model).items():
            if "experts.*" not in name:
                ad.lora_b.set_value(jnp.zeros_like(ad.lora_b[...]))

    model, hf, fused = ours_and_peft(random)
    logits = hf(torch.tensor(IDS[:, :-1])).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.tensor(IDS[:, 1:]).reshape(-1)).backward()
    theirs_flat = {n: p.grad.numpy().reshape(-1) for n, p in fused.items()}
    graphdef, _, rest = nnx.split(model, LoRAParam, ...)
    as_model = nnx.merge(graphdef, our_grads(model), rest)  # the gradients in the adapters' places
    ours_flat = np.concatenate([np.asarray(var[...]).reshape(-1) for var in routed(as_model)])
    theirs = np.array([theirs_flat[where[i][0]][where[i][1]] for i in range(total)])
    print(f"\nrouted-expert adapter gradients: {total} entries, max |ours - PEFT| "
          f"{np.abs(ours_flat - theirs).max():.2e} (max |g| {np.abs(theirs).max():.2e})")
    np.testing.assert_allclose(ours_flat, theirs, rtol=2e-3, atol=2e-6)
    assert np.abs(theirs).max() > 1e-4


def test_lora_run_exports_adapter_merge_and_merge_awq(tmp_path, capfd):
    """A lora: run (attention, shared and routed experts) exported three ways: the PEFT folder
    (read back here, by infer.generate --adapter and as another run's lora.init_from), --merge
    (read by transformers) and
    --merge --awq (each packed weight within one quantization step of base + B A · scaling,
    computed here with NumPy from the base's and the adapter's files)."""
    from hf_ref import hf_forward
    from safetensors.numpy import load_file

    from dsv2_jax.quant.awq import dequantize
    from infer import generate as cli
    from train import export, run

    base = write_checkpoint(tmp_path / "base", dict(LITE, vocab_size=258), seed=13)
    path = tiny_lora_run(tmp_path, base, lora={"target_modules": list(TARGETS) + [
        "gate_proj", "up_proj", "down_proj"], "routed_experts": True},
        schedule={"warmup_steps": 0, "peak_lr": 1e-2, "total_steps": 3, "decay_points": []},
        logging={"progress": False})
    assert run.main(["--config", str(path)]) == 0
    run_dir = str(tmp_path / "tiny")
    trained, _, tok = export.load_run_model(run_dir)
    ids = np.array([tok.encode("The old king sees a river.", add_bos=True)])
    want = np.asarray(trained(jnp.asarray(ids)))
    moved = np.abs(want - np.asarray(dsv2_jax.load(base, dtype="float32")(jnp.asarray(ids)))).max()
    assert moved > 0.01  # three steps moved the adapters away from B = 0

    assert export.main([run_dir, "--adapter", str(tmp_path / "adapter")]) == 0
    back = dsv2_jax.load(base, dtype="float32", adapter=tmp_path / "adapter")
    assert back.lora_config.routed_experts
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(ids))), want, atol=1e-5)

    # lora.init_from: a new run starts from the exported adapter; its settings must match it
    from dsv2_jax import sharding
    from dsv2_jax.errors import ConfigError
    from dsv2_jax.training import build
    from dsv2_jax.training.config import load_config

    def build_from(folder, **lora):
        lora = dict({"target_modules": list(TARGETS) + ["gate_proj", "up_proj", "down_proj"],
                     "routed_experts": True, "init_from": str(tmp_path / "adapter")}, **lora)
        cfg = load_config(tiny_lora_run(folder, base, lora=lora))
        model_cfg, init = build.model_config(cfg)
        mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
        return build.build_model(cfg, model_cfg, init, mesh=mesh)

    resumed = build_from(tmp_path / "cont")
    np.testing.assert_allclose(np.asarray(resumed(jnp.asarray(ids))), want, atol=1e-5)
    with pytest.raises(ConfigError, match=r"lora.rank.*the adapter in lora.init_from has 4"):
        build_from(tmp_path / "bad-rank", rank=8)
    with pytest.raises(ConfigError, match=r"lora.routed_experts.*the adapter in lora.init_from has True"):
        build_from(tmp_path / "bad-routed", routed_experts=False)

    assert export.main([run_dir, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert np.abs(hf_forward(load_hf(tmp_path / "merged"), ids)[0] - want).max() <= 1e-4

    assert export.main([run_dir, "--out", str(tmp_path / "awq"), "--merge", "--awq",
                        "--group-size", "32", "--method", "rtn"]) == 0
    q = dsv2_jax.load(tmp_path / "awq", dtype="float32")
    hub = load_file(str(base / "model.safetensors"))
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    scaling = 8 / 4  # alpha / rank
    checked = 0
    expert5 = jax.tree.map(lambda a: a[5], q.layers[2].mlp.experts_down_proj.base())
    for name, got in (("layers.1.self_attn.kv_b_proj", q.layers[1].self_attn.kv_b_proj.awq_weight()),
                      ("layers.1.mlp.shared_experts.up_proj",
                       q.layers[1].mlp.shared_experts.up_proj.awq_weight()),
                      ("layers.2.mlp.experts.5.down_proj", expert5)):
        a = ad[f"base_model.model.model.{name}.lora_A.weight"]
        b = ad[f"base_model.model.model.{name}.lora_B.weight"]
        w = hub[f"model.{name}.weight"].astype(np.float64)
        merged = (w + scaling * b.astype(np.float64) @ a).T  # [in, out]
        deq = np.asarray(dequantize(got, jnp.float32))
        step = np.repeat(np.asarray(got.scales, np.float32), 32, axis=0)
        assert np.all(np.abs(deq - merged) <= step * 1.01 + 1e-6), name
        checked += deq.size
    assert checked > 1000

    for f in ("tokenizer.json", "tokenizer_config.json"):  # the run's tokenizer, for the CLI
        shutil.copy(tmp_path / "merged" / f, base / f)
    capfd.readouterr()
    assert cli.main(["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--dtype",
                     "float32", "--prompt", "The old king", "--max-new-tokens", "5", "--ignore-eos",
                     "--json"]) == 0
    out = json.loads(capfd.readouterr().out)
    prompt = tok.encode("The old king", add_bos=True)
    assert out["prompt_ids"] == prompt
    ours = dsv2_jax.generate(trained, prompt_ids=[prompt], max_new_tokens=5, ignore_eos=True)
    assert out["output_ids"] == list(ours.token_ids[0])
