"""From a validated TrainConfig to the things a run needs: the model config, the tokenizer,
the initial parameters. Every failure is a ConfigError naming the key responsible.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from .. import sharding
from ..config import DeepseekV2Config, RopeScaling
from ..errors import CheckpointError, ConfigError, HubError
from ..hub import resolve_model_path
from ..hub_format import load
from ..model import DeepseekV2
from ..tokenizer import deepseek_v2_tokenizer_folder, load_tokenizer
from .byte_tokenizer import write_byte_tokenizer
from .config import TrainConfig, bad_value
from .run_checkpoint import restore_params

RUN_MODEL_CONFIG = "model_config.json"  # the model's hub config.json, in every run directory
TOKENIZER_DIR = "tokenizer"  # the tokenizer files, copied into every run directory
TRAINING_ONLY_KEYS = ("aux_loss_alpha", "seq_aux")


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / RUN_MODEL_CONFIG).is_file() and (p / "checkpoints").is_dir()


def _apply_overrides(make, overrides: dict[str, Any], source: str):
    fields = {f.name for f in dataclasses.fields(DeepseekV2Config)}
    kwargs = {}
    for k, v in overrides.items():
        key = f"model.overrides.{k}"
        if k not in fields:
            raise ConfigError(f"{key}: unknown DeepseekV2Config field")
        if k == "rope_scaling" and v is not None:
            if not isinstance(v, dict):
                raise bad_value(key, v, "expected null or a mapping of YaRN settings")
            try:
                v = RopeScaling(**v)
            except TypeError as e:
                raise bad_value(key, v, str(e)) from None
        if k == "quantization":
            raise bad_value(key, v, "training runs on dense weights; quantize at export (--awq)")
        kwargs[k] = v
    try:
        cfg = make(**kwargs)
        cfg.validate(source)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from None
    except ConfigError as e:
        msg = str(e).removeprefix(f"{source}: ")
        raise ConfigError(f"model.overrides.{msg}") from None
    return cfg


def model_config(cfg: TrainConfig):
    """(DeepseekV2Config, folder of the starting checkpoint or None)."""
    m = cfg.model
    if m.preset is not None:
        make = DeepseekV2Config.v2_lite if m.preset == "deepseek-v2-lite" else DeepseekV2Config.v2
        return _apply_overrides(make, m.overrides, f"model.preset {m.preset}"), None
    if m.config_json is not None:
        try:
            base = DeepseekV2Config.from_json(m.config_json)
        except FileNotFoundError:
            raise bad_value("model.config_json", m.config_json, "file not found") from None
        except ConfigError as e:
            raise ConfigError(f"model.config_json: {e}") from None
        return _apply_overrides(lambda **kw: dataclasses.replace(base, **kw), m.overrides,
                                m.config_json), None
    # init_from: a project run directory or a Hugging Face folder / repo id
    if is_run_dir(m.init_from):
        folder = Path(m.init_from)
        d = json.loads((folder / RUN_MODEL_CONFIG).read_text())
    else:
        try:
            folder = resolve_model_path(m.init_from)
        except (HubError, FileNotFoundError, NotADirectoryError) as e:
            raise ConfigError(f"model.init_from: {e}") from None
        try:
            d = json.loads((folder / "config.json").read_text())
        except FileNotFoundError:
            raise bad_value("model.init_from", m.init_from, f"{folder} has no config.json") from None
    try:
        base = DeepseekV2Config.from_dict(d, source=str(folder))
    except ConfigError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if base.quantization is not None and cfg.lora is None:
        raise bad_value("model.init_from", m.init_from,
                   "is an AWQ-quantized checkpoint; full training needs dense weights (a lora: "
                   "section trains adapters beside the packed weights: QLoRA)")
    try:
        return base.replace(**m.overrides), folder
    except ConfigError as e:
        raise ConfigError(f"model.overrides: {e}") from None


def prepare_tokenizer(cfg: TrainConfig, init_folder: Path | None, run_dir: Path,
                      write: bool = True):
    """Copy (or write) the run's tokenizer into RUN_DIR/tokenizer and load it from there.

    ``write=False`` (the processes other than 0 of a multi-process run) loads the same tokenizer
    without touching the run directory."""
    import tempfile

    spec = cfg.data.tokenizer
    target = run_dir / TOKENIZER_DIR
    try:
        if spec == "bytes":
            if not write:
                with tempfile.TemporaryDirectory() as tmp:
                    write_byte_tokenizer(Path(tmp))
                    return load_tokenizer(Path(tmp))
            write_byte_tokenizer(target)
        else:
            if spec == "deepseek-v2":
                source = deepseek_v2_tokenizer_folder()
            elif spec is not None:
                source = Path(spec)
            elif init_folder is not None:
                source = init_folder / TOKENIZER_DIR if is_run_dir(init_folder) else init_folder
                if not (source / "tokenizer.json").is_file():
                    source = deepseek_v2_tokenizer_folder()
            else:
                source = deepseek_v2_tokenizer_folder()
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if not (source / name).is_file():
                    raise FileNotFoundError(f"{source} has no {name}")
            if not write:
                return load_tokenizer(source)
            target.mkdir(parents=True, exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (source / name).resolve() != (target / name).resolve():
                    shutil.copy(source / name, target / name)
        return load_tokenizer(target)
    except (FileNotFoundError, ValueError) as e:
        raise bad_value("data.tokenizer", spec, str(e)) from None


def check_model_against_data(cfg: TrainConfig, model_cfg, tok, fresh: bool):
    """Tokenizer ids must fit the embedding; sequences must fit the position range. For a
    fresh model the BOS/EOS ids of the exported config.json follow the tokenizer."""
    if tok.vocab_size > model_cfg.vocab_size:
        raise bad_value("data.tokenizer", cfg.data.tokenizer,
                   f"has {tok.vocab_size} tokens, more than the model's vocab_size "
                   f"{model_cfg.vocab_size}")
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise bad_value("data.seq_len", cfg.data.seq_len,
                   f"longer than the model's max_position_embeddings "
                   f"({model_cfg.max_position_embeddings})")
    if fresh:
        model_cfg = dataclasses.replace(model_cfg, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return model_cfg


def build_model(cfg: TrainConfig, model_cfg, init_folder: Path | None, mesh=None):
    """The model with its initial parameters (float32 master weights by default).

    With ``mesh`` (``dsv2_jax.sharding.make_mesh``) every parameter is created, read or
    restored straight into its sharding (no device or process holds a full copy) and the MoE
    layers dispatch across the mesh's ``expert`` axis."""
    p = cfg.precision

    def fresh(seed):
        return DeepseekV2(model_cfg, rngs=nnx.Rngs(seed), param_dtype=p.param_dtype,
                          dtype=p.compute_dtype, mesh=mesh)

    if init_folder is None:
        if mesh is None:
            return fresh(cfg.seed)
        return sharding.create_sharded(lambda: fresh(cfg.seed), mesh)
    if cfg.lora is not None:
        return _lora_model(cfg, init_folder, mesh)
    if is_run_dir(init_folder):
        model = nnx.eval_shape(lambda: fresh(0))
        graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
        shardings = None if mesh is None else sharding.tree_shardings(abstract, mesh)
        params, step = restore_params(Path(init_folder) / "checkpoints", abstract,
                                      shardings=shardings)
        if jax.process_index() == 0:
            print(f"init_from: {init_folder} step {step}")
        return nnx.merge(graphdef, params, rest)
    model = load(init_folder, dtype=p.param_dtype, compute_dtype=p.compute_dtype,
                          load_tokenizer=False, mesh=mesh)
    model.config = model_cfg  # aux_loss_alpha / seq_aux overrides; shapes are unchanged
    del model.tokenizer
    return model


def _lora_model(cfg: TrainConfig, init_folder: Path, mesh):
    """The frozen base (compute dtype, or AWQ-packed as stored) with float32 adapters."""
    from ..lora import LoRA, adapters, add_lora, load_adapter, peft_config_dict
    from .config import lora_config

    if is_run_dir(init_folder):
        raise bad_value("model.init_from", cfg.model.init_from,
                        "is a run directory; a lora: run adapts a Hugging Face folder (export "
                        "the run first: python -m train.export)")
    model = load(init_folder, dtype=cfg.precision.compute_dtype, load_tokenizer=False, mesh=mesh)
    del model.tokenizer
    want = lora_config(cfg)
    if cfg.lora.init_from is None:
        add_lora(model, want, seed=cfg.seed)
        return model
    try:
        folder = resolve_model_path(cfg.lora.init_from)
        if peft_config_dict(folder)[1].get("target_parameters"):
            raise bad_value("lora.init_from", cfg.lora.init_from,
                            "is an adapter of transformers 5's fused experts (target_parameters); "
                            "such adapters are read for inference only")
        got = load_adapter(model, folder)
    except (HubError, FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        raise ConfigError(f"lora.init_from: {e}") from None
    for key in ("rank", "alpha", "use_rslora", "target_modules", "layers", "routed_experts",
                "dense_mlps"):
        a, b = getattr(got, key), getattr(want, key)
        if (sorted(a) if key == "target_modules" else a) != (sorted(b) if key == "target_modules" else b):
            raise bad_value(f"lora.{key}", b, f"the adapter in lora.init_from has {a!r}")
    for lora in adapters(model).values():  # this run's dropout, whatever the adapter trained with
        if isinstance(lora, LoRA):
            lora.dropout = want.dropout
    return model
