"""Hub-format checkpoints: ``config.json`` + (sharded) safetensors with the original tensor names.

Hub linears are stored ``[out, in]``; the model keeps ``[in, out]``. Routed experts are one
tensor per expert on the hub (``mlp.experts.E.gate_proj.weight``) and one stacked array here.
AWQ linears (``qweight``/``qzeros``/``scales``) are already ``[in, ...]`` and load unchanged.
Loading streams tensor by tensor into preallocated host buffers, handing each parameter to
JAX as soon as it is complete, so peak host memory stays near the size of the parameters.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .atomic import atomic_folder
from .config import DeepseekV2Config
from .errors import CheckpointError, ConfigError
from .hub import resolve_model_path
from .model import DeepseekV2
from .sharding import sharding_for
from .tokenizer import load_tokenizer as _load_tok

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_QUANT_LEAVES = ("qweight", "qzeros", "scales")


# ---------------------------------------------------------------------------
# name mapping


def hub_name(path: tuple) -> tuple[str, bool]:
    """Model state path -> (hub name with '{e}' for the expert index, transpose?)."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if parts[0] == "embed_tokens":
        return "model.embed_tokens.weight", False
    if parts[0] == "norm":
        return "model.norm.weight", False
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    # layers.i.<module...>.leaf
    mods = parts[2:-1]
    if mods and mods[-1].startswith("experts_"):
        proj = mods[-1][len("experts_"):]
        name = ".".join(["model.layers", parts[1], *mods[:-1], "experts", "{e}", proj, leaf])
    else:
        name = ".".join(["model.layers", parts[1], *mods, leaf])
    transpose = leaf == "weight" and "layernorm" not in name
    return name, transpose


def _param_table(state) -> dict[str, tuple[tuple, bool, bool]]:
    """hub name (with {e}) -> (state path, transpose, stacked over experts)."""
    table = {}
    for path, var in nnx.to_flat_state(state):
        name, transpose = hub_name(path)
        table[name] = (path, transpose, "{e}" in name)
    return table


def _hub_shape(shape: tuple, transpose: bool, stacked: bool) -> tuple:
    if stacked:
        shape = shape[1:]
    return tuple(reversed(shape)) if transpose else tuple(shape)


# ---------------------------------------------------------------------------
# loading


def read_weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> file name, from the index (sharded) or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    single = folder / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with open_safetensors(single, safe_open) as f:
            return {k: single.name for k in f.keys()}
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise CheckpointError(
        f"{folder}: expected model.safetensors or model.safetensors.index.json, found "
        f"{found or 'no safetensors files'}"
    )


def open_safetensors(path: Path, safe_open):
    if not path.exists():
        raise CheckpointError(f"{path}: file named in the index is missing")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load(path_or_repo_id, dtype="bfloat16", *, compute_dtype=None, revision=None,
         load_tokenizer: bool = True, mesh=None, adapter=None) -> DeepseekV2:
    """Load a DeepSeek-V2(-Lite) checkpoint from a folder or a hub repo id.

    ``dtype`` is the parameter dtype ("float32", "bfloat16", "float16" or a jnp dtype);
    ``compute_dtype`` defaults to it. The router stays float32 and AWQ weights stay packed.
    When the folder holds tokenizer files, ``model.tokenizer`` is set.

    With ``mesh`` (``dsv2_jax.sharding.make_mesh``) every parameter goes straight into its
    sharding under ``dsv2_jax.sharding.RULES`` (where ``shard_model`` would put it) and the MoE
    layers dispatch across the mesh's ``expert`` axis. Each process reads only the routed
    experts its own devices hold and puts only its own shards on its devices, so a model
    larger than one device (or than one host's share) loads. In a multi-process run every
    process calls ``load`` with the same arguments.

    ``adapter`` (a folder or hub repo id in Hugging Face PEFT's LoRA format) attaches that
    adapter beside the base weights (``dsv2_jax.lora``; ``model.lora_config`` records it).

    Example::

        import dsv2_jax
        model = dsv2_jax.load("deepseek-ai/DeepSeek-V2-Lite-Chat", dtype="bfloat16")
        logits = model(jnp.array([[100000, 5, 6]]))
    """
    from safetensors import safe_open

    folder = resolve_model_path(path_or_repo_id, revision)
    cfg = DeepseekV2Config.from_json(folder / "config.json")
    try:
        abstract = nnx.eval_shape(
            lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=compute_dtype, mesh=mesh))
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from None
    graphdef, state = nnx.split(abstract)
    table = _param_table(state)
    flat = dict(nnx.to_flat_state(state))
    weight_map = read_weight_map(folder)
    n_exp = cfg.n_routed_experts

    # Which expected names are in the checkpoint; accept transformers-5 fused experts too.
    expected = {}
    for name, (path, transpose, stacked) in table.items():
        for e in range(n_exp) if stacked else [None]:
            expected[name.format(e=e) if stacked else name] = (name, e)
    unexpected = [k for k in weight_map if k not in expected and not _FUSED.match(k)]
    if unexpected:
        raise CheckpointError(
            f"{folder}: unexpected tensor {unexpected[0]!r} in {weight_map[unexpected[0]]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " — not part of a DeepseekV2 model with this config.json")
    fused_layers = {int(m.group(1)) for k in weight_map if (m := _FUSED.match(k))}
    missing = [k for k, (name, e) in expected.items() if k not in weight_map
               and not (e is not None and int(k.split(".")[2]) in fused_layers)]
    if missing:
        raise CheckpointError(
            f"{folder}: tensor {missing[0]!r} is missing from the checkpoint"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    buffers: dict[tuple, np.ndarray] = {}
    filled: dict[tuple, int] = {}
    values: dict[tuple, jax.Array] = {}
    shardings = _shardings(state, mesh) if mesh is not None else {}
    # Stacked experts: the expert indices held by this process's devices (all without a mesh).
    needed = {path: _needed_experts(flat[path].get_value().shape, shardings.get(path))
              for path, _, stacked in table.values() if stacked}

    def to_device(path, host):
        if path not in shardings:
            return jnp.asarray(host)
        return jax.make_array_from_callback(host.shape, shardings[path], lambda idx: host[idx])

    def put(path, array, e=None, file=None, tensor=None, transpose=False):
        var = flat[path]
        want = var.get_value()
        if e is None:
            hub_shape = _hub_shape(want.shape, transpose, False)
            if tuple(array.shape) != hub_shape:
                raise CheckpointError(f"{file}: tensor {tensor!r} has shape {list(array.shape)}, expected "
                                      f"{list(hub_shape)}{_group_hint(cfg, tensor, array.shape, hub_shape)}")
            arr = array.T if transpose else array
            values[path] = to_device(path, np.asarray(arr).astype(want.dtype))
            return
        if e not in needed[path]:
            return
        buf = buffers.get(path)
        if buf is None:
            # np.empty: pages of experts this process never writes are never touched.
            buf = buffers[path] = np.empty(want.shape, want.dtype)
            filled[path] = 0
        buf[e] = array.T if transpose else array
        filled[path] += 1
        if filled[path] == len(needed[path]):
            values[path] = to_device(path, buffers.pop(path))

    by_file: dict[str, list[str]] = {}
    for k, f in weight_map.items():
        by_file.setdefault(f, []).append(k)
    for fname, names in by_file.items():
        fpath = folder / fname
        with open_safetensors(fpath, safe_open) as f:
            present = set(f.keys())
            for k in sorted(present - set(names)):
                if k in weight_map:
                    raise CheckpointError(
                        f"{fpath}: tensor {k!r} is also in {weight_map[k]}, which the index names "
                        f"for it: two shards hold the same tensor")
                raise CheckpointError(f"{fpath}: tensor {k!r} is not listed in the index "
                                      f"{folder / 'model.safetensors.index.json'}")
            for k in names:
                if k not in present:
                    raise CheckpointError(f"{fpath}: tensor {k!r} is listed in the index but not in the file")
                name, e = expected.get(k, (None, None))
                if name is not None and table[name][2] and e not in needed[table[name][0]]:
                    continue  # an expert held by another process's devices: not even read
                try:
                    array = f.get_tensor(k)
                except Exception as err:
                    raise CheckpointError(f"{fpath}: tensor {k!r} could not be read: {err}") from None
                if (m := _FUSED.match(k)):
                    _put_fused(cfg, table, put, m, array, fpath, k)
                    continue
                path, transpose, stacked = table[name]
                if stacked:
                    want = _hub_shape(flat[path].get_value().shape, transpose, True)
                    if tuple(array.shape) != want:
                        raise CheckpointError(
                            f"{fpath}: tensor {k!r} has shape {list(array.shape)}, expected "
                            f"{list(want)}{_group_hint(cfg, k, array.shape, want)}")
                put(path, array, e, fpath, k, transpose)
                del array
    if buffers:  # a stack that never completed (should have been caught as missing)
        path = next(iter(buffers))
        raise CheckpointError(f"{folder}: experts missing for {'.'.join(map(str, path))}")
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path])
    model = nnx.merge(graphdef, state)
    model.lora_config = None
    if adapter is not None:
        from .lora import load_adapter

        model.lora_config = load_adapter(model, resolve_model_path(adapter))
        if mesh is not None:  # the adapters to their shardings too (routed experts' split)
            from .lora import LoRAParam
            from .sharding import put, tree_shardings

            lora_state = nnx.state(model, LoRAParam)
            nnx.update(model, put(lora_state, tree_shardings(lora_state, mesh)))
    model.tokenizer = None
    if load_tokenizer and (folder / "tokenizer.json").exists():
        model.tokenizer = _load_tok(folder)
    return model


def _group_hint(cfg, tensor: str, got, want) -> str:
    """For an AWQ qzeros/scales of the wrong length along the groups axis: what group size the
    tensor was packed with, against the one config.json declares."""
    if cfg.quantization is None or not tensor.endswith((".qzeros", ".scales")):
        return ""
    if len(got) != len(want) or tuple(got[1:]) != tuple(want[1:]) or not got[0]:
        return ""
    g = cfg.quantization.group_size
    packed = want[0] * g // got[0]
    return (f" (config.json's quantization_config.group_size = {g} gives {want[0]} groups; the "
            f"tensor has {got[0]}, as group_size {packed} would)")


def _shardings(state, mesh) -> dict[tuple, jax.sharding.Sharding]:
    """State path -> NamedSharding under dsv2_jax.sharding's rules."""
    return {path: sharding_for(path, var.get_value().shape, mesh)
            for path, var in nnx.to_flat_state(state)}


def _needed_experts(shape, sharding) -> set[int]:
    """Indices along the expert axis of a stacked [E, ...] parameter that this process's
    devices hold (every index without a sharding)."""
    if sharding is None:
        return set(range(shape[0]))
    held = set()
    for idx in sharding.addressable_devices_indices_map(tuple(shape)).values():
        held.update(range(*idx[0].indices(shape[0])))
    return held


def _put_fused(cfg, table, put, m, array, fpath, k):
    """transformers 5 stores experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    layer, which = m.group(1), m.group(2)
    e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    want = (e, 2 * i, h) if which == "gate_up_proj" else (e, h, i)
    if tuple(array.shape) != want:
        raise CheckpointError(f"{fpath}: tensor {k!r} has shape {list(array.shape)}, expected {list(want)}")
    base = f"model.layers.{layer}.mlp.experts.{{e}}"
    parts = ([("gate_proj", array[:, :i]), ("up_proj", array[:, i:])]
             if which == "gate_up_proj" else [("down_proj", array)])
    for proj, a in parts:
        path, transpose, _ = table[f"{base}.{proj}.weight"]
        for ex in range(e):
            put(path, a[ex], ex, fpath, k, transpose)


# ---------------------------------------------------------------------------
# saving


def save(model: DeepseekV2, folder, *, max_shard_bytes: int = 4 << 30, tokenizer=None) -> Path:
    """Write ``config.json`` and sharded safetensors with hub names, atomically.

    The folder is written under a temporary name and renamed at the end, so an interrupted
    save never leaves a half-written checkpoint. The result loads with ``dsv2_jax.load`` and
    with transformers' ``DeepseekV2ForCausalLM.from_pretrained``.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    cfg: DeepseekV2Config = model.config
    state = nnx.state(model, nnx.Variable)
    table = _param_table(state)
    values = dict(nnx.to_flat_state(state))
    with atomic_folder(folder) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        dtypes = set()
        for name, (path, transpose, stacked) in table.items():
            arr = np.asarray(jax.device_get(values[path].get_value()))
            dtypes.add(str(arr.dtype))
            tensors = ([(name.format(e=e), arr[e]) for e in range(arr.shape[0])] if stacked
                       else [(name, arr)])
            for k, a in tensors:
                a = np.ascontiguousarray(a.T if transpose else a)
                if size and size + a.nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][k] = a
                size += a.nbytes
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            total = sum(a.nbytes for s in shards for a in s.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        d = cfg.to_dict()
        main_dtype = next((d for d in ("bfloat16", "float16") if d in dtypes), "float32")
        d["torch_dtype"] = main_dtype
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tok is not None and getattr(tok, "folder", None):
            for fn in ("tokenizer.json", "tokenizer_config.json"):
                src = Path(tok.folder) / fn
                if src.exists():
                    shutil.copy(src, tmp / fn)
    return folder
