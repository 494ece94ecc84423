"""Data parallelism: the batch split over two (fake CPU) devices trains like one device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.metrics import read_metrics
from train.testing import write_tiny_run

ROOT = Path(__file__).resolve().parent.parent


def test_two_devices_match_one(tmp_path):
    path = write_tiny_run(tmp_path, schedule={"total_steps": 4}, checkpoint={"every": 100})
    runs = {}
    for n, micro in ((1, 2), (2, 1)):  # 2 accumulation steps x 2 sequences either way
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        r = subprocess.run([sys.executable, "-m", "train.run", "--config", str(path),
                            f"run_dir={tmp_path / f'dp{n}'}", f"batch.micro_batch={micro}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"2 x {micro} x {n} device(s)" in r.stderr
        runs[n] = read_metrics(tmp_path / f"dp{n}")
    for one, two in zip(runs[1], runs[2]):
        for key in ("loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)
