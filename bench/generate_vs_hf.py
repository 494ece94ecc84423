"""Generation throughput: dsv2-jax against transformers' DeepseekV2ForCausalLM, same random model.

    python bench/generate_vs_hf.py                 # batch 1 and 8, 128-token prompts, 128 new tokens
    python bench/generate_vs_hf.py --batches 1 --new 32 --dtype bfloat16

Both systems run the same random checkpoint (hidden 512, 4 layers, 16 routed experts top-4,
vocab 32000 by default) on this machine's CPU, greedy, ignoring EOS. Each is run once to
warm up (compilation, allocator) and then timed. Prints prefill and decode tokens/s of both,
the ratios, and the KV-cache bytes per token each keeps (measured from the caches).
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


def config(args) -> dict:
    return dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=args.vocab,
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=4 * args.hidden, moe_intermediate_size=args.hidden // 2,
        kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        aux_loss_alpha=0.001, seq_aux=True, rope_theta=10000.0, max_position_embeddings=4096,
        rope_scaling=None, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32")


def run_ours(folder, prompts, new, dtype):
    import dsv2_jax

    model = dsv2_jax.load(folder, dtype=dtype, load_tokenizer=False)
    kw = dict(prompt_ids=prompts, max_new_tokens=new, ignore_eos=True)
    dsv2_jax.generate(model, **kw)  # warm-up: compiles prefill and the decode loop
    out = dsv2_jax.generate(model, **kw)
    from dsv2_jax.cache import cache_bytes_per_token

    return out.prefill_tokens_per_s, out.decode_tokens_per_s, out.token_ids, \
        cache_bytes_per_token(model.config, model.dtype)


def run_hf(folder, prompts, new, dtype):
    import torch
    from transformers import DeepseekV2ForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        pre = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, return_dict_in_generate=True, **kw)
        total_s = time.perf_counter() - t0
    cache = pre.cache if hasattr(pre, "cache") else pre.past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                      for t in (layer.keys, layer.values) if t is not None)
    b, t = ids.shape
    decode_s = max(total_s - prefill_s, 1e-9)  # generate() = one prefill + (new - 1) steps
    new_ids = out.sequences[:, t:].tolist()
    return b * t / prefill_s, b * new / decode_s, new_ids, cache_bytes / (b * t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    import numpy as np

    from dsv2_jax.testing import write_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = write_checkpoint(Path(d) / "m", config(args), seed=0)
        print(f"machine: {os.cpu_count()} CPUs; model: hidden {args.hidden}, {args.layers} layers, "
              f"{args.experts} experts top-{args.topk}, vocab {args.vocab}; {args.dtype}; "
              f"prompt {args.prompt}, new {args.new}")
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = np.random.default_rng(b).integers(2, args.vocab, (b, args.prompt)).tolist()
            o_pre, o_dec, o_ids, o_kv = run_ours(folder, prompts, args.new, args.dtype)
            h_pre, h_dec, h_ids, h_kv = run_hf(folder, prompts, args.new, args.dtype)
            same = np.mean([a == c for x, y in zip(o_ids, h_ids) for a, c in zip(x, y)])
            row = dict(batch=b, ours_prefill=o_pre, hf_prefill=h_pre, ours_decode=o_dec, hf_decode=h_dec,
                       prefill_ratio=o_pre / h_pre, decode_ratio=o_dec / h_dec, ours_kv_bytes=o_kv,
                       hf_kv_bytes=h_kv, same_tokens=float(same))
            rows.append(row)
            print(f"batch {b}: prefill tok/s ours {o_pre:9.1f}  hf {h_pre:9.1f}  ratio {o_pre / h_pre:5.2f}x | "
                  f"decode tok/s ours {o_dec:8.1f}  hf {h_dec:8.1f}  ratio {o_dec / h_dec:5.2f}x | "
                  f"KV bytes/token ours {o_kv:.0f} hf {h_kv:.0f} | same greedy tokens {same:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
