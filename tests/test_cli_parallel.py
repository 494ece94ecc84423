"""python -m infer.generate --expert 2 on two fake CPU devices: the routed experts split over
the devices, the same tokens as the single-device run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv2_jax.tokenizer import deepseek_v2_tokenizer_folder
from tiny import LITE, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 8 routed experts in layer 1 (layer 0 is dense), DeepSeek's real tokenizer
    d = write_checkpoint(tmp_path_factory.mktemp("cli_parallel"),
                         dict(LITE, vocab_size=100096, hidden_size=32, num_attention_heads=2,
                              num_hidden_layers=2, bos_token_id=100000, eos_token_id=100001),
                         dtype=np.float32, seed=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(deepseek_v2_tokenizer_folder() / f, d / f)
    return d


def _start(devices, *args):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "infer.generate", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p):
    try:
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err


def test_expert_parallel_generates_the_single_device_tokens(model_dir):
    common = ["--model", str(model_dir), "--prompt", "Hello world", "--max-new-tokens", "8",
              "--dtype", "float32", "--json", "--ignore-eos"]
    procs = {"one": _start(1, *common), "ep2": _start(2, *common, "--expert", "2")}
    res = {k: _finish(p) for k, p in procs.items()}
    for k, (rc, _, err) in res.items():
        assert rc == 0, f"{k}:\n{err[-4000:]}"
    one, ep2 = (json.loads(res[k][1]) for k in ("one", "ep2"))
    assert len(ep2["output_ids"]) == 8
    assert ep2["prompt_ids"] == one["prompt_ids"]
    assert ep2["output_ids"] == one["output_ids"]
    assert ep2["text"] == one["text"]
    assert "mesh: expert 2 (2 devices, 1 process(es))" in res["ep2"][2]
    assert "mesh:" not in res["one"][2]


@pytest.mark.parametrize("args, pattern", [
    (["--expert", "3"], "do not split"),  # 3 does not divide 2 devices
    (["--expert", "0"], "--expert = 0: expected a positive integer"),
    (["--process-id", "1"], "also needs --coordinator"),
])
def test_bad_mesh_is_one_clear_line(model_dir, args, pattern):
    rc, _, err = _finish(_start(2, "--model", str(model_dir), *args))
    assert rc == 2, err
    assert pattern in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
