"""Training throughput of a config on this machine's devices: tokens/s and model FLOPs utilisation.

    python bench/train_step.py --config configs/tiny-cpu.yaml
    python bench/train_step.py --config configs/deepseek-v2-lite-pretrain.yaml \\
        batch.global_batch=8 data.seq_len=4096 model.overrides.num_hidden_layers=4 --steps 5

Runs the config's real train step (same model, optimizer, accumulation, remat and precision
as ``python -m train.run``) on random token ids, so no data files are read, with freshly
initialised weights of the config's architecture (for ``init_from`` its config.json). The
first ``--warmup`` steps are not timed (compilation is timed on its own). The schedule is replaced
by a fixed long one (the learning rate does not change a step's cost).

MFU = 6 · N_active · tokens/s / peak FLOP/s, N_active = the weights one token multiplies
(routed experts scaled by K/E, embedding table excluded; attention's score FLOPs excluded, see
dsv2_jax/training/flops.py). The peak is the device's dense bf16 figure, from ``--peak-tflops`` or
a table of known device kinds; without one (CPUs) MFU is not printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Dense bf16 peak TFLOP/s by jax device_kind (substring match, first hit wins).
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
]


def peak_tflops(device_kind: str) -> float | None:
    for name, tf in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tf
    return None


def _model_config_for_bench(cfg):
    """The architecture without loading weights (init_from: only its config.json)."""
    from dsv2_jax.config import DeepseekV2Config
    from train import build

    if cfg.model.init_from is None:
        return build.model_config(cfg)[0]
    src = Path(cfg.model.init_from)
    if build.is_run_dir(src):
        path = src / build.RUN_MODEL_CONFIG
    elif src.is_dir():
        path = src / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(cfg.model.init_from, "config.json")
    base = DeepseekV2Config.from_dict(json.loads(Path(path).read_text()), source=str(path))
    return base.replace(**cfg.model.overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s (default: by device kind)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from dsv2_jax import DeepseekV2
    from dsv2_jax.sharding import make_mesh, put_batch
    from dsv2_jax.training.config import ConfigError, check_data_axis, load_config
    from dsv2_jax.training.flops import param_counts
    from train.run import make_training

    try:
        # The LR schedule does not change the step's cost; a long fixed one lets any batch size run.
        fixed = ["schedule.total_tokens=null", "schedule.total_steps=1000000",
                 "schedule.warmup_steps=10"]
        cfg = load_config(args.config, fixed + args.overrides)
        model_cfg = _model_config_for_bench(cfg)
        mesh = make_mesh(cfg.mesh.data)
        check_data_axis(cfg, mesh.size)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.precision.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", cfg.precision.matmul_precision)

    prec = cfg.precision
    model = DeepseekV2(model_cfg, rngs=nnx.Rngs(cfg.seed), param_dtype=prec.param_dtype,
                       dtype=prec.compute_dtype, mesh=mesh)
    t = make_training(cfg, model, mesh)
    del model
    g, seq = cfg.batch.global_batch, cfg.data.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model_cfg.vocab_size, (g, seq + 1), dtype=np.int32)
    host = {
        "inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((g, seq), bool),
        "segments": np.zeros((g, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (g, seq)).copy(),
    }
    batch = put_batch(t.micro_batched(host), mesh)
    state = t.state
    t0 = time.perf_counter()
    step = t.step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = g * seq
    tok_s = tokens / step_s
    counts = param_counts(model_cfg)
    model_tflops = 6 * counts["active"] * tok_s / 1e12
    kind = jax.devices()[0].device_kind
    n_dev = jax.device_count()
    peak = args.peak_tflops if args.peak_tflops else peak_tflops(kind)
    mfu = model_tflops / (peak * n_dev) if peak else None
    out = {
        "config": args.config, "overrides": args.overrides, "device": kind, "devices": n_dev,
        "params_total": counts["total"], "params_active": counts["active"],
        "global_batch": g, "seq_len": seq, "accum_steps": t.accum, "remat": cfg.remat.policy,
        "compute_dtype": prec.compute_dtype, "compile_s": round(compile_s, 2),
        "step_s": step_s, "tokens_per_s": tok_s, "model_tflops_per_s": model_tflops,
        "peak_tflops_per_device": peak, "mfu": mfu, "loss": float(m["loss"]),
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.config} {' '.join(args.overrides)}")
    print(f"device: {n_dev} x {kind}; model {counts['total'] / 1e6:.2f}M params, "
          f"{counts['active'] / 1e6:.2f}M active; batch {g} x {seq} tokens "
          f"({t.accum} accumulation steps), remat {cfg.remat.policy}, {prec.compute_dtype} compute")
    print(f"compile {compile_s:.1f}s; step {step_s * 1e3:.1f} ms (median of {args.steps})")
    print(f"tokens/s: {tok_s:,.0f}")
    print(f"model TFLOP/s (6·N_active·tokens/s): {model_tflops:.4f}")
    if mfu is not None:
        print(f"MFU: {100 * mfu:.2f}% of {peak:g} TFLOP/s x {n_dev}")
    else:
        print("MFU: n/a (unknown peak for this device; pass --peak-tflops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
