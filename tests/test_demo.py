"""The bundled demo model: a real artifact that loads, predicts held-out Shakespeare, and runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dsv2_jax
from dsv2_jax.demo import demo_model_path
from train.evaluate import evaluate, heldout_windows

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = Path(__file__).resolve().parent / "data" / "shakespeare_heldout.txt"
# Measured on this slice when the model was built (model card): AWQ loss 4.56 nats.
# A broken artifact (wrong weights, nibble order, tokenizer) lands near ln(6000) = 8.7.
LOSS_BOUND = 5.0


@pytest.fixture(scope="module")
def model():
    return dsv2_jax.load(demo_model_path(), dtype="float32")


def test_artifact_is_small_awq_with_the_real_architecture():
    folder = demo_model_path()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 20 * 2**20, f"demo folder is {size / 2**20:.1f} MiB"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq"
    assert cfg["quantization_config"]["group_size"] == 64
    heads, head_dim = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    assert cfg["kv_lora_rank"] < heads * head_dim and cfg["qk_rope_head_dim"] > 0
    assert cfg["first_k_dense_replace"] >= 1 and cfg["n_shared_experts"] >= 1
    assert cfg["n_routed_experts"] >= 8 and cfg["num_experts_per_tok"] >= 2
    assert (folder / "README.md").exists() and (folder / "tokenizer.json").exists()


def test_heldout_loss_and_expert_balance(model):
    text = HELDOUT.read_text(encoding="utf-8")
    windows = heldout_windows(model.tokenizer, text, 1.0, 128, None)
    result = evaluate(model, windows, batch=4)
    print(f"demo AWQ held-out loss {result['loss']:.3f} nats (ppl {result['perplexity']:.1f}) on "
          f"{result['tokens']} tokens; expert load max {result['max_relative_load']:.2f}x mean")
    assert result["tokens"] >= 1500
    assert result["loss"] < LOSS_BOUND
    assert result["max_relative_load"] < 3.0


def test_generate_cli_default_is_the_demo():
    r = subprocess.run([sys.executable, "-m", "infer.generate", "--prompt", "ROMEO:",
                        "--max-new-tokens", "40"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > 60
    assert "tok/s" in r.stderr


def test_quickstart_notebook_runs():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "layers," in outputs and "decode" in outputs


def test_model_card_recipe_reproduces_the_tokenizer(tmp_path):
    """The model card's first command, run on the corpus shipped in the repo, rebuilds the
    shipped tokenizer byte for byte."""
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.training.bpe", "--input",
                        str(ROOT / "data" / "shakespeare.txt.gz"), "--vocab-size", "6000",
                        "--out", str(tmp_path / "tok")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (demo_model_path() / name).read_bytes(), name


def test_evaluate_cli_scores_a_small_held_out_file(tmp_path):
    """The README's `python -m train.evaluate MODEL --text heldout.txt`: the whole file is
    scored (it used to take only its last 5% and fail), as a table or as JSON."""
    text = HELDOUT.read_text(encoding="utf-8")[:3000]
    (tmp_path / "heldout.txt").write_text(text)
    cmd = [sys.executable, "-m", "train.evaluate", str(demo_model_path()), "--text",
           str(tmp_path / "heldout.txt"), "--seq-len", "128"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and "perplexity" in r.stdout and "MoE layer" in r.stdout
    r = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    res = json.loads(r.stdout)
    ids = dsv2_jax.load(demo_model_path()).tokenizer.encode(text)
    assert res["tokens"] == (len(ids) - 1) // 128 * 128  # every full window, the last batch too
    assert res["loss"] < LOSS_BOUND
