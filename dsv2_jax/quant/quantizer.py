"""Quantize a dense checkpoint into the AutoAWQ GEMM format: AWQ (scale + clip search) or RTN.

``method="awq"`` (the default) is activation-aware: layer by layer, calibration activations go
through the layer, each scale group's scale and each linear's clip are searched
(:mod:`dsv2_jax.quant.calibrate`, :mod:`dsv2_jax.quant.search`), and the layer is quantized;
its quantized output is the next layer's input. ``method="rtn"`` is plain round-to-nearest.
Both quantize asymmetrically per group of ``group_size`` input rows, and write exactly the
layout AutoAWQ writes (``qweight``/``qzeros``/``scales`` per linear, other tensors fp16,
``quantization_config`` in config.json), so the result loads here and in AWQ-aware tools.
Only one decoder layer's weights are held at a time; the folder is written atomically.

Example::

    python -m dsv2_jax.quant --model ./my-finetune --out ./my-finetune-awq \\
        --calib my-data.jsonl --calib-samples 128 --calib-seq-len 512
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_folder
from ..config import DeepseekV2Config
from ..errors import CheckpointError
from ..hub import resolve_model_path
from ..hub_format import open_safetensors, read_weight_map, save
from .awq import quantize_rtn
from .calibrate import awq_layer, calibration_ids, quantized_linears

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
METHODS = ("awq", "rtn")


class _Reader:
    """Tensors of a (sharded) safetensors checkpoint by name, as float32 NumPy arrays."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weight_map = read_weight_map(folder)

    def shapes(self) -> dict[str, tuple]:
        from safetensors import safe_open

        out = {}
        for fname in sorted(set(self.weight_map.values())):
            with open_safetensors(self.folder / fname, safe_open) as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return out

    def get(self, names) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in names:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for fname, ks in by_file.items():
            with open_safetensors(self.folder / fname, safe_open) as f:
                for k in ks:
                    try:
                        out[k] = np.asarray(f.get_tensor(k), np.float32)
                    except Exception as e:
                        raise CheckpointError(f"{self.folder / fname}: tensor {k!r} could not be "
                                              f"read: {e}") from None
        return out


class _ShardWriter:
    """Tensors into ``part-N.safetensors`` files of at most ``max_bytes``, renamed at the end."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.shard: dict[str, np.ndarray] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, arr: np.ndarray) -> None:
        if self.size and self.size + arr.nbytes > self.max_bytes:
            self.flush()
        self.shard[name] = np.ascontiguousarray(arr)
        self.size += arr.nbytes

    def flush(self) -> None:
        from safetensors.numpy import save_file

        if self.shard:
            name = f"part-{len(self.files):05d}.safetensors"
            save_file(self.shard, str(self.folder / name), metadata={"format": "pt"})
            self.weight_map.update({k: name for k in self.shard})
            self.files.append(name)
        self.shard, self.size = {}, 0

    def finish(self) -> None:
        """Final names as transformers expects them, and the index when sharded."""
        self.flush()
        n = len(self.files)
        final = {p: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, p in enumerate(self.files)}
        for p, q in final.items():
            os.replace(self.folder / p, self.folder / q)
        if n > 1:
            weight_map = {k: final[v] for k, v in self.weight_map.items()}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def default_calibration(src: Path):
    """The bundled corpus for the bundled demo model (its training text: the held-out last 5%
    is left out), or None."""
    from ..demo import DEMO_FOLDER

    corpus = Path(__file__).resolve().parents[2] / "data" / "shakespeare.txt.gz"
    if Path(src).resolve() == DEMO_FOLDER.resolve() and corpus.exists():
        return [corpus], 0.05
    return None


def quantize_checkpoint(src, out, group_size: int = 64, *, method: str = "awq", calib=None,
                        calib_samples: int = 128, calib_seq_len: int = 512,
                        calib_heldout_fraction: float = 0.0, clip: bool = True,
                        duo_scaling: bool | str = True, bits: int = 4,
                        skip: tuple[str, ...] = (), dense_output: bool = False,
                        max_shard_bytes: int = 4 << 30, progress: bool = True,
                        source_name: str | None = None) -> Path:
    """Quantize the dense hub checkpoint at ``src`` (folder or repo id) into ``out``, atomically.

    ``method`` "awq" needs calibration text: ``calib`` (text / JSONL files) tokenized with the
    model's tokenizer into up to ``calib_samples`` windows of ``calib_seq_len`` tokens
    (``calib_heldout_fraction`` leaves out the text's tail); without ``calib`` only the bundled
    demo model has a default (its training corpus). ``duo_scaling``: AutoAWQ's candidate
    scales (True), activations alone (False) or both grids ("both"). ``skip``: linears whose name holds one of
    these strings stay dense (``modules_to_not_convert``). ``dense_output`` writes the dequantized
    weights as a dense float32 checkpoint instead of the packed format (any ``bits``): for
    measuring what a quantization does. ``source_name`` names the source in the model card
    (default: the folder's name).
    """
    if method not in METHODS:
        raise ValueError(f"method = {method!r}: expected one of {METHODS}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size = {group_size}: expected a positive multiple of 8")
    if bits != 4 and not dense_output:
        raise ValueError(f"bits = {bits}: the AWQ GEMM format stores 4-bit weights only")
    src = resolve_model_path(src)
    cfg = DeepseekV2Config.from_json(src / "config.json")
    if cfg.quantization is not None:
        raise CheckpointError(f"{src}/config.json: already quantized ({cfg.quantization})")
    reader = _Reader(src)
    shapes = reader.shapes()
    layer_names: dict[int, list[str]] = {}
    for k in reader.weight_map:
        if _FUSED.match(k):
            raise CheckpointError(f"{src / reader.weight_map[k]}: tensor {k!r} holds fused experts; "
                                  "save with dsv2_jax.save first (per-expert names)")
        if (m := _LAYER.match(k)):
            layer_names.setdefault(int(m.group(1)), []).append(k)
    quantized = {}
    for layer in range(cfg.num_hidden_layers):
        for n in quantized_linears(cfg, layer, skip):
            name = f"model.layers.{layer}.{n}.weight"
            if name not in shapes:
                raise CheckpointError(f"{src}: tensor {name!r} is missing from the checkpoint")
            n_out, n_in = shapes[name]
            if n_in % group_size or n_out % 8:
                raise CheckpointError(
                    f"{src / reader.weight_map[name]}: tensor {name!r} is [{n_out}, {n_in}]; AWQ "
                    f"needs in % group_size ({group_size}) == 0 and out % 8 == 0")
            quantized[name] = layer

    calib_record = None
    x = None
    if method == "awq":
        files, heldout = calib, calib_heldout_fraction
        if not files:
            found = default_calibration(src)
            if found is None:
                raise ValueError(f"{src}: AWQ needs calibration text: pass --calib FILE (text or "
                                 "JSONL), or --method rtn")
            files, heldout = found
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(src)
        ids = calibration_ids(files, tok, calib_samples, calib_seq_len,
                              heldout_fraction=heldout, vocab_size=cfg.vocab_size)
        embed = reader.get(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        x = embed[ids]  # [n, T, H] float32: layer 0's input
        del embed
        calib_record = {"files": [Path(f).name for f in files], "samples": int(ids.shape[0]),
                        "seq_len": int(ids.shape[1]), "heldout_fraction_left_out": heldout}

    out = Path(out)
    store = np.float32 if dense_output else np.float16
    alphas = {}
    started = time.perf_counter()
    with atomic_folder(out) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for k in sorted(n for n in reader.weight_map if not _LAYER.match(n)):
            writer.add(k, reader.get([k])[k].astype(store))
        layers = range(cfg.num_hidden_layers)
        if progress:
            from tqdm import tqdm

            layers = tqdm(layers, desc=f"{method} {bits}-bit g{group_size}", unit="layer",
                          file=sys.stderr)
        for layer in layers:
            tensors = reader.get(layer_names.get(layer, []))
            if method == "awq":
                result = awq_layer(cfg, layer, tensors, x, group_size, bits, clip=clip, skip=skip,
                                   duo_scaling=duo_scaling)
                tensors, x = result.tensors, result.output
                alphas[layer] = result.alphas
            for name in sorted(tensors):
                w = tensors[name]
                if name not in quantized:
                    writer.add(name, w.astype(store))
                elif dense_output:
                    from .search import fake_quantize

                    writer.add(name, np.asarray(fake_quantize(w.T, group_size, bits)).T)
                else:
                    q, z, s = quantize_rtn(w.T, group_size)
                    base = name[: -len(".weight")]
                    writer.add(f"{base}.qweight", q)
                    writer.add(f"{base}.qzeros", z)
                    writer.add(f"{base}.scales", s.astype(np.float16))
            del tensors
        writer.finish()
        d = json.loads((src / "config.json").read_text())
        record = {"method": method, "bits": bits, "group_size": group_size,
                  "seconds": round(time.perf_counter() - started, 1)}
        if method == "awq":
            record.update(duo_scaling=duo_scaling, clip=clip, calibration=calib_record)
        if dense_output:
            d["torch_dtype"] = "float32"
            d["dsv2_jax_fake_quantization"] = record
        else:
            d["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                        "zero_point": True, "version": "gemm",
                                        "modules_to_not_convert": list(skip) or None,
                                        "dsv2_jax": record}
            d["torch_dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        (tmp / "README.md").write_text(_model_card(source_name or src.name, record))
        for fn in _TOKENIZER_FILES:
            if (src / fn).exists():
                shutil.copy(src / fn, tmp / fn)
    return out


def _model_card(name: str, record: dict) -> str:
    how = ("AWQ (activation-aware scale search + clip search, dsv2-jax)" if record["method"] == "awq"
           else "round-to-nearest (RTN, dsv2-jax)")
    line = f"{record['bits']}-bit, group {record['group_size']}, quantized from `{name}` with {how}"
    cal = record.get("calibration")
    if cal:
        line += (f", calibrated on {cal['samples']} × {cal['seq_len']} tokens of "
                 f"{', '.join(cal['files'])}")
    return f"# {name}, quantized\n\n{line}.\n"


def quantize(model_or_path, out, group_size: int = 64, **kwargs) -> Path:
    """Quantize a loaded model (saved first) or a checkpoint folder into AWQ format; keyword
    arguments as :func:`quantize_checkpoint` (``method``, ``calib``, ...)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return quantize_checkpoint(model_or_path, out, group_size, **kwargs)
    with tempfile.TemporaryDirectory(prefix="dsv2-dense-") as d:
        tok = getattr(model_or_path, "tokenizer", None)
        dense = save(model_or_path, Path(d) / "dense", tokenizer=tok)
        return quantize_checkpoint(dense, out, group_size, **kwargs)
