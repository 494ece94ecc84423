"""An lm-evaluation-harness backend: ``lm_eval`` scores dsv2-jax models as it scores ``hf`` ones.

Needs the ``eval`` extra (``pip install -e ".[eval]"``: lm-eval 0.4). lm-eval 0.4 finds models
only in its own registry (its CLI loads no plugin entry points), so this module registers the
model ``dsv2-jax`` when imported, and ``python -m dsv2_jax.harness`` (console script
``dsv2-lm-eval``) imports it and runs lm-eval's own command line with the same arguments::

    python -m dsv2_jax.harness run --model dsv2-jax \\
        --model_args pretrained=deepseek-ai/DeepSeek-V2-Lite-Chat,dtype=bfloat16,batch_size=16 \\
        --tasks gsm8k --num_fewshot 5

From Python, importing this module is enough for lm-eval's API::

    import lm_eval, dsv2_jax.harness  # noqa: F401  (registers "dsv2-jax")
    results = lm_eval.simple_evaluate(model="dsv2-jax", model_args="pretrained=PATH", tasks=[...])

What each request type does, as the ``hf`` backend defines it:

- ``loglikelihood``: the context and continuation are tokenized together (the harness's
  ``_encode_pair``), the last ``max_length`` tokens are fed, and the continuation's summed
  log-probability (float32, from our logits) and whether greedy decoding would produce it are
  returned. Requests are sorted by length and run in batches of ``batch_size`` rows padded to a
  power-of-two length, so a task compiles a few shapes, not one per request.
- ``loglikelihood_rolling``: disjoint windows of ``max_length`` tokens (the harness's
  ``get_rolling_token_windows`` with context 1 and ``make_disjoint_window``), summed.
- ``generate_until``: ``dsv2_jax.generate`` on batches of requests with equal generation
  settings: ``until`` stop strings (EOS added), ``max_gen_toks``, ``temperature`` / ``do_sample``;
  the context is cut from the left to ``max_length - max_gen_toks`` tokens.

Model arguments: ``pretrained`` (folder or hub repo id; AWQ checkpoints load packed),
``dtype`` (bfloat16 | float32), ``batch_size``, ``max_length`` (default: the model's
``max_position_embeddings``), ``max_gen_toks`` (default 256), ``expert`` / ``fsdp`` (mesh sizes),
``add_bos_token`` (default: the tokenizer's own setting).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from .generation import generate
from .hub_format import load
from .sharding import make_mesh

MIN_LENGTH = 16  # scored rows are padded to a power of two >= this


def _bucket(n: int) -> int:
    return max(MIN_LENGTH, 1 << (n - 1).bit_length())


def _as_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, inputs, targets):
    """Per position: log p(target) in float32 and whether the target is the argmax. [B, L]."""
    logits = nnx.merge(graphdef, state)(inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return target_logp, jnp.argmax(logits, axis=-1) == targets


@register_model("dsv2-jax", "dsv2_jax")
class Dsv2JaxLM(TemplateLM):
    """``lm_eval --model dsv2-jax`` (after importing this module; see the module docstring)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "bfloat16", batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256,
                 expert: int | str = 1, fsdp: int | str = 1, add_bos_token: bool | str | None = None,
                 **unused: Any):
        super().__init__()
        if pretrained is None:
            raise ValueError("dsv2-jax: model_args needs pretrained=FOLDER_OR_REPO_ID")
        self.pretrained = str(pretrained)
        expert, fsdp = int(expert), int(fsdp)
        mesh = make_mesh(expert=expert, fsdp=fsdp) if expert > 1 or fsdp > 1 else None
        self.model = load(self.pretrained, dtype=dtype, mesh=mesh)
        if self.model.tokenizer is None:
            raise ValueError(f"dsv2-jax: {self.pretrained} has no tokenizer.json")
        self.tokenizer = self.model.tokenizer
        self.graphdef, self.state = nnx.split(self.model)
        # "auto" (the harness's batch-size search) has no meaning here: a fixed batch.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        bos = _as_bool(add_bos_token)
        self.add_bos_token = self.tokenizer.add_bos_token if bos is None else bos

    # ---- what the harness asks of a model ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos_text = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and string.startswith(bos_text):
            add = False  # the string already starts with BOS (chat templates write it)
        ids = self.tokenizer.encode(string, add_bos=bool(add))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- scoring -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``(logprob, is_greedy)`` of each ``(key, context_ids, continuation_ids)``."""
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"dsv2-jax: request {i} has an empty continuation")
            ids = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((i, ids[:-1], ids[1:], len(continuation)))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: few padded shapes
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            length = min(_bucket(len(chunk[0][1])), self.max_length)  # longest first; <= max_length
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for b, (_, inp, tgt, _) in enumerate(chunk):  # right padding: causal, never attended
                inputs[b, :len(inp)] = inp
                targets[b, :len(tgt)] = tgt
            logp, greedy = _score(self.graphdef, self.state, jnp.asarray(inputs),
                                  jnp.asarray(targets))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for b, (i, inp, _, n_cont) in enumerate(chunk):
                span = slice(len(inp) - n_cont, len(inp))
                out[i] = (float(logp[b, span].sum(dtype=np.float64)), bool(greedy[b, span].all()))
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, pred))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            if max_gen >= self.max_length:
                raise ValueError(f"dsv2-jax: max_gen_toks = {max_gen} leaves no room for a context "
                                 f"in max_length = {self.max_length}")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                           for i in chunk]
                res = generate(self.model, self.tokenizer, prompt_ids=prompts, max_new_tokens=max_gen,
                               temperature=temperature, top_p=float(kwargs.get("top_p", 1.0)),
                               top_k=int(kwargs.get("top_k", 0) or 0), seed=int(kwargs.get("seed", 0)))
                for i, ids in zip(chunk, res.token_ids):
                    text = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv=None) -> int:
    """lm-eval's command line with the ``dsv2-jax`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
