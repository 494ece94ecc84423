"""Parallel training: the same run on one device and on four fake CPU devices laid out as
data 2 × expert 2 (the batch split over all four, each device holding half of the routed
experts, the MoE dispatch in ``jax.shard_map``) gives the same losses and gradient norms;
mesh errors name their key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train.run
from dsv2_jax.training.config import ConfigError, load_config
from dsv2_jax.training.metrics import read_metrics
from dsv2_jax.training.testing import write_tiny_run

ROOT = Path(__file__).resolve().parent.parent
# 8 sequences per step in 2 accumulation steps on every layout (micro_batch x devices = 4)
LAYOUTS = {
    "one": (1, ["batch.micro_batch=4"]),
    "dp2_ep2": (4, ["batch.micro_batch=1", "mesh.data=2", "mesh.expert=2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    # checkpoint.every=2: the sharded run also saves (Orbax, sharded arrays) mid-run
    path = write_tiny_run(tmp, schedule={"total_steps": 3}, batch={"global_batch": 8},
                          checkpoint={"every": 2, "async_save": False},
                          logging={"every": 1, "tensorboard": False, "progress": False})
    procs = {}
    for name, (n, overrides) in LAYOUTS.items():
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                   JAX_PLATFORMS="cpu")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "train.run", "--config", str(path), f"run_dir={tmp / name}",
             *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    out = {}
    try:
        for name, p in procs.items():
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"{name}:\n{err[-4000:]}"
            out[name] = (read_metrics(tmp / name), err, tmp / name)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out


def test_data_and_expert_parallel_match_one_device(runs):
    name = "dp2_ep2"
    one, got = runs["one"][0], runs[name][0]
    assert [m["step"] for m in got] == [m["step"] for m in one] == [1, 2, 3]
    for a, b in zip(one, got):
        for key in ("loss", "ce", "balance_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (name, a["step"], key)
        assert b["expert_load_max"] == pytest.approx(a["expert_load_max"], rel=1e-5)


def test_sharded_run_reports_its_layout_and_checkpoints(runs):
    _, err, run_dir = runs["dp2_ep2"]
    assert "2 x 1 x 4 device(s)" in err and "mesh: data 2, expert 2;" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert "2 x 4 x 1 device(s)" in runs["one"][1] and "mesh: one device;" in runs["one"][1]


@pytest.mark.parametrize("when, overrides, message", [
    ("train", ["mesh.expert=3", "model.overrides.n_routed_experts=8"],
     r"^mesh\.expert = 3: does not divide the model's n_routed_experts \(8\)"),
    ("train", ["mesh.data=2", "mesh.expert=2"],
     r"^mesh: mesh\.data \(2\) × mesh\.fsdp \(1\) × mesh\.expert \(2\) = 4 devices, but this run has 1"),
    ("load", ["mesh.expert=-1"], r"^mesh: at most one of mesh\.data, mesh\.fsdp, mesh\.expert may be -1"),
    ("load", ["mesh.fsdp=0"], r"^mesh\.fsdp = 0: expected a positive integer or -1"),
])
def test_mesh_errors_name_the_key(tmp_path, monkeypatch, when, overrides, message):
    """Raised by load_config, or by train() before the model is built (one device here)."""
    def must_not_run(*a, **k):
        raise AssertionError("the model was built before the mesh error was found")

    monkeypatch.setattr("dsv2_jax.training.build.build_model", must_not_run)
    path = write_tiny_run(tmp_path)
    with pytest.raises(ConfigError, match=message):
        train.run.train(load_config(path, overrides)) if when == "train" else load_config(path, overrides)
