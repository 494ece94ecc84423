"""The lm-evaluation-harness backend against the harness's own ``hf`` backend (transformers'
DeepseekV2ForCausalLM, torch CPU, float32) on one random tiny checkpoint, through lm_eval's
Python API, on the local tasks of tests/data/lm_eval (multiple choice, rolling perplexity,
greedy generation); then the demo model from the command line."""

import json
import subprocess
import sys
import time
from pathlib import Path

import lm_eval
import numpy as np
import pytest

import dsv2_jax.harness  # noqa: F401  (registers the "dsv2-jax" model)
from tiny import write_tokenized_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "tests" / "data" / "lm_eval"
TASKS = ["dsv2_mc", "dsv2_rolling", "dsv2_gen"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tokenized_checkpoint(tmp_path_factory.mktemp("lm_eval"), seed=3, dtype=np.float32)


def evaluate(model: str, model_args: str, monkeypatch) -> tuple[dict, float]:
    monkeypatch.chdir(TASKS_DIR)  # the task YAMLs name their JSONL files relative to it
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR)),
                                  log_samples=True, batch_size=4, device="cpu")
    return out, time.perf_counter() - t0


def responses(out: dict, task: str) -> list:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


@pytest.fixture(scope="module")
def both(model_dir):
    mp = pytest.MonkeyPatch()
    try:
        # max_length 32 makes the rolling task cross windows and truncates long contexts.
        # transformers 5 loads DeepSeek's tokenizer as a TokenizersBackend that never adds BOS
        # (it warns so); ours follows tokenizer_config.json's add_bos_token unless told: the
        # same token ids on both sides.
        hf, hf_s = evaluate("hf", f"pretrained={model_dir},dtype=float32,max_length=32", mp)
        ours, our_s = evaluate("dsv2-jax", f"pretrained={model_dir},dtype=float32,max_length=32,"
                                           "add_bos_token=false", mp)
    finally:
        mp.undo()
    n_requests = sum(len(s["resps"]) for t in TASKS for s in ours["samples"][t])
    print(f"\n{n_requests} requests: hf backend {hf_s:.1f} s ({n_requests / hf_s:.1f} req/s), "
          f"dsv2-jax {our_s:.1f} s ({n_requests / our_s:.1f} req/s, compilation included)")
    return hf, ours


def test_loglikelihoods_and_greedy_flags_equal_the_hf_backend(both):
    hf, ours = both
    for task in ("dsv2_mc", "dsv2_rolling"):
        got, want = responses(ours, task), responses(hf, task)
        assert len(got) == len(want) > 0
        for g_doc, w_doc in zip(got, want):
            for g, w in zip(g_doc, w_doc):
                g_ll, w_ll = (g[0][0], w[0][0]) if task == "dsv2_mc" else (g[0], w[0])
                assert abs(float(g_ll) - float(w_ll)) <= 1e-4, (task, g, w)
                if task == "dsv2_mc":
                    assert bool(g[0][1]) == bool(w[0][1]), (task, g, w)
    for metric in ("acc,none", "word_perplexity,none"):
        task = "dsv2_mc" if metric.startswith("acc") else "dsv2_rolling"
        assert ours["results"][task][metric] == pytest.approx(hf["results"][task][metric], rel=1e-4)


def test_greedy_generations_equal_the_hf_backend(both):
    hf, ours = both
    got, want = responses(ours, "dsv2_gen"), responses(hf, "dsv2_gen")
    assert got == want and any(g[0] for g in got)  # identical, and not all empty


def test_demo_model_from_the_command_line(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.harness", "run", "--model", "dsv2-jax",
                        "--model_args", f"pretrained={ROOT / 'dsv2_jax/demo/shakespeare'},dtype=float32",
                        "--tasks", *TASKS, "--include_path", str(TASKS_DIR), "--batch_size", "4",
                        "--output_path", str(tmp_path / "out")],
                       cwd=TASKS_DIR, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]
    print(f"\ndemo model via the CLI in {elapsed:.1f} s: mc acc {results['dsv2_mc']['acc,none']:.2f}, "
          f"word perplexity {results['dsv2_rolling']['word_perplexity,none']:.1f}")
    assert set(TASKS) <= set(results)
    assert 0 <= results["dsv2_mc"]["acc,none"] <= 1
    # A model trained on Shakespeare beats the uniform 6000-token guess by far.
    assert results["dsv2_rolling"]["bits_per_byte,none"] < np.log2(6000) / 2
