"""Export a run's weights as a Hugging Face checkpoint: ``python -m train.export RUN_DIR --out FOLDER``.

    python -m train.export runs/tiny-cpu --out exports/tiny              # float32, latest step
    python -m train.export runs/tiny-cpu --out exports/tiny --dtype bfloat16 --step 200
    python -m train.export runs/tiny-cpu --out exports/tiny-awq --awq --group-size 64

The folder holds config.json, safetensors with hub tensor names and the run's tokenizer files;
``dsv2_jax.load`` and transformers' ``DeepseekV2ForCausalLM`` read it. ``--awq`` exports the dense
weights to a temporary folder and quantizes them (round-to-nearest, AutoAWQ GEMM layout) with
``dsv2_jax.quant.quantizer.quantize_checkpoint``; the AWQ loader reads the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def load_run_model(run_dir: str | Path, step: int | None = None, dtype: str | None = None):
    """The model of a run's checkpoint (latest unless ``step``), parameters cast to ``dtype``
    (default: as trained; the router stays float32). Returns (model, step, tokenizer)."""
    import jax
    import yaml
    from flax import nnx

    from dsv2_jax import DeepseekV2, DeepseekV2Config
    from dsv2_jax.tokenizer import load_tokenizer
    from dsv2_jax.training.build import RUN_MODEL_CONFIG, TOKENIZER_DIR, is_run_dir
    from dsv2_jax.training.run_checkpoint import restore_params

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a run directory (expected {RUN_MODEL_CONFIG} "
                                f"and checkpoints/)")
    cfg = DeepseekV2Config.from_dict(json.loads((run_dir / RUN_MODEL_CONFIG).read_text()),
                                     source=str(run_dir / RUN_MODEL_CONFIG))
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    prec = run_cfg.get("precision", {})
    param_dtype = prec.get("param_dtype", "float32")
    abstract = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params, step = restore_params(run_dir / "checkpoints", params, step)
    if dtype is not None:
        from dsv2_jax.layers import as_dtype

        target = as_dtype(dtype)

        def cast(path, x):
            names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            return x if "gate" in names else x.astype(target)  # mlp.gate: the router

        params = jax.tree_util.tree_map_with_path(cast, params)
    model = nnx.merge(graphdef, params, rest)
    tok_dir = run_dir / TOKENIZER_DIR
    tok = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() else None
    return model, step, tok


def export(run_dir, out, *, step: int | None = None, dtype: str | None = None, awq: bool = False,
           group_size: int = 64) -> Path:
    import dsv2_jax

    model, step, tok = load_run_model(run_dir, step, dtype)
    out = Path(out)
    if not awq:
        dsv2_jax.save(model, out, tokenizer=tok)
        return out
    try:
        from dsv2_jax.quant.quantizer import quantize_checkpoint
    except ImportError as e:
        raise RuntimeError(f"--awq needs dsv2_jax.quant.quantizer.quantize_checkpoint ({e})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dense.", dir=out.parent))
    try:
        dense = dsv2_jax.save(model, tmp / "dense", tokenizer=tok)
        quantize_checkpoint(dense, out, group_size=group_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype (default: the run's param_dtype)")
    p.add_argument("--awq", action="store_true", help="write a 4-bit AWQ (GEMM) checkpoint")
    p.add_argument("--group-size", type=int, default=64, help="AWQ group size (default 64)")
    args = p.parse_args(argv)
    from dsv2_jax.config import ConfigError
    from dsv2_jax.hub_format import CheckpointError

    try:
        out = export(args.run_dir, args.out, step=args.step, dtype=args.dtype, awq=args.awq,
                     group_size=args.group_size)
    except (FileNotFoundError, CheckpointError, ConfigError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
