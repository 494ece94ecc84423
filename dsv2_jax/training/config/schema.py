"""The training config's schema: one frozen dataclass per YAML section, with defaults that
follow DeepSeek-V2-Lite's recipe (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ...errors import ConfigError

PRESETS = ("deepseek-v2-lite", "deepseek-v2")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DATA_FORMATS = ("auto", "text", "jsonl")
MAX_STEPS = 10_000_000  # the LR schedule tabulates tokens per step


def bad_value(key: str, value: Any, why: str) -> ConfigError:
    """The error for one key: ``key = value: why``."""
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
    # Attention stays inside each packed document, and the expert-balance loss (seq_aux) takes
    # each document as one sequence; false: one sequence per packed row.
    document_mask: bool = True
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
class LoraSection:
    """LoRA / QLoRA (``dsv2_jax.lora``): train adapters only. The ``model.init_from`` base is
    loaded frozen in ``precision.compute_dtype`` (or kept packed when it is an AWQ checkpoint:
    QLoRA); the adapters are float32 and alone get gradients and AdamW state. ``init_from``
    starts from an existing PEFT adapter folder (its r, alpha, use_rslora, targets, layers,
    routed_experts and dense_mlps must match these; dropout is this run's)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "kv_b_proj", "o_proj")
    layers: tuple[int, ...] | None = None  # null: every layer
    routed_experts: bool = False  # the MLP targets also adapt each routed expert
    dense_mlps: bool = True  # the MLP targets adapt the dense MLP and shared experts
    init_from: str | None = None


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
    lora: LoraSection | None = None  # absent: full fine-tuning / pre-training

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
