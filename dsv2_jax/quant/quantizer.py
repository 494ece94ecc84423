"""Round-to-nearest (RTN) 4-bit quantization of a dense checkpoint into the AWQ GEMM format.

This is plain RTN, asymmetric per group of ``group_size`` input rows: no activation-aware
scale search (the "A" of AWQ) yet. The output is laid out exactly as AutoAWQ writes its
GEMM checkpoints (``qweight``/``qzeros``/``scales`` per linear, other tensors fp16,
``quantization_config`` in config.json), so it loads here and in AWQ-aware tools alike.

Example::

    python -m dsv2_jax.quant --model ./my-finetune --out ./my-finetune-awq --group-size 64
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_folder
from ..config import DeepseekV2Config
from ..errors import CheckpointError
from ..hub import resolve_model_path
from ..hub_format import open_safetensors, read_weight_map, save
from .awq import quantize_rtn

# Every linear inside a decoder layer; not the router (mlp.gate), embeddings, lm_head, norms.
QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.((shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj)))\.weight$")
_FUSED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def quantize_checkpoint(src, out, group_size: int = 64, *, max_shard_bytes: int = 4 << 30) -> Path:
    """Quantize the dense hub checkpoint at ``src`` (folder or repo id) into ``out``, atomically."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src = resolve_model_path(src)
    cfg = DeepseekV2Config.from_json(src / "config.json")
    if cfg.quantization is not None:
        raise CheckpointError(f"{src}/config.json: already quantized ({cfg.quantization})")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size = {group_size}: expected a positive multiple of 8")
    out = Path(out)
    with atomic_folder(out) as tmp:
        weight_map: dict[str, str] = {}
        shard: dict[str, np.ndarray] = {}
        shards: list[str] = []
        size = 0

        def flush():
            nonlocal shard, size
            if shard:
                name = f"part-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
                shards.append(name)
            shard, size = {}, 0

        def add(name, arr):
            nonlocal size
            if size and size + arr.nbytes > max_shard_bytes:
                flush()
            shard[name] = np.ascontiguousarray(arr)
            size += arr.nbytes

        by_file: dict[str, list[str]] = {}
        for k, f in read_weight_map(src).items():
            by_file.setdefault(f, []).append(k)
        for fname, names in by_file.items():
            with open_safetensors(src / fname, safe_open) as f:
                for k in names:
                    if _FUSED.match(k):
                        raise CheckpointError(f"{src / fname}: tensor {k!r} holds fused experts; "
                                              "save with dsv2_jax.save first (per-expert names)")
                    w = f.get_tensor(k)
                    if not QUANTIZED.match(k):
                        add(k, w.astype(np.float16))
                        continue
                    n_out, n_in = w.shape
                    if n_in % group_size or n_out % 8:
                        raise CheckpointError(
                            f"{src / fname}: tensor {k!r} is [{n_out}, {n_in}]; AWQ needs in % "
                            f"group_size ({group_size}) == 0 and out % 8 == 0")
                    q, z, s = quantize_rtn(np.asarray(w, np.float32).T, group_size)
                    base = k[: -len(".weight")]
                    add(f"{base}.qweight", q)
                    add(f"{base}.qzeros", z)
                    add(f"{base}.scales", s.astype(np.float16))
        flush()
        # Final names as transformers expects them.
        n = len(shards)
        final = {p: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, p in enumerate(shards)}
        for p, q in final.items():
            os.replace(tmp / p, tmp / q)
        weight_map = {k: final[v] for k, v in weight_map.items()}
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        d = json.loads((src / "config.json").read_text())
        d["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                    "zero_point": True, "version": "gemm",
                                    "modules_to_not_convert": None}
        d["torch_dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        for fn in _TOKENIZER_FILES:
            if (src / fn).exists():
                shutil.copy(src / fn, tmp / fn)
    return out


def quantize(model_or_path, out, group_size: int = 64) -> Path:
    """RTN-quantize a loaded model (saved first) or a checkpoint folder into AWQ format."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return quantize_checkpoint(model_or_path, out, group_size)
    with tempfile.TemporaryDirectory(prefix="dsv2-dense-") as d:
        dense = save(model_or_path, Path(d) / "dense")
        return quantize_checkpoint(dense, out, group_size)
