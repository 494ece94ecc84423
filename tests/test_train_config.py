"""The training config: typed sections, overrides, and errors that name the key before compiling."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import train.run
from dsv2_jax.training.config import ConfigError, load_config
from dsv2_jax.training.testing import write_tiny_run
from tiny import stderr_lines

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load():
    pre = load_config(ROOT / "configs/deepseek-v2-lite-pretrain.yaml")
    assert (pre.optimizer.b1, pre.optimizer.b2, pre.optimizer.weight_decay) == (0.9, 0.95, 0.1)
    assert (pre.schedule.peak_lr, pre.schedule.warmup_steps, pre.optimizer.clip_norm) == (4.2e-4, 2000, 1.0)
    assert pre.schedule.decay_points == (0.8, 0.9) and pre.schedule.decay_factor == 0.316
    assert (pre.batch.global_batch, pre.data.seq_len) == (4608, 4096)
    assert pre.model.overrides["aux_loss_alpha"] == 0.001
    # 5.7T tokens in steps of 4608 x 4096 = 18,874,368 tokens
    assert pre.total_steps == 301_997 and 301_996 * 18_874_368 < 5.7e12 <= 301_997 * 18_874_368
    sft = load_config(ROOT / "configs/deepseek-v2-lite-sft.yaml")
    assert sft.model.init_from == "deepseek-ai/DeepSeek-V2-Lite"
    tiny = load_config(ROOT / "configs/tiny-cpu.yaml")
    assert tiny.data.tokenizer == "bytes" and tiny.precision.compute_dtype == "float32"


def test_overrides_and_types(tmp_path):
    path = write_tiny_run(tmp_path)
    cfg = load_config(path, ["schedule.total_steps=40", "schedule.peak_lr=1e-3",
                             "model.overrides.hidden_size=64", "data.train=[a.txt, b.jsonl]",
                             "checkpoint.async_save=false", "optimizer.clip_norm=null"])
    assert cfg.schedule.total_steps == 40 and cfg.schedule.peak_lr == 1e-3
    assert cfg.model.overrides["hidden_size"] == 64
    assert cfg.data.train == ("a.txt", "b.jsonl")
    assert cfg.checkpoint.async_save is False and cfg.optimizer.clip_norm is None
    assert cfg.batch.accum_steps(data_axis=1) == 2
    # YAML 1.1 reads 5.7e12 and 1e-3 as strings; numbers are still accepted where numbers belong
    cfg = load_config(path, ["schedule.total_steps=null", "schedule.total_tokens='1.28e3'"])
    assert cfg.total_steps == 10  # 1280 tokens / (4 x 32)


@pytest.mark.parametrize("override, message", [
    ("bogus=1", r"^bogus: unknown key"),
    ("optimizer.beta1=0.9", r"^optimizer\.beta1: unknown key \(expected one of: b1, b2"),
    ("batch.global_batch=six", r"^batch\.global_batch = 'six': expected an integer"),
    ("batch.global_batch=5", r"^batch\.global_batch = 5: not divisible by batch\.micro_batch \(2\)"),
    ("schedule.warmup_steps=50", r"^schedule\.warmup_steps = 50: longer than the run \(12 steps\)"),
    ("schedule.warmup_steps=11", r"^schedule\.warmup_steps = 11: ends after the first decay at step 10"),
    ("schedule.peak_lr=-1", r"^schedule\.peak_lr = -1\.0: expected a positive number"),
    ("precision.compute_dtype=fp8", r"^precision\.compute_dtype = 'fp8': expected one of"),
    ("remat.policy=sometimes", r"^remat\.policy = 'sometimes'"),
    ("mesh.expert=0", r"^mesh\.expert = 0: expected a positive integer or -1"),
    ("data.heldout_fraction=1.5", r"^data\.heldout_fraction = 1\.5"),
    ("eval.every=5", r"^eval\.every = 5: evaluation needs data\.heldout_fraction > 0"),
    ("model.config_json=x.json", r"^model: give exactly one of"),
    ("debug.nan_at_step=99", r"^debug\.nan_at_step = 99: expected a step in 1\.\.12"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_tiny_run(tmp_path), [override])


@pytest.mark.parametrize("override, message", [
    ("model.overrides.hiden_size=3", r"^model\.overrides\.hiden_size: unknown DeepseekV2Config field"),
    ("model.overrides.num_experts_per_tok=9", r"^model\.overrides\.num_experts_per_tok = 9"),
    ("model.overrides.vocab_size=100", r"^data\.tokenizer = 'bytes': has 258 tokens, more than .* 100"),
    ("data.seq_len=4096", r"^data\.seq_len = 4096: longer than the model's max_position_embeddings"),
    ("data.train=[/no/such/file.txt]", r"^data\.train\[0\] = '/no/such/file\.txt': no such file"),
    ("batch.global_batch=4000", r"^data\.train: .* fewer than one batch of 4000"),
    ("data.tokenizer=/no/such/folder", r"^data\.tokenizer = '/no/such/folder'"),
])
def test_errors_found_before_building_the_model(tmp_path, monkeypatch, override, message):
    """Errors that need the model config, the tokenizer or the data are raised by train()
    before any parameter is created or any step compiled."""
    from dsv2_jax.training.data import DataError

    def must_not_run(*a, **k):
        raise AssertionError("the model was built before the config error was found")

    monkeypatch.setattr(train.run, "make_training", must_not_run)
    monkeypatch.setattr("dsv2_jax.training.build.build_model", must_not_run)
    overrides = ["model.overrides.max_position_embeddings=256"] if "seq_len" in override else []
    cfg = load_config(write_tiny_run(tmp_path), overrides + [override])
    with pytest.raises((ConfigError, DataError), match=message):
        train.run.train(cfg)


def test_cli_error_is_one_line_exit_2_before_compiling(tmp_path):
    path = write_tiny_run(tmp_path)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "train.run", "--config", str(path),
                        "batch.global_batch=6", "batch.micro_batch=4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "\n".join(stderr_lines(r.stderr)) == ("error: batch.global_batch = 6: not divisible by "
                                "batch.micro_batch (4)")
    assert not (tmp_path / "tiny").exists()  # nothing was written, let alone compiled
    r = subprocess.run([sys.executable, "-m", "train.run", "--config", str(path), "--resume"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and stderr_lines(r.stderr)[0].startswith("error: --resume: no checkpoints in ")
    assert len(stderr_lines(r.stderr)) == 1
    print(f"two CLI errors in {time.time() - t0:.1f}s")


def test_resume_refuses_a_different_model(tmp_path):
    path = write_tiny_run(tmp_path)
    run_dir = tmp_path / "tiny"
    (run_dir / "checkpoints" / "4").mkdir(parents=True)
    cfg = load_config(path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    changed = load_config(path, ["model.overrides.hidden_size=64"])
    with pytest.raises(ConfigError, match=r"^model\.overrides\.hidden_size = 64 \(the run being "
                                          r"resumed has 32\): cannot resume"):
        train.run.train(changed)


def test_resume_fills_keys_added_since_with_their_defaults(tmp_path):
    """A run saved before a key existed (here lora.routed_experts / dense_mlps / dropout) resumes:
    the saved config is read with today's defaults; a real difference is still refused."""
    path = write_tiny_run(tmp_path, lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj"]},
                          model={"preset": None, "init_from": "x", "overrides": {}})
    cfg = load_config(path)
    old = cfg.to_dict()
    for key in ("routed_experts", "dense_mlps", "dropout"):
        del old["lora"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    train.run._check_resumable(cfg, tmp_path)  # no difference
    with pytest.raises(ConfigError, match=r"^lora\.rank = 8 \(the run being resumed has 4\)"):
        train.run._check_resumable(load_config(path, ["lora.rank=8"]), tmp_path)
