"""Time and peak memory of AWQ-quantizing full-size DeepSeek-V2-Lite layers on this CPU.

    python bench/awq_v2lite_layers.py [--samples 1 2] [--seq-len 512] [--group-size 64]

Runs :func:`dsv2_jax.quant.calibrate.awq_layer` (capture, every scale group's search, fold,
clip search, the quantized layer's output) on layer 0 (dense MLP) and layer 1 (MoE: 64 routed
experts + 2 shared) with random weights (std 0.02) and random calibration input, each in a
fresh process for its own peak RSS, at a few calibration sizes. Time and memory are fitted
as ``a + b · samples`` and extrapolated to AutoAWQ's default (128 samples × 512 tokens) and to
the whole model (layer 0 + 26 MoE layers). Reading the weights from safetensors and writing
the output are not included (seconds per layer).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def layer_tensors(cfg, layer: int, rng) -> dict:
    """Random float32 hub tensors ([out, in]) of one V2-Lite decoder layer."""
    import numpy as np

    h, nh, p = cfg.hidden_size, cfg.num_attention_heads, f"model.layers.{layer}."
    t = {}

    def lin(name, n_in, n_out):
        t[p + name + ".weight"] = rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02

    for name in ("input_layernorm", "post_attention_layernorm"):
        t[p + name + ".weight"] = np.ones(h, np.float32)
    t[p + "self_attn.kv_a_layernorm.weight"] = np.ones(cfg.kv_lora_rank, np.float32)
    lin("self_attn.q_proj", h, nh * cfg.qk_head_dim)
    lin("self_attn.kv_a_proj_with_mqa", h, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    lin("self_attn.kv_b_proj", cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    lin("self_attn.o_proj", nh * cfg.v_head_dim, h)
    if not cfg.is_moe_layer(layer):
        mlps = {"mlp": cfg.intermediate_size}
    else:
        t[p + "mlp.gate.weight"] = rng.standard_normal((cfg.n_routed_experts, h), dtype=np.float32) * 0.05
        mlps = {f"mlp.experts.{e}": cfg.moe_intermediate_size for e in range(cfg.n_routed_experts)}
        mlps["mlp.shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    for m, i in mlps.items():
        lin(f"{m}.gate_proj", h, i)
        lin(f"{m}.up_proj", h, i)
        lin(f"{m}.down_proj", i, h)
    return t


def one(layer: int, samples: int, seq_len: int, group_size: int) -> dict:
    import numpy as np

    from dsv2_jax.config import DeepseekV2Config
    from dsv2_jax.quant.calibrate import awq_layer

    cfg = DeepseekV2Config.v2_lite()
    rng = np.random.default_rng(0)
    tensors = layer_tensors(cfg, layer, rng)
    x = rng.standard_normal((samples, seq_len, cfg.hidden_size), dtype=np.float32)
    t0 = time.perf_counter()
    awq_layer(cfg, layer, tensors, x, group_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"layer": layer, "samples": samples, "seconds": seconds, "peak_rss_gib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    p.add_argument("--one", nargs=2, type=int, metavar=("LAYER", "SAMPLES"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.seq_len, args.group_size)))
        return 0
    rows = []
    for layer in args.layers:
        for n in args.samples:
            out = subprocess.run([sys.executable, __file__, "--one", str(layer), str(n),
                                  "--seq-len", str(args.seq_len), "--group-size", str(args.group_size)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"layer {layer} ({'dense' if layer == 0 else 'MoE'}), {n} × {args.seq_len} tokens: "
                  f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    fits = {}
    for layer in args.layers:
        pts = [r for r in rows if r["layer"] == layer]
        lo, hi = min(pts, key=lambda r: r["samples"]), max(pts, key=lambda r: r["samples"])
        span = hi["samples"] - lo["samples"]
        fit = {}
        for key in ("seconds", "peak_rss_gib"):
            b = (hi[key] - lo[key]) / span if span else 0.0
            fit[key] = (lo[key] - b * lo["samples"], b)
        fits[layer] = fit
    est = {key: {layer: fits[layer][key][0] + 128 * fits[layer][key][1] for layer in args.layers}
           for key in ("seconds", "peak_rss_gib")}
    for layer in args.layers:
        print(f"\nextrapolated to 128 × {args.seq_len} calibration tokens, layer {layer}: "
              f"{est['seconds'][layer] / 60:.1f} min, peak RSS {est['peak_rss_gib'][layer]:.1f} GiB")
    total_h = None
    if set(args.layers) == {0, 1}:
        total_h = (est["seconds"][0] + 26 * est["seconds"][1]) / 3600
        print(f"whole model (layer 0 + 26 MoE layers): {total_h:.1f} h on this machine")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "estimate_128": est,
                                               "whole_model_hours": total_h}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
