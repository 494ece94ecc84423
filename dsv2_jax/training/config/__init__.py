"""The training config: YAML validated into frozen dataclasses, one section per concern.

Every error names the key as written in the YAML (``batch.global_batch = 6: ...``) and is raised
before any model is built or compiled. ``python -m train.run`` turns it into one line and exit 2.

Example::

    from dsv2_jax.training.config import load_config
    cfg = load_config("configs/tiny-cpu.yaml", ["schedule.total_steps=50", "data.seq_len=64"])
    cfg.schedule.total_steps, cfg.batch.accum_steps(data_axis=1)

Modules: ``schema`` (the sections and their defaults), ``parse`` (YAML, overrides, paths),
``validate`` (checks across keys).
"""

from ...errors import ConfigError
from .parse import apply_overrides, from_dict, load_config, resolve_paths
from .schema import (  # noqa: I001
    DATA_FORMATS,
    DTYPES,
    PRESETS,
    REMAT_POLICIES,
    BatchSection,
    CheckpointSection,
    DataSection,
    DebugSection,
    EvalSection,
    LoggingSection,
    LoraSection,
    MeshSection,
    ModelSection,
    OptimizerSection,
    PrecisionSection,
    RematSection,
    ScheduleSection,
    TrainConfig,
    bad_value,
)
from .validate import check_data_axis, lora_config, mesh_sizes, validate

__all__ = [
    "DATA_FORMATS", "DTYPES", "PRESETS", "REMAT_POLICIES", "BatchSection", "CheckpointSection",
    "ConfigError", "DataSection", "DebugSection", "EvalSection", "LoggingSection", "LoraSection", "MeshSection",
    "ModelSection", "OptimizerSection", "PrecisionSection", "RematSection", "ScheduleSection",
    "TrainConfig", "apply_overrides", "bad_value", "check_data_axis", "from_dict", "load_config",
    "lora_config", "mesh_sizes", "resolve_paths", "validate",
]
