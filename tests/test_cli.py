"""python -m infer.generate end to end on a tiny model carrying DeepSeek's real tokenizer."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny import stderr_lines, write_tokenized_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tokenized_checkpoint(tmp_path_factory.mktemp("cli"), seed=0, dtype=np.float16)


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "infer.generate", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_json_output_matches_library(model_dir):
    import dsv2_jax

    r = _run("--model", str(model_dir), "--prompt", "Hello world", "--max-new-tokens", "6",
             "--dtype", "float32", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    model = dsv2_jax.load(model_dir, dtype="float32")
    tok = model.tokenizer
    assert out["prompt_ids"] == [100000] + tok.encode("Hello world")
    ref = dsv2_jax.generate(model, prompts=["Hello world"], max_new_tokens=6, ignore_eos=True)
    assert out["output_ids"] == ref.token_ids[0] and len(out["output_ids"]) == 6
    assert out["text"] == tok.decode(ref.token_ids[0])
    assert out["decode_tokens_per_s"] > 0


def test_streaming_and_chat(model_dir):
    r = _run("--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "4", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi") and "decode" in r.stderr and "tok/s" in r.stderr
    r = _run("--model", str(model_dir), "--chat", "--system", "Be brief", "--max-new-tokens", "3",
             stdin="hello\nand again\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 2


@pytest.mark.parametrize("args,pattern", [
    (["--model", "/no/such/folder"], "no such model folder"),
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--chat", "--json"], "--json prints one prompt's result as one JSON object; it does not apply to --chat"),
])
def test_bad_input_is_one_clear_line(model_dir, args, pattern):
    args = args if "--model" in args else ["--model", str(model_dir), *args]
    r = _run(*args)
    assert r.returncode == 2
    assert pattern in r.stderr and "Traceback" not in r.stderr
    assert len(stderr_lines(r.stderr)) == 1, r.stderr


def test_prompt_longer_than_context(model_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(model_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (short / "config.json").write_text(json.dumps(cfg))
    r = _run("--model", str(short), "--prompt", "word " * 40)
    assert r.returncode == 2 and "exceeds the context" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""  # refused before the prompt is echoed


def test_chat_drops_old_turns_to_fit_the_context(model_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(model_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 40
    (short / "config.json").write_text(json.dumps(cfg))
    turns = "tell me a story about a cat\nand another one about a dog\nand a third about a bird\n"
    r = _run("--model", str(short), "--chat", "--max-new-tokens", "4", stdin=turns + "x " * 60 + "\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 3  # three turns answered; the over-long one not sent
    assert "[dropped the 1 oldest turn(s) to fit the context of 40 tokens]" in r.stderr
    assert "do not fit the context of 40 tokens: not sent]" in r.stderr


def test_ctrl_c_stops_a_reply_not_the_chat():
    import os
    import signal
    import time

    # 1,000 tokens (~4 s at the demo's speed): long enough that the signal lands mid-reply
    p = subprocess.Popen([sys.executable, "-m", "infer.generate", "--chat", "--max-new-tokens", "1000",
                          "--ignore-eos"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdin.write("ROMEO:\n")
    p.stdin.flush()
    seen = ""
    deadline = time.time() + 120
    # The reply has started: its label is flushed before the prefill, and the 1,000 tokens take
    # seconds more. (Waiting for printed reply text instead was flaky: a reply that reaches EOS
    # early goes on with --ignore-eos in tokens that print nothing, so nothing more was flushed
    # until the reply had ended and the SIGINT hit the next "User: " prompt.)
    while time.time() < deadline and not seen.endswith("Assistant: "):
        seen += p.stdout.read(1)
    assert seen.endswith("Assistant: "), seen
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)
    time.sleep(0.5)
    out, err = p.communicate("JULIET:\n\n", timeout=300)
    assert p.returncode == 0, err
    assert "[reply stopped]" in err and "Traceback" not in err
    assert (seen + out).count("Assistant:") == 2  # the chat went on to the next turn
