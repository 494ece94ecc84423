"""LoRA adapters beside the model's linears, saved and read in Hugging Face PEFT's format.

A LoRA adapter on a linear ``in -> out`` adds ``(x @ A) @ B · scaling`` to its output, with
``A [in, r]`` and ``B [r, out]`` the only trained weights and ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA). Adapters attach to ``layers.Linear`` (dense or AWQ-packed:
QLoRA is the same adapter beside a packed weight) and, one per expert, to the stacked routed
experts (:class:`ExpertLoRA` on ``expert_weights.ExpertWeights``, passed through the MoE
dispatch as ``expert_weights.Adapted``). ``Linear.dense_weight`` includes the adapter, so
absorbed MLA decode, which folds ``kv_b_proj`` into the query and the output, stays exact with
an adapter on ``kv_b_proj``.
Training steps may drop the adapters' inputs (``dropout``, :func:`set_dropout_keys`).

PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``): tensor
``base_model.model.<hub module>.lora_A.weight`` is ``A`` transposed, ``[r, in]``, and
``...lora_B.weight`` is ``B`` transposed, ``[out, r]``; routed experts under their per-expert
hub names (``model.layers.N.mlp.experts.E.gate_proj``). PEFT's layout for transformers 5's fused
experts (``target_parameters``) is read too (:data:`FUSED_PARAMS`).

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
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import CheckpointError, ConfigError
from .layers import rows_dot

# Hub leaf names of the linears an adapter may sit on. The MLP names adapt the dense MLP (the
# first layers) and the shared experts (unless ``dense_mlps`` is false), and with
# ``routed_experts`` the routed experts too.
ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# An ExpertLoRA's key in ``adapters()``: the hub names of its experts with ``*`` for the number.
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+|\*)\.(gate_proj|up_proj|down_proj)$")


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
    # The MLP targets also adapt each routed expert (one adapter per expert, stacked).
    routed_experts: bool = False
    # The MLP targets adapt the dense MLP and the shared experts (false: the routed experts
    # only, which is what PEFT on transformers 5 reads these names as).
    dense_mlps: bool = True

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"lora.rank = {self.rank!r}: expected an integer >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha = {self.alpha!r}: expected > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout = {self.dropout!r}: expected 0 <= dropout < 1")
        for key in ("use_rslora", "routed_experts", "dense_mlps"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"lora.{key} = {getattr(self, key)!r}: expected true or false")
        if self.layers is not None:
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.layers):
                raise ConfigError(f"lora.layers = {list(self.layers)}: expected null or layer "
                                  "indices >= 0")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if self.dropout and self.routed_experts:
            raise ConfigError(f"lora.dropout = {self.dropout} with lora.routed_experts = true: "
                              "dropout on the routed experts' adapters is not built (PEFT "
                              "refuses it for fused experts too); use dropout 0.0")
        bad = [t for t in self.target_modules if t not in TARGETS]
        if bad or not self.target_modules:
            raise ConfigError(f"lora.target_modules = {list(self.target_modules)}: expected names "
                              f"among {list(TARGETS)}")
        if not self.dense_mlps and not self.routed_experts:
            raise ConfigError("lora.dense_mlps = false needs lora.routed_experts = true (the MLP "
                              "names would adapt nothing)")
        if self.routed_experts and not set(self.target_modules) & set(MLP_TARGETS):
            raise ConfigError(f"lora.routed_experts = true needs an MLP name in "
                              f"lora.target_modules ({list(MLP_TARGETS)}); found "
                              f"{list(self.target_modules)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def applies_to(self, module: str) -> bool:
        """Whether hub module ``model.layers.N.<...>.<leaf>`` gets an adapter."""
        parts = module.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or parts[-1] not in self.target_modules:
            return False
        if EXPERT_KEY.match(module):
            if not self.routed_experts:
                return False
        elif parts[-1] in MLP_TARGETS and not self.dense_mlps:
            return False
        return self.layers is None or int(parts[2]) in self.layers


def _fresh(rngs: nnx.Rngs, lead: tuple, in_features: int, rank: int, out_features: int):
    """A new adapter's A [*lead, in, r] as PEFT initialises it (Kaiming-uniform, a = √5, which is
    U(±1/√in)) and its B [*lead, r, out], zero."""
    bound = 1.0 / math.sqrt(in_features)
    a = jax.random.uniform(rngs.params(), (*lead, in_features, rank), jnp.float32, -bound, bound)
    return LoRAParam(a), LoRAParam(jnp.zeros((*lead, rank, out_features), jnp.float32))


class LoRA(nnx.Module):
    """``x -> (dropout(x) @ A) @ B · scaling``; A as PEFT initialises it, B zero (:func:`_fresh`),
    so a new adapter leaves the model unchanged.

    Dropout (PEFT's ``lora_dropout``: inverted dropout on the adapter's input only) acts while
    ``dropout_key`` holds a key, which the training step sets (:func:`set_dropout_keys`) for
    each micro-batch; without one (inference, evaluation) the adapter is deterministic."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, *,
                 rngs: nnx.Rngs, dropout: float = 0.0):
        self.lora_a, self.lora_b = _fresh(rngs, (), in_features, rank, out_features)
        self.scaling = scaling
        self.dropout = dropout
        self.dropout_key = nnx.data(None)  # uint32 key data, set per micro-batch in training

    @property
    def dropping(self) -> bool:
        """Whether dropout acts on the next call (then the adapter depends on its input's rows
        and cannot be folded into the weight)."""
        return self.dropout > 0 and self.dropout_key is not None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropping:
            keep = 1.0 - self.dropout
            x = jnp.where(dropout_mask(self.dropout_key, self.dropout, x.shape), x / keep, 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return rows_dot(rows_dot(x, a), b) * jnp.asarray(self.scaling, x.dtype)

    def delta(self) -> jax.Array:
        """The adapter as a dense ``[in, out]`` float32 update (no dropout: refused while it acts)."""
        if self.dropping:
            raise ValueError("LoRA.delta: the adapter's dropout is active (a training forward), "
                             "so it cannot be folded into the weight; call the Linear instead")
        return self.lora_a[...] @ self.lora_b[...] * self.scaling


def dropout_mask(key_data: jax.Array, rate: float, shape) -> jax.Array:
    """True where an input value is kept (probability 1 - rate), from uint32 key data."""
    return jax.random.bernoulli(jax.random.wrap_key_data(key_data), 1.0 - rate, shape)


def set_dropout_keys(model, key: jax.Array) -> int:
    """Give each adapter with dropout its own key, ``fold_in(key, i)`` for the i-th adapter in
    graph order (``key``: a typed key). Returns how many adapters got one."""
    n = 0
    for _, lin in linears(model):
        lora = lin.lora
        if isinstance(lora, LoRA) and lora.dropout > 0:
            lora.dropout_key = jax.random.key_data(jax.random.fold_in(key, n))
            n += 1
    return n


class ExpertLoRA(nnx.Module):
    """One :class:`LoRA` per routed expert, stacked: ``a [E, in, r]``, ``b [E, r, out]``; expert
    ``e`` is the hub module ``model.layers.N.mlp.experts.e.<proj>`` in PEFT's files."""

    def __init__(self, n: int, in_features: int, out_features: int, rank: int, scaling: float, *,
                 rngs: nnx.Rngs):
        self.lora_a, self.lora_b = _fresh(rngs, (n,), in_features, rank, out_features)
        self.scaling = scaling

    def delta(self) -> jax.Array:
        """The adapters as a dense ``[E, in, out]`` float32 update."""
        return jnp.einsum("eir,ero->eio", self.lora_a[...], self.lora_b[...]) * self.scaling


def linears(model):
    """(hub module name, Linear or ExpertWeights) for every linear in the decoder layers; a
    routed-expert stack is named ``model.layers.N.mlp.experts.*.<proj>``."""
    from .expert_weights import ExpertWeights
    from .layers import Linear

    for path, node in nnx.iter_graph(model):
        if len(path) < 3 or path[0] != "layers":
            continue
        parts = ["model", "layers", *map(str, path[1:])]
        if isinstance(node, Linear):
            yield ".".join(parts), node
        elif isinstance(node, ExpertWeights):
            yield ".".join(parts[:-1] + ["experts", "*", parts[-1].removeprefix("experts_")]), node


def _new_adapter(lin, cfg: LoRAConfig, rngs):
    from .expert_weights import ExpertWeights

    if isinstance(lin, ExpertWeights):
        return ExpertLoRA(lin.n, lin.in_features, lin.out_features, cfg.rank, cfg.scaling, rngs=rngs)
    return LoRA(lin.in_features, lin.out_features, cfg.rank, cfg.scaling, rngs=rngs, dropout=cfg.dropout)


def add_lora(model, cfg: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Attach a fresh adapter to every targeted linear of ``model``; returns their hub names
    (``...experts.*.<proj>`` for a stack of routed-expert adapters)."""
    n_layers = len(model.layers)
    if cfg.layers and max(cfg.layers) >= n_layers:
        raise ConfigError(f"lora.layers = {list(cfg.layers)}: the model has layers 0 to {n_layers - 1}")
    rngs = nnx.Rngs(seed)
    names = []
    for name, lin in linears(model):
        if cfg.applies_to(name):
            lin.lora = _new_adapter(lin, cfg, rngs)
            names.append(name)
    if not names:
        raise ConfigError(f"lora: target_modules {list(cfg.target_modules)} with layers "
                          f"{cfg.layers} match no linear of this model")
    return names


def adapters(model) -> dict[str, LoRA | ExpertLoRA]:
    """hub module name (``...experts.*.<proj>`` for a routed-expert stack) -> its adapter."""
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


def peft_config_dict(folder) -> tuple[Path, dict]:
    """(the path of ``folder``'s adapter_config.json, its contents); errors name the file."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# PEFT on transformers 5 adapts DeepSeek-V2's fused routed experts (one [E, out, in] parameter
# per layer: mlp.experts.gate_up_proj = [gate; up] and mlp.experts.down_proj) through
# ``target_parameters``; each gets lora_A [E·R, in] (expert-major rows) and lora_B [out, R·E]
# (expert-minor columns), R its own rank (PEFT's rank_pattern doubles it for gate_up_proj).
FUSED_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a suffix of ``key``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_peft_config(folder, tensor_names=()) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter folder; errors name the file and the key.

    ``tensor_names`` (the adapter file's tensors) decide ``routed_experts`` and ``dense_mlps``:
    the MLP names of a PEFT config cover the routed experts, and the dense and shared-expert
    MLPs, exactly when the file holds their tensors. A folder with ``target_parameters`` (the
    fused experts of transformers 5) adapts the routed experts only, with their own ranks
    (read by :func:`load_adapter`)."""
    return _config_of(*peft_config_dict(folder), tensor_names)


def _config_of(path: Path, d: dict, tensor_names=()) -> LoRAConfig:
    """:func:`read_peft_config` of the contents ``d`` of ``path``."""
    for key, want in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False),
                      ("fan_in_fan_out", False)):
        if d.get(key, want) != want:
            raise CheckpointError(f"{path}: {key} = {d[key]!r}; only {want!r} is supported")
    if d.get("modules_to_save"):
        raise CheckpointError(f"{path}: modules_to_save = {d['modules_to_save']!r} is not supported")
    targets = d.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: target_modules = {targets!r} (a regex) is not supported; "
                              "expected a list of module names")
    targets = tuple(targets or ())
    fused = [str(t).rpartition(".")[2] for t in d.get("target_parameters") or ()]
    bad = [t for t in fused if t not in FUSED_PARAMS]
    if bad:
        raise CheckpointError(f"{path}: target_parameters {bad}: expected the fused routed experts "
                              f"{sorted(FUSED_PARAMS)}")
    # Only the fused experts may have their own rank / alpha: a pattern reaching another module
    # of the file (or any pattern, without fused experts) would change a scaling unseen.
    modules = {_module_of(k) for k in tensor_names} | {
        f"model.layers.0.{part}.{t}" for t in targets for part in ("self_attn", "mlp")}
    for key in ("rank_pattern", "alpha_pattern"):
        hit = [p for p in d.get(key) or {} if not fused
               or any(re.match(rf"(.*\.)?({p})$", m) for m in modules)]
        if hit:
            raise CheckpointError(f"{path}: {key} {hit} is not supported (only for the fused "
                                  "routed experts of target_parameters)")
    layers = d.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    dense_tensors = any(_module_of(k).rsplit(".", 1)[-1] in MLP_TARGETS
                        and not EXPERT_KEY.match(_module_of(k)) for k in tensor_names)
    if fused:
        targets += tuple(m for f in dict.fromkeys(fused) for m in FUSED_PARAMS[f] if m not in targets)
        # MLP names in target_modules beside the fused experts adapt the dense / shared MLPs
        routed, dense = True, dense_tensors
    else:
        mlp = bool(set(targets) & set(MLP_TARGETS))
        routed = mlp and any(EXPERT_KEY.match(_module_of(k)) for k in tensor_names)
        # Without tensors of the dense / shared-expert MLPs, the MLP names adapted the experts only.
        dense = not routed or dense_tensors
    # Dropout only matters when training on: kept for the other adapters, left out when the
    # routed experts are adapted (no dropout is built for those; reading such a file is fine).
    dropout = 0.0 if routed else float(d.get("lora_dropout") or 0.0)
    try:
        return LoRAConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]),
                          dropout=dropout, use_rslora=bool(d.get("use_rslora", False)),
                          target_modules=targets, routed_experts=routed, dense_mlps=dense,
                          layers=None if layers is None else tuple(int(i) for i in layers))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _module_of(tensor_name: str) -> str:
    """``base_model.model.<module>.lora_A.weight`` -> ``<module>``."""
    return tensor_name.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]


def _peft_tensors(name: str, lora) -> dict[str, tuple[nnx.Variable, int | None]]:
    """PEFT tensor name -> (the variable holding it transposed, its expert or None) for one
    adapter: two tensors, or two per expert for a routed-expert stack."""
    out = {}
    experts = range(lora.lora_a[...].shape[0]) if isinstance(lora, ExpertLoRA) else [None]
    for e in experts:
        module = name if e is None else name.replace("*", str(e))
        for which, var in (("lora_A", lora.lora_a), ("lora_B", lora.lora_b)):
            out[f"{PEFT_PREFIX}{module}.{which}.weight"] = (var, e)
    return out


def save_adapter(model, folder, cfg: LoRAConfig, *, base_model: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT folder, atomically (routed experts under the hub's
    per-expert names, ``model.layers.N.mlp.experts.E.gate_proj.lora_A.weight``)."""
    from safetensors.numpy import save_file

    from .atomic import atomic_folder

    folder = Path(folder)
    tensors = {}
    for name, lora in adapters(model).items():
        rank = lora.lora_a[...].shape[-1]
        if rank != cfg.rank or not math.isclose(lora.scaling, cfg.scaling):
            raise ValueError(f"save_adapter: {name} has rank {rank} and scaling {lora.scaling:g}; "
                             f"the config says rank {cfg.rank}, scaling {cfg.scaling:g} (adapters "
                             "read from PEFT's fused-expert layout cannot be written per module)")
        host = {id(v): np.asarray(jax.device_get(v[...]), np.float32) for v in (lora.lora_a, lora.lora_b)}
        for key, (var, e) in _peft_tensors(name, lora).items():
            arr = host[id(var)] if e is None else host[id(var)][e]
            tensors[key] = np.ascontiguousarray(arr.T)
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
    config_path, d = peft_config_dict(folder)
    _config_of(config_path, d)  # the config's errors first
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{folder}: {ADAPTER_WEIGHTS} is missing")
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    with f:
        present = set(f.keys())
        cfg = _config_of(config_path, d, present)
        fused = bool(d.get("target_parameters"))
        names = add_lora(model, cfg, seed=seed)
        mods = adapters(model)
        wanted = set()
        for name in names:
            lora = mods[name]
            if fused and isinstance(lora, ExpertLoRA):
                continue  # below, from PEFT's fused layout
            values = {id(v): np.array(v[...]) for v in (lora.lora_a, lora.lora_b)}
            for key, (var, e) in _peft_tensors(name, lora).items():
                wanted.add(key)
                if key not in present:
                    raise CheckpointError(f"{path}: tensor {key!r} is missing")
                arr = f.get_tensor(key).astype(np.float32).T
                want = values[id(var)].shape if e is None else values[id(var)].shape[1:]
                if arr.shape != want:
                    raise CheckpointError(f"{path}: tensor {key!r} has shape {list(arr.T.shape)}, "
                                          f"expected {list(want[::-1])}")
                if e is None:
                    values[id(var)] = arr
                else:
                    values[id(var)][e] = arr
            for var in (lora.lora_a, lora.lora_b):
                var.set_value(jnp.asarray(values[id(var)]))
        if fused:
            wanted |= _read_fused_experts(model, f, present, path, d, cfg, seed)
        extra = sorted(present - wanted)
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} (the config's "
                                  f"target_modules / layers_to_transform do not cover it)")
    return cfg


def _read_fused_experts(model, f, present: set, path: Path, d: dict, cfg: LoRAConfig,
                        seed: int) -> set:
    """Replace the routed experts' adapters by those of PEFT's fused layout (see FUSED_PARAMS):
    expert e's ``A`` is rows e·R … e·R + R - 1 of lora_A, its ``B`` columns e, E + e, …; the
    gate_up_proj adapter becomes a gate_proj and an up_proj adapter sharing its ``A`` and each
    taking its half of ``B`` (exact: the fused output is [gate; up]). Returns the tensors read."""
    from .expert_weights import ExpertWeights

    rngs, read = nnx.Rngs(seed), set()
    fused = {str(t).rpartition(".")[2] for t in d["target_parameters"]}
    stacks = {}  # layer -> {proj: ExpertWeights}
    for name, lin in linears(model):
        if isinstance(lin, ExpertWeights) and lin.lora is not None:
            stacks.setdefault(int(name.split(".")[2]), {})[name.rsplit(".", 1)[1]] = lin
    for layer, st in sorted(stacks.items()):
        prefix = f"{PEFT_PREFIX}model.layers.{layer}.mlp.experts."
        stems = sorted({k[len(prefix):].rsplit("lora_", 1)[0] for k in present
                        if k.startswith(prefix) and k.endswith(".weight")})
        found = set()
        for stem in stems:
            ka, kb = f"{prefix}{stem}lora_A.weight", f"{prefix}{stem}lora_B.weight"
            for k in (ka, kb):
                if k not in present:
                    raise CheckpointError(f"{path}: tensor {k!r} is missing")
            a, b = f.get_tensor(ka).astype(np.float32), f.get_tensor(kb).astype(np.float32)
            any_stack = next(iter(st.values()))
            n = any_stack.n
            hidden = st["down_proj"].out_features if "down_proj" in st else any_stack.in_features
            inter = st["down_proj"].in_features if "down_proj" in st else any_stack.out_features
            shapes = {"gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)}
            param = next((p for p, (i, o) in shapes.items() if (a.shape[1], b.shape[0]) == (i, o)), None)
            rank, rest = divmod(a.shape[0], n)
            if param is None or param not in fused or rest or b.shape[1] != rank * n or not rank:
                raise CheckpointError(
                    f"{path}: tensors {ka!r} {list(a.shape)} and {kb!r} {list(b.shape)} are not an "
                    f"adapter of {sorted(fused)} (expected lora_A [{n}·R, in] and lora_B "
                    f"[out, R·{n}] with (in, out) one of {shapes})")
            key = f"model.layers.{layer}.mlp.experts.{param}"
            alpha = float(_pattern_value(d.get("alpha_pattern"), key, d["lora_alpha"]))
            scaling = alpha / (math.sqrt(rank) if cfg.use_rslora else rank)
            a_stack = a.reshape(n, rank, a.shape[1]).transpose(0, 2, 1)  # [E, in, R]
            b_stack = b.reshape(b.shape[0], rank, n).transpose(2, 1, 0)  # [E, R, out]
            halves = ({"gate_proj": b_stack[..., :inter], "up_proj": b_stack[..., inter:]}
                      if param == "gate_up_proj" else {"down_proj": b_stack})
            for proj, bb in halves.items():
                lin = st[proj]
                lin.lora = ExpertLoRA(n, lin.in_features, lin.out_features, rank, scaling, rngs=rngs)
                lin.lora.lora_a.set_value(jnp.asarray(a_stack))
                lin.lora.lora_b.set_value(jnp.asarray(np.ascontiguousarray(bb)))
            found.add(param)
            read |= {ka, kb}
        if found != fused:
            raise CheckpointError(f"{path}: no adapter of model.layers.{layer}.mlp.experts."
                                  f"{sorted(fused - found)[0]} (target_parameters lists it)")
        covered = {m for p in fused for m in FUSED_PARAMS[p]}
        for proj, lin in st.items():  # an MLP name of target_modules reaches no routed expert
            if proj not in covered:
                lin.lora = None
    return read


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
