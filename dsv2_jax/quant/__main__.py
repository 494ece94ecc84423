"""``python -m dsv2_jax.quant --model IN --out OUT --calib FILE…``: 4-bit AWQ quantization.

AWQ (activation-aware scale search and clip search, calibrated layer by layer on your text)
by default, or ``--method rtn`` (round-to-nearest, no calibration). The output is AutoAWQ's
GEMM format. See :mod:`dsv2_jax.quant.quantizer` and docs/awq.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv2_jax.quant", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="dense checkpoint folder or hub repo id")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--method", choices=["awq", "rtn"], default="awq")
    p.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text: .txt or .jsonl ('text' or chat 'messages'), .gz too "
                        "(default: the bundled corpus for the bundled demo model; required otherwise)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--calib-heldout-fraction", type=float, default=0.0,
                   help="leave out this last fraction of the calibration tokens (text you evaluate on)")
    p.add_argument("--no-clip", action="store_true", help="AWQ scale search only, no clip search")
    p.add_argument("--duo-scaling", choices=["true", "false", "both"], default="true",
                   help="candidate scales: AutoAWQ's x^a / w^(1-a), activations alone x^a, or both")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME",
                   help="leave linears whose name holds NAME dense (modules_to_not_convert)")
    args = p.parse_args(argv)
    from dsv2_jax.errors import Dsv2Error
    from dsv2_jax.quant.quantizer import quantize_checkpoint

    try:
        out = quantize_checkpoint(args.model, args.out, args.group_size, method=args.method,
                                  calib=args.calib, calib_samples=args.calib_samples,
                                  calib_seq_len=args.calib_seq_len,
                                  calib_heldout_fraction=args.calib_heldout_fraction,
                                  duo_scaling={"true": True, "false": False}.get(args.duo_scaling, "both"),
                                  clip=not args.no_clip,
                                  skip=tuple(args.skip))
    except (OSError, ValueError, Dsv2Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
