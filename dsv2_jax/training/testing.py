"""Tiny runs for tests and examples: a small text and a config that trains it in seconds.

Example::

    from dsv2_jax.training.testing import write_tiny_run
    cfg_path = write_tiny_run(tmp_path)           # tmp_path/tiny.yaml, tmp_path/text.txt
    # python -m train.run --config tmp_path/tiny.yaml schedule.total_steps=20
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

TINY_MODEL = dict(  # V2-Lite structure (dense layer 0, then MoE with shared experts, YaRN), tiny
    vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
)

_WORDS = {
    "det": ["the", "a", "my", "your", "this"],
    "noun": ["cat", "king", "river", "house", "queen", "dog", "storm", "garden"],
    "verb": ["sees", "loves", "finds", "keeps", "calls", "hears"],
    "adj": ["old", "quiet", "red", "bright", "cold"],
}


def sample_text(n_sentences: int = 1500, seed: int = 0) -> str:
    """Sentences from a small grammar: learnable structure for a byte-level model."""
    rng = np.random.default_rng(seed)

    def pick(kind):
        words = _WORDS[kind]
        return words[rng.integers(len(words))]

    lines = []
    for _ in range(n_sentences):
        s = f"{pick('det')} {pick('adj')} {pick('noun')} {pick('verb')} {pick('det')} {pick('noun')}."
        lines.append(s[0].upper() + s[1:])
    return "\n".join(lines) + "\n"


def tiny_config(run_dir: str | Path, train: list[str], **sections: dict[str, Any]) -> dict:
    """A plain config dict for the tiny model; ``sections`` update its sections."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {"preset": "deepseek-v2-lite", "overrides": dict(TINY_MODEL)},
        "data": {"train": list(train), "tokenizer": "bytes", "seq_len": 32},
        "schedule": {"peak_lr": 1e-2, "warmup_steps": 2, "total_steps": 12},
        "batch": {"global_batch": 4, "micro_batch": 2},
        "precision": {"param_dtype": "float32", "compute_dtype": "float32"},
        "checkpoint": {"every": 4, "keep": 3},
        "logging": {"every": 1, "tensorboard": True, "progress": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **values}
        else:
            cfg[name] = values
    return cfg


def write_tiny_run(folder: str | Path, name: str = "tiny", **sections) -> Path:
    """Write ``folder/text.txt`` and ``folder/<name>.yaml`` (run_dir ``folder/<name>``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "text.txt"
    if not text.exists():
        text.write_text(sample_text())
    cfg = tiny_config(folder / name, [str(text)], **sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
