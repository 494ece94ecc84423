"""AWQ layer by layer: calibration activations, each layer's scale groups, search, fold, clip.

:func:`awq_layer` takes one decoder layer's float32 hub tensors and the activations entering
it, and returns the tensors to quantize (scales folded in, weights clipped) and the layer's
output with its weights quantized, which is the next layer's input. Only one layer's weights
and the calibration activations are held at a time (docs/awq.md#the-awq-quantizer).

Scale groups of a DeepSeek-V2 decoder layer (AutoAWQ's ``awq/models/deepseek_v2.py``), each a
set of linears that read one input, the op that produces that input (the scale is folded into
it), and the output the candidates are judged on:

======================================  ===========================================  =================
folded into                             scaled linears                               judged on
======================================  ===========================================  =================
``input_layernorm``                     ``q_proj`` (or ``q_a_proj``), ``kv_a_proj``  attention output
``q_a_layernorm`` (with a q LoRA)       ``q_b_proj``                                 its output
``kv_a_layernorm``                      ``kv_b_proj``                                its output
``post_attention_layernorm``            gate and up of every expert + shared (or     MLP / MoE output
                                        the dense MLP); the router compensated
``up_proj`` of each expert / shared     that ``down_proj``                           its output
======================================  ===========================================  =================

The router stays unquantized and must see what it saw before: its weight's input columns are
multiplied by the same scale the norm's weight is divided by. As in AutoAWQ, every group's
search runs on the float layer, then all scales are folded; clipping runs on the scaled
weights and inputs; ``q``/``k`` projections (names holding ``q_`` or ``k_``) are not clipped.

Unlike AutoAWQ, which passes the *float* model's activations from layer to layer, the input
of layer L is the output of layers 0 … L-1 *after* quantization, so each layer's search sees
the inputs the quantized model will give it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import DeepseekV2Config
from ..errors import DataError
from ..hub_format import hub_name
from ..model import DecoderLayer, causal_mask
from ..rope import cos_sin
from . import search

F32 = jnp.float32
CHUNK_TOKENS = 4096  # calibration tokens per forward call (bounds the [B, nh, T, T] scores)
AVOID_CLIPPING = ("q_", "k_", "query", "key", "Wqkv")  # AutoAWQ: q·k products amplify clipping


# --------------------------------------------------------------------------- calibration data


def calibration_ids(files: Sequence, tokenizer, n_samples: int = 128, seq_len: int = 512, *,
                    heldout_fraction: float = 0.0, vocab_size: int | None = None) -> np.ndarray:
    """``[n, seq_len]`` int32 token windows spread evenly over the tokenized ``files``.

    Text files (``.txt``, ``.gz``) are one document each; JSONL files one per line (``"text"``
    or chat ``"messages"``), as for training. Documents are concatenated and cut into windows
    of ``seq_len`` (AutoAWQ's ``--calib-seq-len``); up to ``n_samples`` of them are taken, evenly
    spaced. ``heldout_fraction`` leaves out the stream's tail (the demo's held-out text).
    """
    from ..training.data import load_corpus

    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"calibration: samples = {n_samples} and seq_len = {seq_len} must be >= 1")
    corpus = load_corpus([str(f) for f in files], tokenizer, heldout_fraction=heldout_fraction,
                         vocab_size=vocab_size)
    ids = corpus.train.ids
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{names}: {len(ids)} calibration tokens; one sample needs "
                        f"--calib-seq-len = {seq_len} (pass more text or a shorter --calib-seq-len)")
    n = min(n_samples, n_windows)
    starts = (np.arange(n) * n_windows // n) * seq_len
    return np.stack([ids[s: s + seq_len] for s in starts]).astype(np.int32)


# --------------------------------------------------------------------------- scale groups


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears scaled together (hub names relative to the layer, ``"self_attn.kv_b_proj"``)."""

    prev: str  # the norm (weight / s) or up_proj (output rows / s) the scale folds into
    linears: tuple[str, ...]  # quantized; input columns * s
    judged_on: str  # "attention", "mlp", or "linear" (the one linear's own output)
    inputs: str  # the captured activation the linears read (see _capture)
    compensate: tuple[str, ...] = ()  # unquantized readers of the same input (the router)


def mlp_names(cfg: DeepseekV2Config, layer: int) -> list[str]:
    """The SwiGLU MLPs of a layer: each routed expert and the shared experts, or the dense MLP."""
    if not cfg.is_moe_layer(layer):
        return ["mlp"]
    return ([f"mlp.experts.{e}" for e in range(cfg.n_routed_experts)]
            + (["mlp.shared_experts"] if cfg.n_shared_experts else []))


def scale_groups(cfg: DeepseekV2Config, layer: int) -> list[ScaleGroup]:
    """The scale groups of decoder layer ``layer``, in AutoAWQ's order."""
    q = ("self_attn.q_proj",) if cfg.q_lora_rank is None else ("self_attn.q_a_proj",)
    groups = [ScaleGroup("input_layernorm", q + ("self_attn.kv_a_proj_with_mqa",), "attention", "h1")]
    if cfg.q_lora_rank is not None:
        groups.append(ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "linear", "qa"))
    groups.append(ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "linear", "c_kv"))
    if cfg.is_moe_layer(layer):
        mlps = mlp_names(cfg, layer)
        ins = tuple(f"{m}.{p}" for m in mlps for p in ("gate_proj", "up_proj"))
        groups.append(ScaleGroup("post_attention_layernorm", ins, "mlp", "h2", ("mlp.gate",)))
        groups += [ScaleGroup(f"{m}.up_proj", (f"{m}.down_proj",), "linear", f"{m}.down_proj")
                   for m in mlps]
    else:
        groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "h2"))
        groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear", "mlp.down_proj"))
    return groups


def skipped(name: str, skip: Sequence[str]) -> bool:
    """AutoAWQ's ``modules_to_not_convert``: a linear stays dense when an entry is a substring
    of its name."""
    return any(s and s in name for s in skip)


def quantized_linears(cfg: DeepseekV2Config, layer: int, skip: Sequence[str] = ()) -> list[str]:
    """Every linear of the layer that is quantized (relative hub names, without ``.weight``)."""
    out = []
    for g in scale_groups(cfg, layer):
        out += [n for n in g.linears if n not in out]
    return [n for n in out + ["self_attn.o_proj"] if not skipped(f"model.layers.{layer}.{n}", skip)]


def without(group: ScaleGroup, layer: int, skip: Sequence[str]) -> ScaleGroup | None:
    """The group with its skipped (unquantized) linears moved to the compensated readers;
    None when none is left to quantize."""
    kept = tuple(n for n in group.linears if not skipped(f"model.layers.{layer}.{n}", skip))
    if not kept:
        return None
    dropped = tuple(n for n in group.linears if n not in kept)
    return dataclasses.replace(group, linears=kept, compensate=group.compensate + dropped)


def fold_scale(tensors: dict, layer: int, group: ScaleGroup, scales: np.ndarray) -> None:
    """Fold ``scales`` into the hub tensors of ``layer`` (float32, ``[out, in]``), in place: the
    producing op divides its output by ``s``, every reader multiplies its input columns by it.
    The float model's outputs do not change (up to rounding)."""
    p = f"model.layers.{layer}."
    s = np.asarray(scales, np.float32)
    prev = tensors[p + group.prev + ".weight"]
    tensors[p + group.prev + ".weight"] = prev / (s if prev.ndim == 1 else s[:, None])
    for name in group.linears + group.compensate:
        tensors[p + name + ".weight"] = tensors[p + name + ".weight"] * s[None, :]


# --------------------------------------------------------------------------- the layer module


def _module_path(name: str) -> tuple[str, ...]:
    """Relative hub name -> attribute path in DecoderLayer (experts are one stacked module)."""
    parts = name.split(".")
    if len(parts) == 4 and parts[1] == "experts":  # mlp.experts.E.gate_proj
        return (parts[0], f"experts_{parts[3]}")
    return tuple(parts)


def layer_state(cfg: DeepseekV2Config, layer: int, tensors: dict):
    """A float32 ``DecoderLayer`` (graphdef, state) holding the hub ``tensors`` of ``layer``."""
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: DecoderLayer(cfg, layer, rngs=nnx.Rngs(0), param_dtype=F32, dtype=F32)))
    for path, var in nnx.to_flat_state(state):
        name, transpose = hub_name(("layers", layer, *path))
        if "{e}" in name:
            arrays = [tensors[name.format(e=e)] for e in range(cfg.n_routed_experts)]
            value = np.stack([a.T if transpose else a for a in arrays])
        else:
            value = tensors[name].T if transpose else tensors[name]
        var.set_value(jnp.asarray(value, F32))
    return graphdef, state


@functools.partial(jax.jit, static_argnums=0)
def _capture(graphdef, state, x, cos, sin, mask):
    """Every activation a scale or clip search reads, for a chunk of calibration samples."""
    layer = nnx.merge(graphdef, state)
    attn_mod = layer.self_attn
    h1 = layer.input_layernorm(x)
    heads, _ = attn_mod.heads(h1, cos, sin, mask)
    attn = attn_mod.o_proj(heads)
    out = {"h1": h1, "heads": heads, "attention": attn, "c_kv": attn_mod.latent(h1, cos, sin)[0]}
    if hasattr(attn_mod, "q_a_layernorm"):
        out["qa"] = attn_mod.q_a_layernorm(attn_mod.q_a_proj(h1))
    h2 = layer.post_attention_layernorm(x + attn)
    if layer.is_moe:
        mlp, routing = layer.mlp(h2)
        out["topk"] = routing.topk_idx.reshape(*h2.shape[:2], -1)
    else:
        mlp = layer.mlp(h2)
    out.update(h2=h2, mlp=mlp, out=x + attn + mlp)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _layer_out(graphdef, state, x, cos, sin, mask):
    return nnx.merge(graphdef, state)(x, cos, sin, mask)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _quantized_weights(graphdef, paths, group_size, bits, state, scales):
    """``Q(W·s)/s`` of the linears at ``paths`` (the rest of the layer is not copied)."""
    layer = nnx.merge(graphdef, state)
    return tuple(search.scaled_fake_quantize(functools.reduce(getattr, p, layer).weight[...],
                                             scales, group_size, bits) for p in paths)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_error(graphdef, judged_on, paths, state, weights, x, ref, cos, sin, mask):
    """Summed squared error against ``ref`` of the attention or MLP block's output with the
    linears at ``paths`` replaced by ``weights``."""
    layer = nnx.merge(graphdef, state)
    for path, w in zip(paths, weights):
        functools.reduce(getattr, path, layer).weight.set_value(w)
    if judged_on == "attention":
        out = layer.self_attn(x, cos, sin, mask)[0]
    else:
        out = layer.mlp(x)
        out = out[0] if layer.is_moe else out
    return jnp.sum((out - ref) ** 2)


@jax.jit
def _linear_out(w, x):
    return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _linear_error(group_size, bits, w, scales, x, ref, valid):
    """Mean squared error of ``x @ Q(W·s)/s`` against ``ref = x @ W`` over the valid rows."""
    err = _linear_out(search.scaled_fake_quantize(w, scales, group_size, bits), x) - ref
    return jnp.sum(jnp.where(valid[:, None], err ** 2, 0.0)) / (jnp.maximum(valid.sum(), 1) * w.shape[1])


def _padded(x: np.ndarray, rows: int):
    """``x`` padded to ``rows`` rows (one compile serves many experts) and the valid mask."""
    n = x.shape[0]
    pad = max(rows, n)
    xp = np.zeros((pad, x.shape[1]), np.float32)
    xp[:n] = x
    return jnp.asarray(xp), jnp.asarray(np.arange(pad) < n)


# --------------------------------------------------------------------------- one layer


@dataclasses.dataclass
class LayerResult:
    tensors: dict  # hub name -> float32: scales folded, weights clipped, not yet quantized
    quantized: list[str]  # hub names (with .weight) of the linears to quantize
    output: np.ndarray  # [n, T, H] the layer's output with its weights quantized
    alphas: dict  # scale group (its folded-into op) -> chosen α


class _Chunks:
    """Calibration samples in chunks of about CHUNK_TOKENS tokens, with their RoPE and mask."""

    def __init__(self, cfg: DeepseekV2Config, n: int, seq_len: int):
        self.size = max(1, min(n, CHUNK_TOKENS // seq_len))
        self.n = n
        pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (self.size, seq_len))
        self.cos, self.sin = cos_sin(cfg, pos)
        self.mask = causal_mask(self.size, seq_len)

    def __iter__(self):
        for i in range(0, self.n, self.size):
            j = min(self.n, i + self.size)
            b = j - i
            yield slice(i, j), self.cos[:b], self.sin[:b], self.mask[:b]


def awq_layer(cfg: DeepseekV2Config, layer: int, tensors: dict, x: np.ndarray, group_size: int,
              bits: int = 4, *, clip: bool = True, skip: Sequence[str] = (),
              duo_scaling: bool | str = True) -> LayerResult:
    """Search, fold and clip one decoder layer. ``tensors``: its hub tensors (float32, ``[out,
    in]``; modified in place); ``x [n, T, H]``: its calibration input; ``skip``: name parts of
    linears left unquantized (``modules_to_not_convert``); ``duo_scaling``: the candidate
    scales (``search.search_scale``)."""
    p = f"model.layers.{layer}."
    graphdef, state = layer_state(cfg, layer, tensors)
    chunks = _Chunks(cfg, x.shape[0], x.shape[1])
    parts = [_capture(graphdef, state, jnp.asarray(x[sl]), c, s, m) for sl, c, s, m in chunks]
    acts = {k: np.concatenate([np.asarray(d[k]) for d in parts]) for k in parts[0]}
    del parts
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in acts.items() if k != "topk"}

    def weight(name):  # model layout [in, out]
        return tensors[p + name + ".weight"].T

    # Inputs of each MLP's down_proj, and of each routed expert's gate/up (its own tokens).
    expert_tokens = {}
    mlps = mlp_names(cfg, layer)
    topk = acts["topk"].reshape(-1, cfg.num_experts_per_tok) if "topk" in acts else None
    for m in mlps:
        if m.startswith("mlp.experts."):
            e = int(m.split(".")[2])
            expert_tokens[m] = np.nonzero((topk == e).any(axis=1))[0]
            h = flat["h2"][expert_tokens[m]]
        else:
            h = flat["h2"]
        g, u = h @ weight(f"{m}.gate_proj"), h @ weight(f"{m}.up_proj")
        flat[f"{m}.down_proj"] = (g / (1.0 + np.exp(-g))) * u

    # 1. every group's scale, searched on the float layer
    groups = [g for g in (without(g, layer, skip) for g in scale_groups(cfg, layer)) if g]
    # The per-expert down_proj searches share one padded row count: one compile per layer.
    expert_rows = max([len(t) for t in expert_tokens.values()] + [1])
    expert_rows = 1 << (expert_rows - 1).bit_length()
    expert_tokens_down = {f"{m}.down_proj" for m in expert_tokens}
    found = []
    for g in groups:
        xin = flat[g.inputs]
        if xin.shape[0] == 0:  # an expert no calibration token reached: leave it unscaled
            found.append(None)
            continue
        x_mean = search.activation_mean(xin)
        ws = [weight(n) for n in g.linears]
        w_mean = search.weight_mean(ws, group_size)
        if g.judged_on == "linear":
            w = jnp.asarray(ws[0])
            xs, valid = _padded(xin, expert_rows if g.inputs in expert_tokens_down else 0)
            ref = _linear_out(w, xs)

            def loss(s, w=w, xs=xs, ref=ref, valid=valid):
                return _linear_error(group_size, bits, w, s, xs, ref, valid)

            result = search.search_scale(x_mean, w_mean, loss, duo_scaling=duo_scaling)
        else:
            paths = tuple(dict.fromkeys(_module_path(n) for n in g.linears))
            ref = acts[g.judged_on]
            inp = acts[g.inputs]

            def loss(s, g=g, paths=paths, ref=ref, inp=inp):
                ws = _quantized_weights(graphdef, paths, group_size, bits, state, s)
                total = sum(float(_block_error(graphdef, g.judged_on, paths, state, ws,
                                               jnp.asarray(inp[sl]), jnp.asarray(ref[sl]), c, si, m))
                            for sl, c, si, m in chunks)
                return total / ref.size

            result = search.search_scale(x_mean, w_mean, loss, duo_scaling=duo_scaling)
        found.append(result)

    # 2. fold them all; the captured inputs are divided as the folded model divides them
    alphas = {}
    for g, result in zip(groups, found):
        if result is None:
            continue
        fold_scale(tensors, layer, g, result.scales)
        flat[g.inputs] = flat[g.inputs] / result.scales[None, :]
        alphas[g.prev] = result.alpha

    # 3. clip, on the scaled weights and inputs
    names = quantized_linears(cfg, layer, skip)
    if clip:
        for name in names:
            if any(a in name for a in AVOID_CLIPPING):
                continue
            xin = _clip_input(name, flat, expert_tokens)
            if xin.shape[0] == 0:
                continue
            w = weight(name)
            tensors[p + name + ".weight"] = search.apply_clip(
                w, search.search_clip(w, xin, group_size, bits), group_size).T

    # 4. the quantized layer's output: the next layer's input
    qt = dict(tensors)
    for name in names:
        qt[p + name + ".weight"] = np.asarray(
            search.fake_quantize(jnp.asarray(weight(name)), group_size, bits)).T
    graphdef, qstate = layer_state(cfg, layer, qt)
    out = np.concatenate([np.asarray(_layer_out(graphdef, qstate, jnp.asarray(x[sl]), c, s, m))
                          for sl, c, s, m in chunks])
    return LayerResult(tensors, [p + n + ".weight" for n in names], out, alphas)


def _clip_input(name: str, flat: dict, expert_tokens: dict) -> np.ndarray:
    """The (scaled) calibration input of linear ``name``."""
    if name == "self_attn.o_proj":
        return flat["heads"]
    if name == "self_attn.kv_a_proj_with_mqa":
        return flat["h1"]
    if name == "self_attn.kv_b_proj":
        return flat["c_kv"]
    mlp, proj = name.rsplit(".", 1)
    if proj == "down_proj":
        return flat[name]
    h = flat["h2"]
    return h[expert_tokens[mlp]] if mlp in expert_tokens else h
