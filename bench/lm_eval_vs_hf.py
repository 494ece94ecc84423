"""Requests/s of the dsv2-jax lm-eval backend against the harness's `hf` backend, one run.

    python bench/lm_eval_vs_hf.py [--repeat 3]

Both score the local tasks of tests/data/lm_eval (multiple choice, rolling perplexity, greedy
generation; float32, max_length 32) on the same random tiny DeepSeek-V2 checkpoint with
DeepSeek's tokenizer, on this CPU. Ours is timed twice: the first pass includes compiling.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=2, help="passes of each backend")
    args = p.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    import dsv2_jax.harness  # noqa: F401
    from tiny import write_tokenized_checkpoint

    folder = write_tokenized_checkpoint(Path(tempfile.mkdtemp()) / "model", seed=3)
    tasks_dir = ROOT / "tests" / "data" / "lm_eval"
    os.chdir(tasks_dir)
    tasks = ["dsv2_mc", "dsv2_rolling", "dsv2_gen"]
    common = f"pretrained={folder},dtype=float32,max_length=32"
    for name, model_args in (("hf", common), ("dsv2-jax", common + ",add_bos_token=false")):
        lm = lm_eval.api.registry.get_model(name).create_from_arg_string(
            model_args, {"batch_size": 4, "device": "cpu"})
        for i in range(args.repeat):
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                          task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks_dir)))
            dt = time.perf_counter() - t0
            n = sum(len(s["resps"]) for t in tasks for s in out["samples"][t])
            print(f"{name:9s} pass {i + 1}: {n} requests in {dt:.2f} s = {n / dt:.1f} req/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
