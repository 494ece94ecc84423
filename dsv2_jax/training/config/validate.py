"""Checks that need several keys of a :class:`TrainConfig` (or the device count)."""

from __future__ import annotations

import math

from ...errors import ConfigError
from ..schedule import decay_steps
from .schema import (
    DATA_FORMATS,
    DTYPES,
    MAX_STEPS,
    PRESETS,
    REMAT_POLICIES,
    TrainConfig,
    bad_value,
)


def validate(cfg: TrainConfig) -> None:
    m = cfg.model
    given = [k for k in ("preset", "config_json", "init_from") if getattr(m, k) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"model: give exactly one of model.preset, model.config_json, model.init_from "
            f"(found {', '.join('model.' + g for g in given) or 'none'})")
    if m.preset is not None and m.preset not in PRESETS:
        raise bad_value("model.preset", m.preset, f"expected one of {', '.join(PRESETS)}")
    if m.init_from is not None:
        extra = sorted(set(m.overrides) - {"aux_loss_alpha", "seq_aux"})
        if extra:
            raise bad_value(f"model.overrides.{extra[0]}", m.overrides[extra[0]],
                       "cannot change the architecture of an init_from checkpoint "
                       "(only aux_loss_alpha and seq_aux may be overridden)")

    if cfg.lora is not None:
        if m.init_from is None:
            raise ConfigError("lora: needs model.init_from, the base model the adapters train on")
        lora_config(cfg)  # every lora.* value checked, errors naming the key

    d = cfg.data
    if not d.train:
        raise ConfigError("data.train: required (a list of .txt / .jsonl paths or globs)")
    if d.format not in DATA_FORMATS:
        raise bad_value("data.format", d.format, f"expected one of {', '.join(DATA_FORMATS)}")
    if d.seq_len < 2:
        raise bad_value("data.seq_len", d.seq_len, "expected an integer >= 2")
    if not 0.0 <= d.heldout_fraction < 1.0:
        raise bad_value("data.heldout_fraction", d.heldout_fraction, "expected a fraction in [0, 1)")

    o = cfg.optimizer
    for k in ("b1", "b2"):
        if not 0.0 <= getattr(o, k) < 1.0:
            raise bad_value(f"optimizer.{k}", getattr(o, k), "expected a number in [0, 1)")
    if o.eps <= 0:
        raise bad_value("optimizer.eps", o.eps, "expected a positive number")
    if o.weight_decay < 0:
        raise bad_value("optimizer.weight_decay", o.weight_decay, "expected a number >= 0")
    if o.clip_norm is not None and o.clip_norm <= 0:
        raise bad_value("optimizer.clip_norm", o.clip_norm, "expected a positive number or null")

    b = cfg.batch
    if b.global_batch < 1:
        raise bad_value("batch.global_batch", b.global_batch, "expected a positive integer")
    if b.micro_batch < 1:
        raise bad_value("batch.micro_batch", b.micro_batch, "expected a positive integer")
    if b.global_batch % b.micro_batch:
        raise bad_value("batch.global_batch", b.global_batch,
                   f"not divisible by batch.micro_batch ({b.micro_batch})")

    s = cfg.schedule
    if (s.total_steps is None) == (s.total_tokens is None):
        raise ConfigError("schedule: give exactly one of schedule.total_steps and schedule.total_tokens")
    if s.total_steps is not None and s.total_steps < 1:
        raise bad_value("schedule.total_steps", s.total_steps, "expected a positive integer")
    if s.total_tokens is not None and s.total_tokens < 1:
        raise bad_value("schedule.total_tokens", s.total_tokens, "expected a positive integer")
    if not (s.peak_lr > 0 and math.isfinite(s.peak_lr)):
        raise bad_value("schedule.peak_lr", s.peak_lr, "expected a positive number")
    if s.warmup_steps < 0:
        raise bad_value("schedule.warmup_steps", s.warmup_steps, "expected an integer >= 0")
    total = cfg.total_steps
    if total > MAX_STEPS:
        key = "schedule.total_steps" if s.total_steps is not None else "schedule.total_tokens"
        raise bad_value(key, getattr(cfg.schedule, key.split(".")[1]),
                   f"gives {total:,} steps of {cfg.tokens_per_step:,} tokens, more than "
                   f"{MAX_STEPS:,}; check batch.global_batch and data.seq_len")
    if s.warmup_steps > total:
        raise bad_value("schedule.warmup_steps", s.warmup_steps,
                   f"longer than the run ({total} steps)")
    if not 0.0 < s.decay_factor <= 1.0:
        raise bad_value("schedule.decay_factor", s.decay_factor, "expected a number in (0, 1]")
    if any(not 0.0 < p < 1.0 for p in s.decay_points) or list(s.decay_points) != sorted(set(s.decay_points)):
        raise bad_value("schedule.decay_points", list(s.decay_points),
                   "expected strictly increasing fractions in (0, 1)")
    bounds = decay_steps(total, None, s.decay_points) if s.decay_points else ()
    if bounds and s.warmup_steps > bounds[0]:
        raise bad_value("schedule.warmup_steps", s.warmup_steps,
                   f"ends after the first decay at step {bounds[0]} "
                   f"({s.decay_points[0]} of the run's {total} steps)")

    p = cfg.precision
    for k in ("param_dtype", "compute_dtype"):
        if getattr(p, k) not in DTYPES:
            raise bad_value(f"precision.{k}", getattr(p, k), f"expected one of {', '.join(DTYPES)}")
    if p.matmul_precision not in ("default", "high", "highest"):
        raise bad_value("precision.matmul_precision", p.matmul_precision,
                   "expected default, high or highest")
    if cfg.remat.policy not in REMAT_POLICIES:
        raise bad_value("remat.policy", cfg.remat.policy, f"expected one of {', '.join(REMAT_POLICIES)}")

    me = cfg.mesh
    for k, v in me.sizes().items():
        if v == 0 or v < -1:
            raise bad_value(f"mesh.{k}", v, "expected a positive integer or -1 (the devices left over)")
    free = [k for k, v in me.sizes().items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one of mesh.data, mesh.fsdp, mesh.expert may be -1 "
                          f"(found {', '.join('mesh.' + k for k in free)})")

    c = cfg.checkpoint
    if c.every < 1:
        raise bad_value("checkpoint.every", c.every, "expected a positive integer")
    if c.keep < 1:
        raise bad_value("checkpoint.keep", c.keep, "expected a positive integer")
    if cfg.eval.every < 0:
        raise bad_value("eval.every", cfg.eval.every, "expected an integer >= 0 (0 = never)")
    if cfg.eval.batches < 1:
        raise bad_value("eval.batches", cfg.eval.batches, "expected a positive integer")
    if cfg.eval.every and d.heldout_fraction == 0:
        raise bad_value("eval.every", cfg.eval.every, "evaluation needs data.heldout_fraction > 0")
    if cfg.logging.every < 1:
        raise bad_value("logging.every", cfg.logging.every, "expected a positive integer")
    if cfg.debug.step_sleep_s < 0:
        raise bad_value("debug.step_sleep_s", cfg.debug.step_sleep_s, "expected a number >= 0")
    n = cfg.debug.nan_at_step
    if n is not None and not 1 <= n <= total:
        raise bad_value("debug.nan_at_step", n, f"expected a step in 1..{total}")


def mesh_sizes(cfg: TrainConfig, n_devices: int, n_routed_experts: int | None = None) -> dict[str, int]:
    """``mesh.data / fsdp / expert`` with the -1 resolved for ``n_devices`` devices, checked
    against the device count and the model's ``n_routed_experts``; errors name the key."""
    me = cfg.mesh
    sizes = me.sizes()
    if n_routed_experts and me.expert != -1 and n_routed_experts % me.expert:
        raise bad_value("mesh.expert", me.expert, f"does not divide the model's n_routed_experts "
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
            raise bad_value("mesh.expert", me.expert, f"gives {sizes['expert']} expert shards on "
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
        raise bad_value("batch.global_batch", b.global_batch,
                   f"not divisible by batch.micro_batch × devices "
                   f"({b.micro_batch} × {data_axis} = {b.micro_batch * data_axis})")


def lora_config(cfg: TrainConfig):
    """The ``dsv2_jax.lora.LoRAConfig`` of the ``lora:`` section."""
    from ...lora import LoRAConfig

    section = cfg.lora
    return LoRAConfig(rank=section.rank, alpha=section.alpha, dropout=section.dropout,
                      use_rslora=section.use_rslora, target_modules=section.target_modules,
                      layers=section.layers, routed_experts=section.routed_experts,
                      dense_mlps=section.dense_mlps)
