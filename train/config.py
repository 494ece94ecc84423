"""The training config: YAML validated into frozen dataclasses, one section per concern.

Every error names the key as written in the YAML (``batch.global_batch = 6: ...``) and is raised
before any model is built or compiled. ``python -m train.run`` turns it into one line and exit 2.

Example::

    from train.config import load_config
    cfg = load_config("configs/tiny-cpu.yaml", ["schedule.total_steps=50", "data.seq_len=64"])
    cfg.schedule.total_steps, cfg.batch.accum_steps(data_axis=1)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

PRESETS = ("deepseek-v2-lite", "deepseek-v2")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DATA_FORMATS = ("auto", "text", "jsonl")
MAX_STEPS = 10_000_000  # the LR schedule tabulates tokens per step


class ConfigError(ValueError):
    """A training config that cannot run; the message starts with the offending key."""


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {why}")


# ---------------------------------------------------------------------------
# sections


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Exactly one of ``preset``, ``config_json`` or ``init_from``.

    ``init_from`` is a Hugging Face folder / repo id (loaded with ``dsv2_jax.load``) or a
    project run directory (its latest checkpoint's parameters; a fresh optimizer).
    ``overrides`` are ``DeepseekV2Config`` fields; with ``init_from`` only the training-only
    keys ``aux_loss_alpha`` and ``seq_aux`` may change.
    """

    preset: str | None = None
    config_json: str | None = None
    init_from: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training text: ``.txt`` files (one document each) and ``.jsonl`` files (one document a line)."""

    train: tuple[str, ...] = ()  # paths or glob patterns, read in sorted order
    format: str = "auto"  # auto (by extension) | text | jsonl
    tokenizer: str | None = None  # folder | "deepseek-v2" | "bytes" | null (the model's own)
    seq_len: int = 4096
    document_mask: bool = True  # attention stays inside each packed document
    heldout_fraction: float = 0.0  # the last fraction of the token stream, for eval
    shuffle: bool = True  # shuffle packed sequences each epoch (order from the seed)
    text_key: str = "text"
    messages_key: str = "messages"


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    """Warm-up then step decays at fractions of the run's tokens; give total_steps or total_tokens."""

    peak_lr: float = 4.2e-4
    warmup_steps: int = 2000
    total_steps: int | None = None
    total_tokens: int | None = None
    decay_points: tuple[float, ...] = (0.8, 0.9)
    decay_factor: float = 0.316


@dataclasses.dataclass(frozen=True)
class BatchSection:
    """``global_batch`` sequences per optimizer step, ``micro_batch`` per device per
    forward/backward (batches are split over every mesh axis: data, fsdp and expert); the
    difference is made up by gradient accumulation."""

    global_batch: int = 8
    micro_batch: int = 1

    def accum_steps(self, data_axis: int) -> int:
        return self.global_batch // (self.micro_batch * data_axis)


@dataclasses.dataclass(frozen=True)
class PrecisionSection:
    param_dtype: str = "float32"  # master weights and optimizer state
    compute_dtype: str = "bfloat16"  # activations and matmuls
    matmul_precision: str = "default"  # jax_default_matmul_precision: default | high | highest


@dataclasses.dataclass(frozen=True)
class RematSection:
    """``jax.checkpoint`` around each decoder layer: none, full (save nothing), dots (save
    matmul outputs), dots_no_batch (save matmuls without batch dims, i.e. weights-only dots)."""

    policy: str = "none"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh axes (``dsv2_jax.sharding.make_mesh``); one of them may be -1 = the devices
    left over. data × fsdp × expert must equal the device count (of all processes).

    ``data``: replicated parameters; ``fsdp``: parameters and optimizer state split along the
    hidden size (ZeRO-3); ``expert``: each device holds n_routed_experts / expert routed experts
    (must divide n_routed_experts). Batches are split over all three.
    """

    data: int = -1
    expert: int = 1
    fsdp: int = 1

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert}


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 0  # 0 = never
    batches: int = 8


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class DebugSection:
    nan_at_step: int | None = None  # make the loss NaN at this step (fault-handling test)
    step_sleep_s: float = 0.0  # pause after each step (lets a test kill the run between checkpoints)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    batch: BatchSection = BatchSection()
    precision: PrecisionSection = PrecisionSection()
    remat: RematSection = RematSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    logging: LoggingSection = LoggingSection()
    debug: DebugSection = DebugSection()

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch * self.data.seq_len

    @property
    def total_steps(self) -> int:
        s = self.schedule
        if s.total_steps is not None:
            return s.total_steps
        return math.ceil(s.total_tokens / self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------
# dict -> dataclass, with the key in every error


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _bad(key, value, "must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _bad(key, value, "expected a mapping of keys")
        return _build(tp, value, key)
    if value is None:
        raise _bad(key, value, "must not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _bad(key, value, "expected an integer")
        if isinstance(value, int):
            return value
        # YAML 1.1 reads 5.7e12 as a string and 1e3 as a string; accept integral numbers.
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "expected an integer") from None
        if not math.isfinite(f) or f != int(f):
            raise _bad(key, value, "expected an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise _bad(key, value, "expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "expected a number") from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, value, "expected a string")
    if origin is tuple:
        if isinstance(value, (str, int, float)) and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, "expected a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(key, value, "expected a mapping")
        return dict(value)
    raise TypeError(f"{key}: unsupported field type {tp}")  # a bug in this file


def _build(cls, d: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in d:
            kwargs[name] = _convert(hints[name], d[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


# ---------------------------------------------------------------------------
# checks that need several keys


def validate(cfg: TrainConfig) -> None:
    m = cfg.model
    given = [k for k in ("preset", "config_json", "init_from") if getattr(m, k) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"model: give exactly one of model.preset, model.config_json, model.init_from "
            f"(found {', '.join('model.' + g for g in given) or 'none'})")
    if m.preset is not None and m.preset not in PRESETS:
        raise _bad("model.preset", m.preset, f"expected one of {', '.join(PRESETS)}")
    if m.init_from is not None:
        extra = sorted(set(m.overrides) - {"aux_loss_alpha", "seq_aux"})
        if extra:
            raise _bad(f"model.overrides.{extra[0]}", m.overrides[extra[0]],
                       "cannot change the architecture of an init_from checkpoint "
                       "(only aux_loss_alpha and seq_aux may be overridden)")

    d = cfg.data
    if not d.train:
        raise ConfigError("data.train: required (a list of .txt / .jsonl paths or globs)")
    if d.format not in DATA_FORMATS:
        raise _bad("data.format", d.format, f"expected one of {', '.join(DATA_FORMATS)}")
    if d.seq_len < 2:
        raise _bad("data.seq_len", d.seq_len, "expected an integer >= 2")
    if not 0.0 <= d.heldout_fraction < 1.0:
        raise _bad("data.heldout_fraction", d.heldout_fraction, "expected a fraction in [0, 1)")

    o = cfg.optimizer
    for k in ("b1", "b2"):
        if not 0.0 <= getattr(o, k) < 1.0:
            raise _bad(f"optimizer.{k}", getattr(o, k), "expected a number in [0, 1)")
    if o.eps <= 0:
        raise _bad("optimizer.eps", o.eps, "expected a positive number")
    if o.weight_decay < 0:
        raise _bad("optimizer.weight_decay", o.weight_decay, "expected a number >= 0")
    if o.clip_norm is not None and o.clip_norm <= 0:
        raise _bad("optimizer.clip_norm", o.clip_norm, "expected a positive number or null")

    b = cfg.batch
    if b.global_batch < 1:
        raise _bad("batch.global_batch", b.global_batch, "expected a positive integer")
    if b.micro_batch < 1:
        raise _bad("batch.micro_batch", b.micro_batch, "expected a positive integer")
    if b.global_batch % b.micro_batch:
        raise _bad("batch.global_batch", b.global_batch,
                   f"not divisible by batch.micro_batch ({b.micro_batch})")

    s = cfg.schedule
    if (s.total_steps is None) == (s.total_tokens is None):
        raise ConfigError("schedule: give exactly one of schedule.total_steps and schedule.total_tokens")
    if s.total_steps is not None and s.total_steps < 1:
        raise _bad("schedule.total_steps", s.total_steps, "expected a positive integer")
    if s.total_tokens is not None and s.total_tokens < 1:
        raise _bad("schedule.total_tokens", s.total_tokens, "expected a positive integer")
    if not (s.peak_lr > 0 and math.isfinite(s.peak_lr)):
        raise _bad("schedule.peak_lr", s.peak_lr, "expected a positive number")
    if s.warmup_steps < 0:
        raise _bad("schedule.warmup_steps", s.warmup_steps, "expected an integer >= 0")
    total = cfg.total_steps
    if total > MAX_STEPS:
        key = "schedule.total_steps" if s.total_steps is not None else "schedule.total_tokens"
        raise _bad(key, getattr(cfg.schedule, key.split(".")[1]),
                   f"gives {total:,} steps of {cfg.tokens_per_step:,} tokens, more than "
                   f"{MAX_STEPS:,}; check batch.global_batch and data.seq_len")
    if s.warmup_steps > total:
        raise _bad("schedule.warmup_steps", s.warmup_steps,
                   f"longer than the run ({total} steps)")
    if not 0.0 < s.decay_factor <= 1.0:
        raise _bad("schedule.decay_factor", s.decay_factor, "expected a number in (0, 1]")
    if any(not 0.0 < p < 1.0 for p in s.decay_points) or list(s.decay_points) != sorted(set(s.decay_points)):
        raise _bad("schedule.decay_points", list(s.decay_points),
                   "expected strictly increasing fractions in (0, 1)")
    from dsv2_jax.train.schedule import decay_steps

    bounds = decay_steps(total, None, s.decay_points) if s.decay_points else ()
    if bounds and s.warmup_steps > bounds[0]:
        raise _bad("schedule.warmup_steps", s.warmup_steps,
                   f"ends after the first decay at step {bounds[0]} "
                   f"({s.decay_points[0]} of the run's {total} steps)")

    p = cfg.precision
    for k in ("param_dtype", "compute_dtype"):
        if getattr(p, k) not in DTYPES:
            raise _bad(f"precision.{k}", getattr(p, k), f"expected one of {', '.join(DTYPES)}")
    if p.matmul_precision not in ("default", "high", "highest"):
        raise _bad("precision.matmul_precision", p.matmul_precision,
                   "expected default, high or highest")
    if cfg.remat.policy not in REMAT_POLICIES:
        raise _bad("remat.policy", cfg.remat.policy, f"expected one of {', '.join(REMAT_POLICIES)}")

    me = cfg.mesh
    for k, v in me.sizes().items():
        if v == 0 or v < -1:
            raise _bad(f"mesh.{k}", v, "expected a positive integer or -1 (the devices left over)")
    free = [k for k, v in me.sizes().items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one of mesh.data, mesh.fsdp, mesh.expert may be -1 "
                          f"(found {', '.join('mesh.' + k for k in free)})")

    c = cfg.checkpoint
    if c.every < 1:
        raise _bad("checkpoint.every", c.every, "expected a positive integer")
    if c.keep < 1:
        raise _bad("checkpoint.keep", c.keep, "expected a positive integer")
    if cfg.eval.every < 0:
        raise _bad("eval.every", cfg.eval.every, "expected an integer >= 0 (0 = never)")
    if cfg.eval.batches < 1:
        raise _bad("eval.batches", cfg.eval.batches, "expected a positive integer")
    if cfg.eval.every and d.heldout_fraction == 0:
        raise _bad("eval.every", cfg.eval.every, "evaluation needs data.heldout_fraction > 0")
    if cfg.logging.every < 1:
        raise _bad("logging.every", cfg.logging.every, "expected a positive integer")
    if cfg.debug.step_sleep_s < 0:
        raise _bad("debug.step_sleep_s", cfg.debug.step_sleep_s, "expected a number >= 0")
    n = cfg.debug.nan_at_step
    if n is not None and not 1 <= n <= total:
        raise _bad("debug.nan_at_step", n, f"expected a step in 1..{total}")


def mesh_sizes(cfg: TrainConfig, n_devices: int, n_routed_experts: int | None = None) -> dict[str, int]:
    """``mesh.data / fsdp / expert`` with the -1 resolved for ``n_devices`` devices, checked
    against the device count and the model's ``n_routed_experts``; errors name the key."""
    me = cfg.mesh
    sizes = me.sizes()
    if n_routed_experts and me.expert != -1 and n_routed_experts % me.expert:
        raise _bad("mesh.expert", me.expert, f"does not divide the model's n_routed_experts "
                                             f"({n_routed_experts}): every device must hold the "
                                             f"same number of routed experts")
    known = math.prod(v for v in sizes.values() if v != -1)
    spelled = " × ".join(f"mesh.{k} ({v})" for k, v in sizes.items())
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if n_devices % known:
            raise ConfigError(f"mesh.{free[0]} = -1: the {n_devices} device(s) of this run do not "
                              f"split into {spelled}: {known} does not divide {n_devices}")
        sizes[free[0]] = n_devices // known
        if free[0] == "expert" and n_routed_experts and n_routed_experts % sizes["expert"]:
            raise _bad("mesh.expert", me.expert, f"gives {sizes['expert']} expert shards on "
                                                 f"{n_devices} devices, which does not divide "
                                                 f"the model's n_routed_experts ({n_routed_experts})")
    elif known != n_devices:
        raise ConfigError(f"mesh: {spelled} = {known} devices, but this run has {n_devices} "
                          f"(set one of them to -1 to take the devices left over)")
    return sizes


def check_data_axis(cfg: TrainConfig, data_axis: int) -> None:
    """The checks that need the device count: run once the mesh is known, before compiling.
    ``data_axis`` is the number of devices the batch is split over (the mesh's size)."""
    b = cfg.batch
    if b.global_batch % (b.micro_batch * data_axis):
        raise _bad("batch.global_batch", b.global_batch,
                   f"not divisible by batch.micro_batch × devices "
                   f"({b.micro_batch} × {data_axis} = {b.micro_batch * data_axis})")


# ---------------------------------------------------------------------------
# loading


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (values parsed as YAML) applied to a raw config dict."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: expected section.key=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{item}: expected section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:i + 1])}: is not a section, cannot set {path}")
            node[k] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return raw


def from_dict(raw: dict) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, found {type(raw).__name__}")
    cfg = _build(TrainConfig, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from nothing when ``path`` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return from_dict(apply_overrides(raw, list(overrides)))
