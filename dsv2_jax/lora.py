"""LoRA adapters beside the model's linears, saved and read in Hugging Face PEFT's format.

A LoRA adapter on a linear ``in -> out`` adds ``(x @ A) @ B · scaling`` to its output, with
``A [in, r]`` and ``B [r, out]`` the only trained weights and ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA). Adapters attach to ``layers.Linear`` (dense or AWQ-packed:
QLoRA is the same adapter beside a packed weight); the model code does not change.
``Linear.dense_weight`` includes the adapter, so absorbed MLA decode, which folds ``kv_b_proj``
into the query and the output, stays exact with an adapter on ``kv_b_proj``.

PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``): tensor
``base_model.model.<hub module>.lora_A.weight`` is ``A`` transposed, ``[r, in]``, and
``...lora_B.weight`` is ``B`` transposed, ``[out, r]``.

Example::

    import dsv2_jax
    model = dsv2_jax.load("deepseek-ai/DeepSeek-V2-Lite-Chat", adapter="./my-adapter")
    # or, to train one:
    from dsv2_jax.lora import LoRAConfig, add_lora
    add_lora(model, LoRAConfig(rank=16, alpha=32, target_modules=("q_proj", "kv_b_proj")))
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import CheckpointError, ConfigError
from .layers import rows_dot

# Hub leaf names of the linears an adapter may sit on: the attention's. For the MLP names
# (gate_proj, up_proj, down_proj) PEFT 0.21 on transformers 5 adapts the fused routed experts
# (mlp.experts.gate_up_proj / down_proj) and never the dense or shared-expert MLPs, so an
# interoperable MLP adapter means routed-expert adapters, which are not built yet.
TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj", "experts")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRAParam(nnx.Variable):
    """A LoRA matrix: in a LoRA run the only trainable state (``nnx.Param`` is the frozen base)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "kv_b_proj", "o_proj")
    layers: tuple[int, ...] | None = None  # None: every layer

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank = {self.rank!r}: expected an integer >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha = {self.alpha!r}: expected > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout = {self.dropout!r}: expected 0 <= dropout < 1")
        if self.dropout:
            raise ConfigError(f"lora.dropout = {self.dropout}: adapter dropout is not built yet "
                              "(use 0.0)")
        bad = [t for t in self.target_modules if t not in TARGETS]
        mlp = [t for t in bad if t in MLP_TARGETS]
        if mlp:
            raise ConfigError(
                f"lora.target_modules: {mlp}: MLP adapters are not built yet (in PEFT's format, "
                "for transformers 5, these names adapt the fused routed experts, which this "
                f"project cannot adapt yet); target the attention linears {list(TARGETS)}")
        if bad or not self.target_modules:
            raise ConfigError(f"lora.target_modules = {list(self.target_modules)}: expected names "
                              f"among {list(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def applies_to(self, module: str) -> bool:
        """Whether hub module ``model.layers.N.<...>.<leaf>`` gets an adapter."""
        parts = module.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or parts[-1] not in self.target_modules:
            return False
        return self.layers is None or int(parts[2]) in self.layers


class LoRA(nnx.Module):
    """``x -> (x @ A) @ B · scaling``; A as PEFT initialises it (Kaiming-uniform, a = √5, which
    is U(±1/√in)), B zero, so a new adapter leaves the model unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, *,
                 rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank), jnp.float32,
                                                   -bound, bound))
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features), jnp.float32))
        self.scaling = scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return rows_dot(rows_dot(x, a), b) * jnp.asarray(self.scaling, x.dtype)

    def delta(self) -> jax.Array:
        """The adapter as a dense ``[in, out]`` float32 update."""
        return self.lora_a[...] @ self.lora_b[...] * self.scaling


def linears(model):
    """(hub module name, Linear) for every linear in the decoder layers."""
    from .layers import Linear

    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and len(path) >= 3 and path[0] == "layers":
            yield ".".join(["model", "layers", *map(str, path[1:])]), node


def add_lora(model, cfg: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Attach a fresh adapter to every targeted linear of ``model``; returns their hub names."""
    rngs = nnx.Rngs(seed)
    names = []
    for name, lin in linears(model):
        if cfg.applies_to(name):
            lin.lora = LoRA(lin.in_features, lin.out_features, cfg.rank, cfg.scaling, rngs=rngs)
            names.append(name)
    if not names:
        raise ConfigError(f"lora: target_modules {list(cfg.target_modules)} with layers "
                          f"{cfg.layers} match no linear of this model")
    return names


def adapters(model) -> dict[str, LoRA]:
    """hub module name -> its adapter."""
    return {name: lin.lora for name, lin in linears(model) if lin.lora is not None}


# --------------------------------------------------------------------------- PEFT format


def peft_config(cfg: LoRAConfig, base_model: str | None = None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora, "target_modules": sorted(cfg.target_modules),
        "layers_to_transform": None if cfg.layers is None else sorted(cfg.layers),
        "layers_pattern": None if cfg.layers is None else "layers",
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def read_peft_config(folder) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter folder; errors name the file and the key."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for key, want in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False),
                      ("fan_in_fan_out", False)):
        if d.get(key, want) != want:
            raise CheckpointError(f"{path}: {key} = {d[key]!r}; only {want!r} is supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if d.get(key):
            raise CheckpointError(f"{path}: {key} = {d[key]!r} is not supported")
    targets = d.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: target_modules = {targets!r} (a regex) is not supported; "
                              "expected a list of module names")
    layers = d.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    try:
        return LoRAConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]),
                          dropout=0.0, use_rslora=bool(d.get("use_rslora", False)),
                          target_modules=tuple(targets or ()),
                          layers=None if layers is None else tuple(int(i) for i in layers))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def save_adapter(model, folder, cfg: LoRAConfig, *, base_model: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT folder, atomically."""
    from safetensors.numpy import save_file

    from .atomic import atomic_folder

    folder = Path(folder)
    tensors = {}
    for name, lora in adapters(model).items():
        a = np.asarray(jax.device_get(lora.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(lora.lora_b[...]), np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, base_model), indent=2))
    return folder


def load_adapter(model, folder, *, seed: int = 0) -> LoRAConfig:
    """Attach the PEFT adapter in ``folder`` to ``model`` (adapters must not be there yet)."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = read_peft_config(folder)
    names = add_lora(model, cfg, seed=seed)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{folder}: {ADAPTER_WEIGHTS} is missing")
    mods = adapters(model)
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    with f:
        present = set(f.keys())
        wanted = set()
        for name in names:
            lora = mods[name]
            for which, var in (("lora_A", lora.lora_a), ("lora_B", lora.lora_b)):
                key = f"{PEFT_PREFIX}{name}.{which}.weight"
                wanted.add(key)
                if key not in present:
                    raise CheckpointError(f"{path}: tensor {key!r} is missing")
                arr = f.get_tensor(key).astype(np.float32).T
                if arr.shape != var[...].shape:
                    raise CheckpointError(f"{path}: tensor {key!r} has shape {list(arr.T.shape)}, "
                                          f"expected {list(var[...].T.shape)}")
                var.set_value(jnp.asarray(arr))
        extra = sorted(present - wanted)
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} (the config's "
                                  f"target_modules / layers_to_transform do not cover it)")
    return cfg


def merge(model) -> None:
    """Fold every adapter into its dense base weight and remove the adapters (in place)."""
    adapted = [lin for _, lin in linears(model) if lin.lora is not None]
    if any(lin.quantized for lin in adapted):  # checked first: nothing is half merged
        raise ValueError("merge: an adapter on an AWQ-packed linear cannot be folded into its "
                         "packed weight; merge into the dense base and quantize the result")
    for lin in adapted:
        w = lin.weight[...]
        lin.weight.set_value((w.astype(jnp.float32) + lin.lora.delta()).astype(w.dtype))
        lin.lora = None
