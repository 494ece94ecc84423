"""python -m train.run end to end: a tiny model learns; a NaN stops the run, checkpoints intact."""

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsv2_jax.training.metrics import read_metrics
from dsv2_jax.training.testing import write_tiny_run

ROOT = Path(__file__).resolve().parent.parent


def run(config, *overrides, timeout=300):
    return subprocess.run([sys.executable, "-m", "train.run", "--config", str(config), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_tiny_model_learns_within_a_minute(tmp_path):
    path = write_tiny_run(tmp_path, data={"heldout_fraction": 0.05},
                          schedule={"total_steps": 60}, checkpoint={"every": 1000},
                          eval={"every": 60, "batches": 4}, logging={"every": 10})
    t0 = time.time()
    r = run(path)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr
    records = read_metrics(tmp_path / "tiny")
    train = [x for x in records if "loss" in x]
    first, last = train[0], train[-1]
    (ev,) = [x for x in records if "eval_loss" in x]
    print(f"\ntiny model: loss {first['loss']:.3f} at step 1 -> {last['loss']:.3f} at step 60, "
          f"held-out {ev['eval_loss']:.3f}; {elapsed:.1f}s wall including start-up and compile")
    assert first["step"] == 1 and last["step"] == 60
    assert math.log(258) - 0.2 < first["loss"] < math.log(258) + 0.2  # uniform over 258 bytes
    assert last["loss"] < 0.5 * first["loss"] and ev["eval_loss"] < 0.5 * first["loss"]
    assert elapsed < 60
    # metrics: every field, sane values
    assert {"loss", "ce", "balance_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
            "expert_load_max", "expert_load_min"} <= set(last)
    assert last["lr"] == pytest.approx(1e-2 * 0.316 ** 2, rel=1e-6)  # after both decays
    assert train[1]["lr"] == pytest.approx(1e-2, rel=1e-6)  # step 10: past the warm-up
    assert last["balance_loss"] >= 0.001 * 0.99  # alpha for a balanced router, more otherwise
    assert 2 / 4 <= last["expert_load_max"]["1"] <= 1 and 0 <= last["expert_load_min"]["1"] <= 2 / 4
    assert list((tmp_path / "tiny" / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir() if p.name.isdigit()] == ["60"]
    from train.plot import plot_run

    pngs = plot_run(tmp_path / "tiny")
    assert {p.name for p in pngs} == {"loss.png", "lr.png", "grad_norm.png", "expert_load.png"}
    assert all(p.stat().st_size > 5000 for p in pngs)
    # lr.png draws every step's LR (steps, not slopes between the logged points): by hand,
    # warm-up 0 -> 0.005 -> 0.01 over 2 steps, then two drops of x0.316.
    from train.plot import _schedule_of

    steps, lrs = _schedule_of(tmp_path / "tiny", 60)
    assert list(steps) == list(range(1, 61))
    assert lrs[:3] == pytest.approx([0.0, 0.005, 0.01], rel=1e-6)
    drops = [i for i in range(1, 60) if lrs[i] != lrs[i - 1] and i > 2]
    assert len(drops) == 2 and all(lrs[i] == pytest.approx(0.316 * lrs[i - 1], rel=1e-6) for i in drops)
    logged = {x["step"]: x["lr"] for x in train}
    assert all(lrs[s - 1] == pytest.approx(v, rel=1e-6) for s, v in logged.items())


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    path = write_tiny_run(tmp_path, schedule={"total_steps": 6},
                          checkpoint={"every": 2, "keep": 5}, debug={"nan_at_step": 6})
    r = run(path)
    assert r.returncode == 3, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    print("\n" + last)
    assert last.startswith("error: step 6: loss is nan (grad norm nan)")
    assert f"the last good checkpoint is step 4 in {tmp_path / 'tiny' / 'checkpoints'}" in last
    ckpts = sorted(int(p.name) for p in (tmp_path / "tiny" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert ckpts == [2, 4]
    steps = [x["step"] for x in read_metrics(tmp_path / "tiny")]
    assert steps == [1, 2, 3, 4, 5]
    # the checkpoint before the NaN restores, finite
    import jax
    from flax import nnx

    from train.export import load_run_model

    model, step, _ = load_run_model(tmp_path / "tiny")
    assert step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
