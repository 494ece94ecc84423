"""Train or fine-tune DeepSeek-V2(-Lite): ``python -m train.run --config configs/NAME.yaml``.

    python -m train.run --config configs/tiny-cpu.yaml
    python -m train.run --config configs/tiny-cpu.yaml schedule.total_steps=50 run_dir=runs/t2
    python -m train.run --config configs/tiny-cpu.yaml --resume
    python -m train.run --config configs/tiny-cpu.yaml mesh.data=2 mesh.expert=2   # 4 devices

``section.key=value`` arguments override the YAML (values are read as YAML). The ``mesh``
section lays the run over the devices (``dsv2_jax.sharding``): ``data`` (replicated
parameters), ``fsdp`` (parameters and optimizer state split along the hidden size) and
``expert`` (routed experts split over devices); batches are split over all three. A multi-process
run starts the same command in every process with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (or DSV2_COORDINATOR / DSV2_NUM_PROCESSES / DSV2_PROCESS_ID); every process
reads the same data, process 0 alone writes the run directory's files, metrics and messages,
and the Orbax checkpoints are written by all of them together (each its own shards). A run directory
holds config.yaml, model_config.json, tokenizer/, checkpoints/, metrics.jsonl and tb/; when it
already has checkpoints the run resumes from the latest one (``--resume`` insists on it).
Exit status: 0 done, 2 bad config / data (one line on stderr, before anything is compiled),
3 the loss became NaN or Inf (the last good checkpoint is kept), 4 a checkpoint could not be
saved (disk full, ...; the previous ones are intact), 130 / 143 stopped by Ctrl-C / SIGTERM.

Interrupts: Ctrl-C or SIGTERM (how cluster jobs are preempted) during the step loop lets the
current step finish, saves a checkpoint of it, waits for every save in flight and exits
(130 / 143); running the same command again resumes there. A second signal stops at once
(checkpoints already committed stay intact; the one being written may not complete). Before the
loop starts (loading, compiling) they stop at once: nothing has been trained yet.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dsv2_jax.training.config import (
    ConfigError,
    TrainConfig,
    check_data_axis,
    from_dict,
    load_config,
    mesh_sizes,
)

RESUME_MUST_MATCH = ("model", "data", "batch", "seed", "precision", "lora")


class Diverged(RuntimeError):
    """The loss (or gradient norm) became NaN or Inf."""


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _Signals:
    """SIGINT / SIGTERM. During the step loop the first one asks to stop after the current
    step (which saves a checkpoint); while the last saves finish it is noted and waited out.
    Any other time, or the second time, the process exits at once with 128 + the signal: an
    exception raised inside XLA's native code could crash the interpreter, and Orbax commits
    a checkpoint by renaming it, so the checkpoints already complete stay intact."""

    def __init__(self):
        self.received: int | None = None
        self.phase = "setup"  # setup | loop | finishing
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None and self.phase != "setup":
            self.received = signum
            what = ("finishing this step, then saving a checkpoint" if self.phase == "loop"
                    else "waiting for the checkpoint saves in flight")
            print(f"{name}: {what} (again to stop at once)", file=sys.stderr, flush=True)
            return
        extra = "" if self.phase == "setup" else "; a checkpoint being written may be incomplete"
        print(f"{name}: stopped at once (checkpoints already complete are intact{extra})",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def stop_requested(self, multi_process: bool) -> bool:
        """Whether to stop now; every process of a multi-process run gets the same answer
        (a signal reaches the processes at different steps, the checkpoint needs them all)."""
        mine = self.received is not None
        if not multi_process:
            return mine
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.int32(mine)).any())


@dataclasses.dataclass
class Training:
    """Everything a loop or a benchmark needs to run steps."""

    model_cfg: Any
    mesh: Any
    graphdef: Any
    rest: Any
    schedule: Any
    tx: Any
    state: Any  # TrainState on the mesh
    step_fn: Any  # jitted (state, batch) -> (state, metrics); donates state
    eval_fn: Any
    accum: int

    def micro_batched(self, batch: dict) -> dict:
        """[G, T] host arrays -> [A, G/A, T]."""
        return {k: v.reshape(self.accum, -1, *v.shape[1:]) for k, v in batch.items()}


def _place(tree, shardings):
    """Put every leaf at its sharding; leaves already there (a model built or loaded straight
    into its shardings, possibly spanning processes) are kept as they are."""
    import jax

    from dsv2_jax import sharding

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        return sharding.put(x, s)

    return jax.tree.map(one, tree, shardings)


def make_training(cfg: TrainConfig, model, mesh) -> Training:
    """Split the model, build optimizer, state (placed on the mesh) and the jitted steps.

    ``model`` must have been built for ``mesh`` (``build.build_model(..., mesh=mesh)``, so its
    MoE layers split the experts over the mesh's ``expert`` axis); it may be plain (host or
    one device) or already sharded. Its parameters and the AdamW moments are laid out by
    ``dsv2_jax.sharding.tree_shardings`` with ``TRAIN_RULES``. The
    model's parameter arrays move into ``Training.state`` (donated): do not use it afterwards.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsv2_jax import sharding
    from dsv2_jax.training import lr_schedule, make_optimizer
    from dsv2_jax.training.step import init_state, make_eval_step, make_train_step

    s, o = cfg.schedule, cfg.optimizer
    schedule = lr_schedule(s.peak_lr, s.warmup_steps, cfg.total_steps,
                           decay_points=s.decay_points, decay_factor=s.decay_factor)
    tx = make_optimizer(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                        clip_norm=o.clip_norm, eps=o.eps)
    from dsv2_jax.lora import LoRAParam

    # A lora: run trains the adapters alone; the base (nnx.Param, or AWQ-packed) stays in rest.
    trainable = nnx.Param if cfg.lora is None else LoRAParam
    graphdef, params, rest = nnx.split(model, trainable, ...)
    # TRAIN_RULES: float32 weights and AdamW moments split over every device, not only the
    # routed experts (docs/architecture.md#sharding-and-expert-parallelism)
    rules = sharding.TRAIN_RULES
    param_sh = sharding.tree_shardings(params, mesh, rules)
    params = _place(params, param_sh)
    rest = _place(rest, sharding.tree_shardings(rest, mesh, rules))

    def init(p):
        return init_state(p, tx, cfg.seed)

    state_sh = sharding.tree_shardings(jax.eval_shape(init, params), mesh, rules)
    # donated: the parameters move into the state instead of being copied (``model``'s arrays
    # are consumed; callers drop the model)
    state = jax.jit(init, out_shardings=state_sh, donate_argnums=0)(params)
    del params
    step = make_train_step(graphdef, rest, tx, schedule, model.config, remat=cfg.remat.policy,
                           document_mask=cfg.data.document_mask, nan_at_step=cfg.debug.nan_at_step,
                           param_shardings=param_sh)
    evaluate = make_eval_step(graphdef, rest, document_mask=cfg.data.document_mask)
    accum = cfg.batch.accum_steps(mesh.size)
    replicated = NamedSharding(mesh, P())  # metrics: readable by every process
    step_fn = jax.jit(step, donate_argnums=0, out_shardings=(state_sh, replicated))
    eval_fn = jax.jit(evaluate, out_shardings=replicated)
    return Training(model.config, mesh, graphdef, rest, schedule, tx, state, step_fn, eval_fn,
                    accum)


# ---------------------------------------------------------------------------


def _diff(a: Any, b: Any, prefix: str) -> str | None:
    """The first key where two plain config trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{prefix} = {b!r} (the run being resumed has {a!r})"


def _check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text())
    try:  # keys added since the run was saved take their defaults (as the run had them)
        saved = from_dict(saved).to_dict()
    except ConfigError:
        pass  # compared as written; the differences are named below
    now = cfg.to_dict()
    for section in RESUME_MUST_MATCH:
        d = _diff(saved.get(section), now.get(section), section)
        if d:
            raise ConfigError(f"{d}: cannot resume {run_dir} with a different {section} "
                              f"section; use a new run_dir")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a process reading ``path`` at the same time
    (a resumed multi-process run checks config.yaml) sees the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _balance_unit(cfg: TrainConfig, model_cfg) -> str:
    """Over what the expert-balance loss averages, as this run computes it."""
    if not model_cfg.aux_loss_alpha:
        return "off (aux_loss_alpha = 0)"
    if not model_cfg.seq_aux:
        return "per batch (seq_aux false)"
    return "per document" if cfg.data.document_mask else "per packed row"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _is_finite(*xs) -> bool:
    return all(math.isfinite(float(x)) for x in xs)


class _Quiet:
    """The MetricsLogger of processes other than 0: writes nothing."""

    def write(self, record) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns a small summary dict.

    Raises ConfigError / DataError / CheckpointError for bad input (before compiling),
    Diverged, Interrupted (a signal; a checkpoint of the last step was saved) or
    CheckpointSaveError."""
    with _Signals() as signals:
        return _train(cfg, resume, signals)


def _train(cfg: TrainConfig, resume: bool, signals: _Signals) -> dict[str, Any]:
    import jax
    import numpy as np

    from dsv2_jax import sharding
    from dsv2_jax.sharding import put_batch
    from dsv2_jax.training import build
    from dsv2_jax.training.data import Batches, heldout_batches, load_corpus
    from dsv2_jax.training.flops import param_counts
    from dsv2_jax.training.metrics import MetricsLogger, truncate_after
    from dsv2_jax.training.run_checkpoint import RunCheckpoints

    lead = jax.process_index() == 0  # the process that writes files and messages

    def say(msg: str) -> None:
        if lead:
            print(msg, file=sys.stderr)

    if cfg.precision.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", cfg.precision.matmul_precision)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: no checkpoints in {ckpt_dir}")

    # ---- everything that can be wrong with the config or the data, before compiling ----
    model_cfg, init_folder = build.model_config(cfg)  # unknown override keys first
    if has_ckpt:
        _check_resumable(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sizes = mesh_sizes(cfg, jax.device_count(), model_cfg.n_routed_experts)
    tok = build.prepare_tokenizer(cfg, init_folder, run_dir, write=lead)
    model_cfg = build.check_model_against_data(cfg, model_cfg, tok, fresh=init_folder is None)
    d = cfg.data
    corpus = load_corpus(d.train, tok, fmt=d.format, heldout_fraction=d.heldout_fraction,
                         text_key=d.text_key, messages_key=d.messages_key,
                         vocab_size=model_cfg.vocab_size)
    batches = Batches(corpus.train, d.seq_len, cfg.batch.global_batch, cfg.seed, d.shuffle,
                      name="data.train")
    try:
        mesh = sharding.make_mesh(**sizes)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    check_data_axis(cfg, mesh.size)
    eval_batches = []
    if cfg.eval.every:
        eval_batches = heldout_batches(corpus.heldout, d.seq_len, cfg.batch.micro_batch * mesh.size,
                                       cfg.eval.batches)
        if not eval_batches:
            raise ConfigError(f"data.heldout_fraction = {d.heldout_fraction}: the held-out text "
                              f"({len(corpus.heldout)} tokens) is shorter than one eval batch")
    if lead:
        _write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _write_atomic(run_dir / build.RUN_MODEL_CONFIG, json.dumps(model_cfg.to_dict(), indent=1))

    # ---- build, restore, compile ----
    total = cfg.total_steps
    # A resumed run's weights come from its checkpoint; a lora: run's frozen base from init_from.
    init = None if has_ckpt and cfg.lora is None else init_folder
    model = build.build_model(cfg, model_cfg, init, mesh=mesh)
    t = make_training(cfg, model, mesh)
    if cfg.lora is not None:
        from dsv2_jax.lora import adapters

        n = sum(x.size for x in jax.tree.leaves(t.state.params))
        mods = adapters(model)
        stacks = sum("experts.*" in k for k in mods)
        experts = f" ({stacks} of them one per routed expert)" if stacks else ""
        say(f"lora: {len(mods)} adapters{experts} (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, "
            f"dropout {cfg.lora.dropout}), {n:,} trainable parameters; the base is frozen")
    del model
    ckpts = RunCheckpoints(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    state = t.state
    start = 0
    if has_ckpt:
        start, state, data_state, skipped = ckpts.restore_latest(state)
        for step, why, moved in skipped:
            say(f"checkpoint {step} is unreadable ({why}); moved it to {moved}")
        batches.restore(data_state)
        say(f"resumed from {ckpt_dir / str(start)} (step {start} of {total})")
    if lead:
        truncate_after(run_dir, start)
    counts = param_counts(model_cfg)
    tokens_per_step = cfg.tokens_per_step
    layout = ", ".join(f"{k} {v}" for k, v in mesh.shape.items() if v > 1) or "one device"
    procs = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active "
        f"per token; {_plural(corpus.n_documents, 'document')}, {len(corpus.train)} training tokens; "
        f"{tokens_per_step} tokens/step = {t.accum} x {cfg.batch.micro_batch} x {mesh.size} "
        f"device(s) x {d.seq_len}; mesh: {layout}{procs}; {total} steps; balance loss "
        f"{_balance_unit(cfg, model_cfg)}")

    if start >= total:
        say(f"{run_dir}: already trained to step {start}; nothing to do")
        ckpts.close()
        return {"start_step": start, "last_step": start}

    def next_batch():
        host = batches.next()
        return put_batch(t.micro_batched(host), mesh), batches.state()

    batch, data_state = next_batch()
    t0 = time.perf_counter()
    step_fn = t.step_fn.lower(state, batch).compile()
    say(f"compiled the train step in {time.perf_counter() - t0:.1f}s")

    log = (MetricsLogger(run_dir, total_steps=total, start_step=start,
                         tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
           if lead else _Quiet())
    moe_layers = [i for i in range(model_cfg.num_hidden_layers) if model_cfg.is_moe_layer(i)]
    last_saved = ckpts.latest_step()
    window_t, window_n = 0.0, 0
    first_loss = last_loss = None
    try:
        for s in range(start + 1, total + 1):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            if s < total:  # prepare the next batch while the device works
                nxt = next_batch()
            m = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            if not _is_finite(m["loss"], m["grad_norm"]):
                where = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}"
                         if last_saved is not None else "no checkpoint was saved before it")
                raise Diverged(f"step {s}: loss is {float(m['loss'])} (grad norm "
                               f"{float(m['grad_norm'])}); training stopped, {where}")
            window_t += dt
            window_n += 1
            loss = float(m["loss"])
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            log.advance()
            if s % cfg.logging.every == 0 or s == total or s == start + 1:
                load = np.asarray(m["expert_load"])
                log.write({
                    "step": s, "loss": loss, "ce": float(m["ce"]),
                    "balance_loss": float(m["balance_loss"]), "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens_per_s": tokens_per_step * window_n / window_t,
                    "step_time_s": window_t / window_n, "target_tokens": int(m["tokens"]),
                    "expert_load_max": {str(i): float(x) for i, x in zip(moe_layers, load.max(-1))},
                    "expert_load_min": {str(i): float(x) for i, x in zip(moe_layers, load.min(-1))},
                })
                window_t, window_n = 0.0, 0
            if cfg.eval.every and (s % cfg.eval.every == 0 or s == total):
                ce_sum = n = 0.0
                for eb in eval_batches:
                    c, k = t.eval_fn(state.params, put_batch(eb, mesh))
                    ce_sum, n = ce_sum + float(c), n + float(k)
                log.write({"step": s, "eval_loss": ce_sum / max(n, 1.0), "eval_tokens": int(n)})
            signals.phase = "loop"  # from the first finished step on, a signal means "save, stop"
            stop = signals.stop_requested(jax.process_count() > 1)
            if s % cfg.checkpoint.every == 0 or s == total or stop:
                ckpts.save(state, data_state)
                last_saved = s
            if stop:
                ckpts.wait()
                name = signal.Signals(signals.received or signal.SIGTERM).name
                raise Interrupted(signals.received or signal.SIGTERM,
                                  f"{name}: stopped after step {s} of {total}; saved checkpoint "
                                  f"{ckpt_dir / str(s)}; run the same command to resume")
            if s < total:
                batch, data_state = nxt
            if cfg.debug.step_sleep_s:
                time.sleep(cfg.debug.step_sleep_s)
    finally:
        signals.phase = "finishing"
        log.close()
        try:
            ckpts.wait()  # saves in flight finish, also after an error or a second Ctrl-C
        finally:
            with contextlib.suppress(Exception):  # a failed save was raised above already
                ckpts.close()
    return {"start_step": start, "last_step": total, "first_loss": first_loss,
            "last_loss": last_loss}


# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override a config value, e.g. schedule.total_steps=100")
    p.add_argument("--resume", action="store_true",
                   help="resume from the run directory's latest checkpoint (an error if none)")
    from dsv2_jax.distributed import add_arguments

    add_arguments(p)
    return p.parse_args(argv)


def join_processes(coordinator=None, num_processes=None, process_id=None) -> None:
    """``dsv2_jax.distributed.initialize`` when a coordinator is given (flag or
    DSV2_COORDINATOR); a single-process run otherwise. Must run before JAX touches a device."""
    from dsv2_jax.distributed import join

    try:
        join(coordinator, num_processes, process_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    from dsv2_jax.errors import CheckpointError, CheckpointSaveError, DataError

    try:
        cfg = load_config(args.config, args.overrides)
        join_processes(args.coordinator, args.num_processes, args.process_id)
        summary = train(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (CheckpointSaveError, OSError) as e:  # a file of the run could not be written
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum

    import jax

    if summary.get("first_loss") is not None and jax.process_index() == 0:
        print(f"done: steps {summary['start_step'] + 1}..{summary['last_step']}, loss "
              f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; run directory "
              f"{cfg.run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
