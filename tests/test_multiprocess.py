"""Two processes × two CPU devices on localhost (jax.distributed over gloo, docs/platform.md).

The expert axis (size 4) spans both processes: each loads only its own 4 of the 8 routed
experts per layer, runs a forward pass, one AdamW step of cross-entropy + balance loss and a
greedy ``dsv2_jax.generate``; the gathered logits, loss, gradients, updated parameters and
generated tokens must equal a single-process, single-device run of the plain model.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny import LITE, write_checkpoint

HERE = Path(__file__).resolve().parent
CFG = dict(LITE, num_hidden_layers=2, first_k_dense_replace=0)  # two MoE layers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    folder = write_checkpoint(tmp / "model", CFG, seed=3)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    coord = f"127.0.0.1:{_free_port()}"
    worker = [sys.executable, str(HERE / "mp_worker.py"), str(folder)]
    cmds = [worker + [str(tmp / "mp.npz"), coord, "2", str(i)] for i in range(2)]
    cmds.append(worker + [str(tmp / "single.npz"), "single"])
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{' '.join(p.args)} failed:\n{log[-4000:]}"
    metas = [dict(np.load(tmp / f"mp.npz.{i}.meta.npz")) for i in range(2)]
    return dict(np.load(tmp / "mp.npz")), dict(np.load(tmp / "single.npz")), metas


def test_each_process_holds_and_reads_only_its_experts(runs):
    _, single, metas = runs
    assert [int(m["processes"]) for m in metas] == [2, 2]
    assert [int(m["devices"]) for m in metas] == [4, 4]
    assert all(str(m["expert_spec"]) == "P('expert',)" for m in metas)
    assert sorted(metas[0]["experts_read"].tolist() + metas[1]["experts_read"].tolist()) == list(range(8))
    assert set(metas[0]["experts_read"].tolist()).isdisjoint(metas[1]["experts_read"].tolist())
    # 8 experts × 3 projections × 2 layers = 48 expert tensors; each process skips half.
    assert int(single["tensors_read"]) - int(metas[0]["tensors_read"]) == 24


def test_forward_and_train_step_match_single_process(runs):
    mp, single, _ = runs
    assert np.abs(mp["logits"] - single["logits"]).max() <= 1e-5
    assert abs(float(mp["loss"]) - float(single["loss"])) <= 1e-5
    grads = [k for k in single if k.startswith("grad:")]
    params = [k for k in single if k.startswith("param:")]
    assert len(grads) == len(params) == 31 and set(grads + params) <= set(mp)
    for k in grads + params:
        err = np.abs(mp[k] - single[k]).max()
        assert err <= 1e-5, f"{k}: differs by {err}"
    assert float(single["moved"]) > 1e-3  # the step really moved the parameters


def test_generate_across_processes_matches_single_process(runs):
    mp, single, metas = runs
    assert single["generated"].shape == (2, 6)
    for m in metas:  # every process gets the whole result
        assert m["generated"].tolist() == single["generated"].tolist()
