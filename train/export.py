"""Export a run's weights as a Hugging Face checkpoint: ``python -m train.export RUN_DIR --out FOLDER``.

    python -m train.export runs/tiny-cpu --out exports/tiny              # float32, latest step
    python -m train.export runs/tiny-cpu --out exports/tiny --dtype bfloat16 --step 200
    python -m train.export runs/tiny-cpu --out exports/tiny-awq --awq --group-size 64
    python -m train.export runs/demo-qlora --adapter exports/qlora-adapter   # a lora: run
    python -m train.export runs/demo-qlora --merge --out exports/merged      # base + adapter

The folder holds config.json, safetensors with hub tensor names and the run's tokenizer files;
``dsv2_jax.load`` and transformers' ``DeepseekV2ForCausalLM`` read it. ``--awq`` exports the dense
weights to a temporary folder and quantizes them into the AutoAWQ GEMM layout with
``dsv2_jax.quant.quantizer.quantize_checkpoint``: AWQ calibrated on the run's own training text
(its held-out tail left out; ``--calib FILE…`` to choose other text), or ``--method rtn``.
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
    if run_cfg.get("lora"):
        return _load_lora_run(run_dir, run_cfg, step, dtype)
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


def _load_lora_run(run_dir: Path, run_cfg: dict, step: int | None, dtype: str | None):
    """A lora: run's base (model.init_from in ``dtype``, default the run's compute dtype; AWQ
    stays packed) with the adapters of its checkpoint. Returns (model, step, tokenizer);
    ``model.lora_config`` is set."""
    from flax import nnx

    import dsv2_jax
    from dsv2_jax.lora import LoRAParam, add_lora
    from dsv2_jax.tokenizer import load_tokenizer
    from dsv2_jax.training.build import TOKENIZER_DIR
    from dsv2_jax.training.config import from_dict, lora_config
    from dsv2_jax.training.run_checkpoint import restore_params

    cfg = from_dict(run_cfg)
    model = dsv2_jax.load(cfg.model.init_from, dtype=dtype or cfg.precision.compute_dtype,
                          load_tokenizer=False)
    model.lora_config = lora_config(cfg)
    model.base_model = str(cfg.model.init_from)
    add_lora(model, model.lora_config)
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
    adapters, step = restore_params(run_dir / "checkpoints", adapters, step)
    model = nnx.merge(graphdef, adapters, rest)
    tok_dir = run_dir / TOKENIZER_DIR
    tok = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() else None
    return model, step, tok


def run_calibration(run_dir: Path):
    """The run's training files and held-out fraction, from its config.yaml (paths as the run
    resolved them, relative to the directory it ran in)."""
    import yaml

    data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()).get("data", {})
    files = [Path(f) for f in data.get("train", [])]
    missing = [str(f) for f in files if not f.exists()]
    if not files or missing:
        raise FileNotFoundError(f"{run_dir}/config.yaml: the run's training text {missing or files} "
                                "is not here to calibrate AWQ on; pass --calib FILE (or --method rtn)")
    return files, float(data.get("heldout_fraction") or 0.0), int(data.get("seq_len") or 512)


def export(run_dir, out, *, step: int | None = None, dtype: str | None = None, awq: bool = False,
           group_size: int = 64, method: str = "awq", calib=None, adapter: bool = False,
           merge: bool = False) -> Path:
    """Write the run's model to ``out``. A lora: run needs ``adapter`` (a PEFT folder of the
    adapters alone) or ``merge`` (the adapters folded into a dense copy of the base, then
    written like any run: dense, or ``awq``)."""
    import dsv2_jax

    model, step, tok = load_run_model(run_dir, step, dtype)
    out = Path(out)
    lora_cfg = getattr(model, "lora_config", None)
    if (adapter or merge) and lora_cfg is None:
        raise ValueError(f"{run_dir}: --adapter / --merge need a run with a lora: section")
    if adapter:
        from dsv2_jax.lora import save_adapter

        save_adapter(model, out, lora_cfg, base_model=model.base_model)
        return out
    if lora_cfg is not None:
        if not merge:
            raise ValueError(f"{run_dir}: a lora: run exports with --adapter OUT (the PEFT "
                             "adapter) or --merge (base + adapter in one checkpoint)")
        from dsv2_jax.lora import merge as merge_adapters

        try:
            merge_adapters(model)
        except ValueError as e:
            raise ValueError(f"{run_dir}: base {model.base_model}: {e} (or export --adapter)") from None
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
        kwargs = {}
        if method == "awq":
            if calib:
                kwargs = {"calib": calib}
            else:
                files, heldout, seq_len = run_calibration(run_dir)
                kwargs = {"calib": files, "calib_heldout_fraction": heldout,
                          "calib_seq_len": min(seq_len, 512)}
        dense = dsv2_jax.save(model, tmp / "dense", tokenizer=tok)
        quantize_checkpoint(dense, out, group_size=group_size, method=method,
                            source_name=f"{Path(run_dir).name} step {step}", **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (written atomically)")
    p.add_argument("--adapter", metavar="OUT", help="a lora: run's adapters as a PEFT folder")
    p.add_argument("--merge", action="store_true",
                   help="a lora: run: fold the adapters into the base and write the whole model")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype (default: the run's param_dtype)")
    p.add_argument("--awq", action="store_true", help="write a 4-bit AWQ (GEMM) checkpoint")
    p.add_argument("--group-size", type=int, default=64, help="AWQ group size (default 64)")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq",
                   help="with --awq: calibrated AWQ search, or round-to-nearest")
    p.add_argument("--calib", nargs="+", metavar="FILE",
                   help="with --awq: calibration text (default: the run's training text)")
    args = p.parse_args(argv)
    if bool(args.out) == bool(args.adapter):
        p.error("give exactly one of --out FOLDER and --adapter FOLDER")
    from dsv2_jax.errors import Dsv2Error

    try:
        out = export(args.run_dir, args.out or args.adapter, step=args.step, dtype=args.dtype,
                     awq=args.awq, group_size=args.group_size, method=args.method,
                     calib=args.calib, adapter=bool(args.adapter), merge=args.merge)
    except (FileNotFoundError, Dsv2Error, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
