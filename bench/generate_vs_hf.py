"""Generation throughput: dsv2-jax against transformers' DeepseekV2ForCausalLM, same random model.

    python bench/generate_vs_hf.py                 # batch 1 and 8, 128-token prompts, 128 new tokens
    python bench/generate_vs_hf.py --batches 1 --new 32 --dtype bfloat16
    python bench/generate_vs_hf.py --attention v2lite --layers 2 --prompts 256,3000,8000 --new 32

Both systems run the same random checkpoint (hidden 512, 4 layers, 16 routed experts top-4,
vocab 32000 by default; ``--attention v2lite`` gives V2-Lite's attention shapes: 16 heads,
latent 512, rope 64, nope/v 128) on this machine's CPU, greedy, ignoring EOS. Each is run once
to warm up (compilation, allocator) and then timed. transformers' decode rate is
(generate N − generate 1) / (N − 1) steps, so its prefill cancels out; its prefill rate is one
forward over the prompt. Ours come from ``generate``'s own timings (compilation excluded):
its decode time over its N − 1 forwards (N tokens: the first is sampled from the prefill's
logits), so both rates are per decode forward.
Prints prefill and decode tokens/s of both, the ratios, our decode step time relative to that
at the shortest prompt, and the KV-cache bytes per token each keeps (measured from the caches).
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


ATTENTION = {  # heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    "small": (8, 128, 64, 32, 64),
    "v2lite": (16, 512, 128, 64, 128),
}


def config(args) -> dict:
    heads, rank, nope, rope, v = ATTENTION[args.attention]
    return dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=args.vocab,
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=4 * args.hidden, moe_intermediate_size=args.hidden // 2,
        kv_lora_rank=rank, q_lora_rank=None, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        aux_loss_alpha=0.001, seq_aux=True, rope_theta=10000.0, max_position_embeddings=args.context,
        rope_scaling=None, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32")


def run_ours(model, prompts, new):
    import dsv2_jax
    from dsv2_jax.cache import cache_bytes_per_token

    kw = dict(prompt_ids=prompts, max_new_tokens=new, ignore_eos=True)
    dsv2_jax.generate(model, **kw)  # warm-up: compiles prefill and the decode loop
    out = dsv2_jax.generate(model, **kw)
    assert not out.compiled, "the timed generate() compiled again"
    # N new tokens take N - 1 decode forwards (the first comes from the prefill's logits, the
    # last has no forward after it): the time per forward, as transformers' is measured below.
    step_s = out.decode_s / (new - 1)
    return dict(prefill=out.prefill_tokens_per_s, decode=len(prompts) / step_s,
                step_s=step_s, ids=out.token_ids,
                kv_bytes=cache_bytes_per_token(model.config, model.dtype))


def run_hf(model, prompts, new):
    import torch

    ids = torch.tensor(prompts)
    b, t = ids.shape
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)

    def gen(n):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0, out

    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        pre = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        one_s, _ = gen(1)
        total_s, out = gen(new)
    cache = pre.cache if hasattr(pre, "cache") else pre.past_key_values
    cache_bytes = sum(x.numel() * x.element_size() for layer in cache.layers
                      for x in (layer.keys, layer.values) if x is not None)
    step_s = max(total_s - one_s, 1e-9) / (new - 1)  # both generate calls prefill once
    return dict(prefill=b * t / prefill_s, decode=b / step_s, step_s=step_s,
                ids=out.sequences[:, t:].tolist(), kv_bytes=cache_bytes / (b * t))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompts", default="128", help="prompt lengths, comma-separated")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="small", choices=sorted(ATTENTION))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from transformers import DeepseekV2ForCausalLM

    import dsv2_jax
    from dsv2_jax.testing import write_checkpoint

    lengths = [int(x) for x in args.prompts.split(",")]
    if args.new < 2:
        p.error("--new: at least 2 (transformers' decode rate is measured between 1 and N new tokens)")
    args.context = max(4096, 2 * (max(lengths) + args.new))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = write_checkpoint(Path(d) / "m", config(args), seed=0)
        print(f"machine: {os.cpu_count()} CPUs; model: hidden {args.hidden}, {args.layers} layers, "
              f"{args.experts} experts top-{args.topk}, vocab {args.vocab}, {args.attention} attention; "
              f"{args.dtype}; prompts {lengths}, new {args.new}", flush=True)
        ours = dsv2_jax.load(folder, dtype=args.dtype, load_tokenizer=False)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        hf = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
        hf.generation_config.eos_token_id = None
        base_step = {}
        for b in [int(x) for x in args.batches.split(",")]:
            for t in lengths:
                prompts = np.random.default_rng(b * 100003 + t).integers(2, args.vocab, (b, t)).tolist()
                o = run_ours(ours, prompts, args.new)
                base_step.setdefault(b, o["step_s"])
                try:
                    h = run_hf(hf, prompts, args.new)
                except RuntimeError as e:  # torch's allocator: e.g. materialised [B, nh, T, T] scores
                    if "allocate" not in str(e):
                        raise
                    reason = str(e).split("\n")[0][-160:]
                    rows.append(dict(batch=b, prompt=t, ours_prefill=o["prefill"], ours_decode=o["decode"],
                                     ours_step_s=o["step_s"], ours_step_vs_shortest=o["step_s"] / base_step[b],
                                     ours_kv_bytes=o["kv_bytes"], hf_error=reason))
                    print(f"batch {b} prompt {t:5d}: prefill tok/s ours {o['prefill']:8.1f} | decode tok/s ours "
                          f"{o['decode']:7.1f} | our step {o['step_s'] * 1e3:6.1f} ms "
                          f"({o['step_s'] / base_step[b]:4.2f}x prompt {lengths[0]}) | transformers failed: {reason}",
                          flush=True)
                    continue
                same = np.mean([a == c for x, y in zip(o["ids"], h["ids"]) for a, c in zip(x, y)])
                row = dict(batch=b, prompt=t, ours_prefill=o["prefill"], hf_prefill=h["prefill"],
                           ours_decode=o["decode"], hf_decode=h["decode"], prefill_ratio=o["prefill"] / h["prefill"],
                           decode_ratio=o["decode"] / h["decode"], ours_step_s=o["step_s"], hf_step_s=h["step_s"],
                           ours_step_vs_shortest=o["step_s"] / base_step[b], ours_kv_bytes=o["kv_bytes"],
                           hf_kv_bytes=h["kv_bytes"], same_tokens=float(same))
                rows.append(row)
                print(f"batch {b} prompt {t:5d}: prefill tok/s ours {o['prefill']:8.1f} hf {h['prefill']:8.1f} "
                      f"({row['prefill_ratio']:4.2f}x) | decode tok/s ours {o['decode']:7.1f} hf {h['decode']:7.1f} "
                      f"({row['decode_ratio']:5.2f}x) | our step {o['step_s'] * 1e3:6.1f} ms "
                      f"({row['ours_step_vs_shortest']:4.2f}x prompt {lengths[0]}) | KV B/token ours "
                      f"{o['kv_bytes']:.0f} hf {h['kv_bytes']:.0f} | same greedy tokens {same:.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
