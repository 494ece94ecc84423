"""AWQ against round-to-nearest where it matters: held-out loss at 4 and 3 bits, groups 64 and 128.

    python bench/awq_quality.py                              # the demo, with activation outliers
    python bench/awq_quality.py --dense runs/demo-dense --no-outliers

The model is a dense DeepSeek-V2 checkpoint: ``--dense FOLDER`` (e.g. the demo's training run
exported with ``python -m train.export runs/demo-shakespeare --out runs/demo-dense``), or by
default the bundled demo de-quantized with one quantization step of noise
(``dsv2_jax.testing.dense_demo_checkpoint``). Unless ``--no-outliers``, a few hidden channels
of the normalised residual stream are scaled up ×32 and the weights that read them down: the
float model is unchanged, its linears see activation outliers.

Each quantization is written in dense form (``dense_output``: the dequantized weights, so 3-bit
runs too) and scored in float32 on the demo's held-out text (the corpus's last 5%); AWQ
calibrates on the training part. Group 128 does not divide ``kv_b_proj``'s 64 inputs: at 128
that linear stays dense in both methods (``skip``). Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "data" / "shakespeare.txt.gz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense", help="a dense checkpoint folder (default: the dithered demo)")
    p.add_argument("--no-outliers", action="store_true")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--windows", type=int, default=0, help="held-out windows of 256 (0: all)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--no-clip", action="store_true", help="AWQ without the clip search")
    p.add_argument("--duo-scaling", choices=["true", "false", "both"], default="true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import dsv2_jax
    from dsv2_jax.quant.quantizer import quantize_checkpoint
    from dsv2_jax.testing import add_activation_outliers, dense_demo_checkpoint
    from dsv2_jax.tokenizer import load_tokenizer
    from train.evaluate import evaluate, heldout_windows

    tmp = Path(tempfile.mkdtemp(prefix="awq-quality-"))
    if args.dense:
        import shutil

        model = Path(shutil.copytree(args.dense, tmp / "dense"))
    else:
        model = dense_demo_checkpoint(tmp / "dense")
    if not args.no_outliers:
        add_activation_outliers(model)
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        windows = heldout_windows(load_tokenizer(model), f.read(), 0.05, 256, args.windows or None)

    def loss(folder, dtype="float32"):
        return evaluate(dsv2_jax.load(folder, dtype=dtype), windows, batch=8)["loss"]

    results = {"model": args.dense or "dithered demo", "outliers": not args.no_outliers,
               "heldout_tokens": int(windows.shape[0] * 256),
               "float32": loss(model), "bf16": loss(model, "bfloat16"), "runs": []}
    print(f"held-out {results['heldout_tokens']} tokens: float32 {results['float32']:.4f}, "
          f"bf16 {results['bf16']:.4f}")
    calib = {"calib": [CORPUS], "calib_samples": args.calib_samples, "clip": not args.no_clip,
             "duo_scaling": {"true": True, "false": False}.get(args.duo_scaling, "both"),
             "calib_seq_len": args.calib_seq_len, "calib_heldout_fraction": 0.05}
    for bits in args.bits:
        for g in args.group_sizes:
            skip = ("kv_b_proj",) if 64 % g else ()
            row = {"bits": bits, "group_size": g, "skip": list(skip)}
            for method in ("rtn", "awq"):
                t0 = time.perf_counter()
                out = quantize_checkpoint(model, tmp / f"{method}-{bits}-{g}", g, method=method,
                                          bits=bits, skip=skip, dense_output=True, progress=False,
                                          **(calib if method == "awq" else {}))
                row[f"{method}_seconds"] = round(time.perf_counter() - t0, 1)
                row[method] = loss(out)
            base = results["float32"]
            gap_rtn, gap_awq = row["rtn"] - base, row["awq"] - base
            row["recovered"] = round(1 - gap_awq / gap_rtn, 3) if gap_rtn > 0 else None
            results["runs"].append(row)
            print(f"{bits}-bit g{g}{' (kv_b_proj dense)' if skip else ''}: RTN {row['rtn']:.4f} "
                  f"(+{gap_rtn:.4f}), AWQ {row['awq']:.4f} (+{gap_awq:.4f}), AWQ recovers "
                  f"{row['recovered'] if row['recovered'] is not None else '-'} of the gap "
                  f"(AWQ search {row['awq_seconds']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
