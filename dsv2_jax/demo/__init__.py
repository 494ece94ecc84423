"""The bundled demo model: a small DeepSeek-V2 trained on Shakespeare, shipped as AWQ 4-bit.

Example::

    import dsv2_jax
    from dsv2_jax.demo import demo_model_path
    model = dsv2_jax.load(demo_model_path(), dtype="float32")
    print(dsv2_jax.generate(model, prompts=["ROMEO:"], max_new_tokens=40).texts[0])
"""

from __future__ import annotations

from pathlib import Path

DEMO_FOLDER = Path(__file__).resolve().parent / "shakespeare"


def demo_model_path() -> Path:
    """Folder of the bundled demo model (HF format: config, safetensors, tokenizer, model card)."""
    if not (DEMO_FOLDER / "config.json").exists():
        raise FileNotFoundError(
            f"{DEMO_FOLDER}: the bundled demo model is missing (a partial checkout or install?); "
            "pass --model PATH_OR_REPO_ID")
    return DEMO_FOLDER
