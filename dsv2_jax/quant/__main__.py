"""``python -m dsv2_jax.quant --model IN --out OUT --group-size 64``: RTN AWQ quantization.

See :mod:`dsv2_jax.quant.quantizer` (round-to-nearest; no activation-aware scale search yet).
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
    args = p.parse_args(argv)
    from dsv2_jax.quant.quantizer import quantize_checkpoint

    try:
        out = quantize_checkpoint(args.model, args.out, args.group_size)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
