"""Training step speed: dsv2-jax's train step against transformers + torch AdamW, one process.

    python bench/train_vs_hf.py                       # 4 layers, hidden 256, 16 experts top-4, 8 x 256
    python bench/train_vs_hf.py --dense               # every layer a dense MLP
    python bench/train_vs_hf.py --profile runs/trace  # also a jax.profiler trace of our steps

Both train the same random checkpoint (hub format, float32) on the same random batch: ours is
``train.run``'s step (``make_training``: AdamW 0.9/0.95, wd 0.1, clip 1.0, the expert-balance loss,
remat none, one micro-batch, no document mask), theirs ``DeepseekV2ForCausalLM(labels=...)``,
``backward``, ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` with the same settings. The two
alternate, ``--rounds`` times ``--steps`` steps each after a warm-up, and the medians of the step
times are compared. The first losses are printed side by side (they should agree: same weights,
same batch; ours adds the balance loss, 0.001 × ~1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def hub_config(args) -> dict:
    return dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=args.vocab,
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=2 * args.hidden, moe_intermediate_size=args.hidden // 4, kv_lora_rank=64,
        q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_shared_experts=1,
        first_k_dense_replace=args.layers if args.dense else 1, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, aux_loss_alpha=0.001,
        seq_aux=True, rope_theta=10000.0, max_position_embeddings=4 * args.seq, rope_scaling=None,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, hidden_act="silu",
        torch_dtype="float32")


def ours(folder: Path, work: Path, args, ids):
    """A jitted train step of train.run and its state, and the batch on the device."""
    import numpy as np
    import yaml

    from dsv2_jax.sharding import make_mesh, put_batch
    from dsv2_jax.training import build
    from dsv2_jax.training.config import load_config
    from train.run import make_training

    config = dict(
        run_dir=str(work / "run"), seed=0, model=dict(init_from=str(folder)),
        data=dict(train=[str(work / "unused.txt")], tokenizer="bytes", seq_len=args.seq, document_mask=False),
        optimizer=dict(b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0),
        schedule=dict(peak_lr=1e-3, warmup_steps=10, total_steps=1000000),
        batch=dict(global_batch=args.batch, micro_batch=args.batch),
        precision=dict(param_dtype="float32", compute_dtype="float32"), remat=dict(policy="none"),
        mesh=dict(data=1))
    (work / "unused.txt").write_text("x")
    (work / "bench.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(work / "bench.yaml")
    mesh = make_mesh(1)
    model_cfg, init_folder = build.model_config(cfg)
    model = build.build_model(cfg, model_cfg, init_folder, mesh=mesh)
    t = make_training(cfg, model, mesh)
    g, seq = ids.shape[0], ids.shape[1] - 1
    host = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((g, seq), bool),
            "segments": np.zeros((g, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (g, seq)).copy()}
    return t.step_fn, t.state, put_batch(t.micro_batched(host), mesh)


def theirs(folder: Path, ids):
    import torch
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    inputs, labels = torch.tensor(ids[:, :-1]).long(), torch.tensor(ids[:, 1:]).long()

    def step():
        loss = model(input_ids=inputs, labels=None).logits
        loss = torch.nn.functional.cross_entropy(loss.reshape(-1, loss.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dense", action="store_true", help="every layer a dense MLP (no MoE)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", help="write a jax.profiler trace of one round of our steps here")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    import jax
    import numpy as np
    import torch

    from dsv2_jax.testing import write_checkpoint

    ids = np.random.default_rng(0).integers(2, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        folder = write_checkpoint(Path(d) / "m", hub_config(args), seed=0)
        step_fn, state, batch = ours(folder, Path(d), args, ids)
        hf_step = theirs(folder, ids)
        state, m = step_fn(state, batch)  # compiles; the first loss
        first_ours, first_hf = float(m["loss"]), hf_step()
        for _ in range(2):  # warm-up
            state, m = step_fn(state, batch)
            hf_step()
        jax.block_until_ready(m)
        t_ours, t_hf = [], []
        for r in range(args.rounds):
            if args.profile and r == 0:
                jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, m = step_fn(state, batch)
                jax.block_until_ready(m)
                t_ours.append(time.perf_counter() - t0)
            if args.profile and r == 0:
                jax.profiler.stop_trace()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                hf_step()
                t_hf.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    s_ours, s_hf = float(np.median(t_ours)), float(np.median(t_hf))
    out = dict(machine=f"{os.cpu_count()} CPUs", torch_threads=torch.get_num_threads(), layers=args.layers,
               hidden=args.hidden, experts=0 if args.dense else args.experts, topk=args.topk, vocab=args.vocab,
               batch=args.batch, seq=args.seq, first_loss_ours=first_ours, first_loss_hf=first_hf,
               ours_step_s=s_ours, hf_step_s=s_hf, ours_tok_s=tokens / s_ours, hf_tok_s=tokens / s_hf,
               ratio=s_hf / s_ours)
    print(f"machine: {out['machine']} (torch threads {out['torch_threads']}); {args.layers} layers, hidden "
          f"{args.hidden}, {'dense' if args.dense else f'{args.experts} experts top-{args.topk}'}, vocab "
          f"{args.vocab}, {args.batch} x {args.seq} tokens, float32")
    print(f"first loss: ours {first_ours:.5f} (with balance loss) transformers {first_hf:.5f}")
    print(f"step: ours {s_ours * 1e3:.1f} ms ({out['ours_tok_s']:.0f} tok/s), transformers {s_hf * 1e3:.1f} ms "
          f"({out['hf_tok_s']:.0f} tok/s): ours {out['ratio']:.2f}x transformers' speed "
          f"(medians of {len(t_ours)} steps each, alternating rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
