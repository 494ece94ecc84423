"""python -m infer.generate --expert 2 on two fake CPU devices: the routed experts split over
the devices, the same tokens as the single-device run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny import stderr_lines, write_tokenized_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tokenized_checkpoint(tmp_path_factory.mktemp("cli_parallel"), seed=1, dtype=np.float32)


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
    assert len(stderr_lines(err)) == 1


def test_two_processes_print_json_on_stdout_and_logs_on_stderr(model_dir):
    """Gloo logs its peer connections to fd 1; with --json, process 0's stdout must still be
    exactly one JSON object (and process 1's empty)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--model", str(model_dir), "--prompt", "Hello world", "--max-new-tokens", "6",
              "--dtype", "float32", "--json", "--ignore-eos", "--expert", "4",
              "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [_start(2, *common, "--process-id", str(i)) for i in range(2)]
    res = [_finish(p) for p in procs]
    for i, (rc, _, err) in enumerate(res):
        assert rc == 0, f"process {i}:\n{err[-4000:]}"
    out = json.loads(res[0][1])  # the whole of stdout is one JSON object
    assert len(out["output_ids"]) == 6 and out["text"]
    assert res[1][1] == ""
    assert "[Gloo]" in res[0][2]  # the logs that used to land in stdout went to stderr
    one = json.loads(_finish(_start(1, *common[:9]))[1])
    assert out["output_ids"] == one["output_ids"]
