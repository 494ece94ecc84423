"""Training under faults: SIGTERM then resume, Ctrl-C before training, an unreadable latest
checkpoint, a disk that fills during a save, a typo in model.overrides beside an existing run.
Each ends with one clear line, and nothing already saved is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsv2_jax.training.metrics import read_metrics
from dsv2_jax.training.testing import write_tiny_run
from tiny import stderr_lines

ROOT = Path(__file__).resolve().parent.parent
EXACT = ("loss", "ce", "balance_loss", "grad_norm", "lr", "target_tokens",
         "expert_load_max", "expert_load_min")
SECTIONS = dict(schedule={"total_steps": 12, "warmup_steps": 2},
                checkpoint={"every": 4, "keep": 3}, logging={"every": 1, "progress": False})


def env_for(tmp_path):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train_cmd(config, *extra):
    return [sys.executable, "-m", "train.run", "--config", str(config), *extra]


def run(cmd, env, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def committed(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def start_and_signal(cmd, env, run_dir: Path, after_step: int, sig) -> subprocess.Popen:
    """Start a run slowed down after each step, send ``sig`` once ``after_step`` is logged."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        steps = [x["step"] for x in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        if steps and max(steps) >= after_step:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    os.kill(p.pid, sig)
    return p


def test_sigterm_saves_then_resume_equals_an_uninterrupted_run(tmp_path):
    env = env_for(tmp_path)
    reference = write_tiny_run(tmp_path, name="reference", **SECTIONS)
    stopped = write_tiny_run(tmp_path, name="stopped", **SECTIONS)
    r = run(train_cmd(reference), env)
    assert r.returncode == 0, r.stderr
    want = {x["step"]: x for x in read_metrics(tmp_path / "reference")}

    p = start_and_signal(train_cmd(stopped, "debug.step_sleep_s=0.4"), env, tmp_path / "stopped",
                         5, signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    stop_line = err.strip().splitlines()[-1]
    assert stop_line.startswith("SIGTERM: stopped after step ") and "run the same command to resume" in stop_line
    assert "Traceback" not in err and out == ""
    stopped_at = int(stop_line.split("after step ")[1].split()[0])
    assert 5 <= stopped_at < 12
    assert stopped_at in committed(tmp_path / "stopped" / "checkpoints")  # the save in flight finished

    r = run(train_cmd(stopped), env)
    assert r.returncode == 0, r.stderr
    assert f"(step {stopped_at} of 12)" in r.stderr
    after = {x["step"]: x for x in read_metrics(tmp_path / "stopped")}
    assert sorted(after) == list(range(1, 13))
    for step in range(1, 13):
        for key in EXACT:
            assert after[step][key] == want[step][key], (step, key)


def test_ctrl_c_before_the_first_step_is_one_line(tmp_path):
    cfg = write_tiny_run(tmp_path, name="early", **SECTIONS)
    p = subprocess.Popen(train_cmd(cfg), cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "early" / "config.yaml").exists():
        time.sleep(0.05)  # the config is checked and written; the model not yet trained
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("SIGINT: stopped at once")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_an_unreadable_latest_checkpoint_resumes_from_the_one_before(tmp_path):
    env = env_for(tmp_path)
    cfg = write_tiny_run(tmp_path, name="hurt", **SECTIONS)
    r = run(train_cmd(cfg, "schedule.total_steps=12", "checkpoint.every=4"), env)
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "hurt" / "checkpoints"
    assert committed(ckpt) == [4, 8, 12]
    # Truncate every array file of the latest checkpoint's parameters.
    hurt = [f for f in (ckpt / "12" / "params").rglob("*") if f.is_file() and f.stat().st_size > 64]
    assert hurt
    for f in hurt:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    r = run(train_cmd(cfg, "schedule.total_steps=14"), env)
    assert r.returncode == 0, r.stderr
    assert "checkpoint 12 is unreadable" in r.stderr and "12.unreadable" in r.stderr
    assert "(step 8 of 14)" in r.stderr
    assert committed(ckpt)[-1] == 14 and (ckpt / "12").is_dir()  # step 12 trained and saved anew


def test_a_run_directory_of_another_model_and_an_override_typo(tmp_path):
    env = env_for(tmp_path)
    cfg = write_tiny_run(tmp_path, name="other", **SECTIONS)
    r = run(train_cmd(cfg, "schedule.total_steps=4"), env)
    assert r.returncode == 0, r.stderr
    r = run(train_cmd(cfg, "model.overrides.hidden_size=64"), env)
    assert r.returncode == 2 and "model.overrides.hidden_size = 64" in r.stderr
    assert "cannot resume" in r.stderr and len(stderr_lines(r.stderr)) == 1
    r = run(train_cmd(cfg, "model.overrides.hiden_size=64"), env)
    assert r.returncode == 2 and "hiden_size" in r.stderr and "cannot resume" not in r.stderr
    assert "Traceback" not in r.stderr


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """The run directory on a small tmpfs (a mount namespace of its own): the first checkpoint
    fits, the second does not. One clear error (exit 4); checkpoint 4 restores afterwards."""
    env = env_for(tmp_path)
    probe = write_tiny_run(tmp_path, name="probe", **SECTIONS)
    r = run(train_cmd(probe, "schedule.total_steps=4", "checkpoint.every=4"), env)
    assert r.returncode == 0, r.stderr
    one = sum(f.stat().st_size for f in (tmp_path / "probe").rglob("*") if f.is_file())
    size_kib = int(one * 1.6) // 1024 + 8  # room for one checkpoint and the run's small files

    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = write_tiny_run(tmp_path, name="full", **SECTIONS)
    text = cfg.read_text().replace(str(tmp_path / "full"), str(disk / "full"))
    cfg.write_text(text)
    keep = tmp_path / "kept"
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {disk} || exit 99; "
              f"{' '.join(train_cmd(cfg))}; rc=$?; cp -a {disk / 'full'} {keep}; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 99, f"could not mount a tmpfs: {r.stderr}"
    assert r.returncode == 4, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk / 'full' / 'checkpoints'}: saving checkpoint 8 failed "
                           "(no space left on device"), r.stderr
    assert last.endswith("); checkpoint 4 is intact"), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert committed(keep / "checkpoints")[0] == 4

    from flax import nnx

    from dsv2_jax import DeepseekV2, DeepseekV2Config
    from dsv2_jax.training.run_checkpoint import restore_params

    mcfg = DeepseekV2Config.from_dict(json.loads((keep / "model_config.json").read_text()))
    _, abstract, _ = nnx.split(nnx.eval_shape(lambda: DeepseekV2(mcfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    params, step = restore_params(keep / "checkpoints", abstract, step=4)
    assert step == 4 and all(bool((abs(x) < 1e6).all()) for x in __import__("jax").tree.leaves(params))
    shutil.rmtree(keep)


def test_sigkill_during_an_async_save_keeps_the_committed_checkpoints(tmp_path):
    """Killed while Orbax writes a checkpoint in the background: the half-written one is
    ignored, the run resumes from the last committed one and finishes."""
    env = env_for(tmp_path)
    cfg = write_tiny_run(tmp_path, name="killed", **SECTIONS)
    ckpt = tmp_path / "killed" / "checkpoints"
    p = subprocess.Popen(train_cmd(cfg, "checkpoint.every=1", "checkpoint.keep=20",
                                   "debug.step_sleep_s=0.2"),
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    caught = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if ckpt.is_dir():
                tmp = [q.name for q in ckpt.iterdir() if "tmp" in q.name]
                if tmp and committed(ckpt):  # a save in flight, after at least one complete
                    caught = tmp[0]
                    os.kill(p.pid, signal.SIGKILL)
                    break
            time.sleep(0.002)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert caught is not None, "never saw a save in flight"
    assert p.returncode == -signal.SIGKILL
    good = committed(ckpt)
    r = run(train_cmd(cfg, "checkpoint.every=1", "checkpoint.keep=20"), env)
    assert r.returncode == 0, r.stderr
    assert f"(step {good[-1]} of 12)" in r.stderr
    assert committed(ckpt)[-1] == 12
    print(f"\nkilled while writing {caught}; resumed from step {good[-1]}")
