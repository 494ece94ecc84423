"""A run killed with SIGKILL between checkpoints and resumed gives exactly the losses of an
uninterrupted run at every later step (float32 on CPU, data order included)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv2_jax.training.metrics import read_metrics
from dsv2_jax.training.testing import write_tiny_run

ROOT = Path(__file__).resolve().parent.parent
EXACT = ("loss", "ce", "balance_loss", "grad_norm", "lr", "target_tokens",
         "expert_load_max", "expert_load_min")


def committed(ckpt_dir: Path, step: int) -> bool:
    # Orbax writes into a temporary folder and renames it to <step> when the save is complete.
    return (ckpt_dir / str(step) / "_CHECKPOINT_METADATA").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, lora):
    """``lora``: adapters with dropout on a frozen base checkpoint (the resumed run reloads the
    base from model.init_from and the adapters, their AdamW state and the RNG from its
    checkpoint)."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    sections = dict(schedule={"total_steps": 12, "warmup_steps": 2},
                    checkpoint={"every": 4, "keep": 3}, logging={"every": 1, "progress": False})
    if lora:
        from dsv2_jax.training.testing import TINY_MODEL
        from tiny import LITE, write_checkpoint

        base = write_checkpoint(tmp_path / "base", dict(LITE, **TINY_MODEL), seed=1)
        sections.update(model={"preset": None, "init_from": str(base), "overrides": {}},
                        # dropout: the masks come from the step's RNG, which the checkpoint keeps
                        lora={"rank": 4, "alpha": 8, "dropout": 0.1,
                              "target_modules": ["q_proj", "kv_b_proj"]},
                        schedule={"total_steps": 12, "warmup_steps": 2, "peak_lr": 1e-2})
    reference = write_tiny_run(tmp_path, name="reference", **sections)
    crashed = write_tiny_run(tmp_path, name="crashed", **sections)

    def train(config, *extra):
        return [sys.executable, "-m", "train.run", "--config", str(config), *extra]

    t0 = time.time()
    r = subprocess.run(train(reference), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    want = {x["step"]: x for x in read_metrics(tmp_path / "reference")}
    assert sorted(want) == list(range(1, 13))

    # The same run, slowed down after each step so that the kill lands between checkpoints 4 and 8.
    ckpt = tmp_path / "crashed" / "checkpoints"
    p = subprocess.Popen(train(crashed, "debug.step_sleep_s=0.5"), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            steps = [x["step"] for x in read_metrics(tmp_path / "crashed")]
            if committed(ckpt, 4) and steps and max(steps) >= 5:
                break
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    before = {x["step"]: x for x in read_metrics(tmp_path / "crashed")}
    killed_at = max(before)
    assert 5 <= killed_at < 8 and not (ckpt / "8").exists(), sorted(before)

    r = subprocess.run(train(crashed), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)  # resumes by itself: the run directory has checkpoints
    assert r.returncode == 0, r.stderr
    assert "(step 4 of 12)" in r.stderr, r.stderr
    after = {x["step"]: x for x in read_metrics(tmp_path / "crashed")}
    assert sorted(after) == list(range(1, 13))
    for step in range(1, 13):
        for key in EXACT:
            assert after[step][key] == want[step][key], (step, key)
    for step in range(5, killed_at + 1):  # what the killed process logged before dying, too
        for key in EXACT:
            assert before[step][key] == want[step][key], (step, key)
    print(f"\nkilled after step {killed_at}, resumed from step 4: steps 5..12 equal the "
          f"uninterrupted run bit for bit (loss at 12: {after[12]['loss']!r}); "
          f"{time.time() - t0:.1f}s")
