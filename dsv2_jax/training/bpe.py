"""Train a byte-level BPE tokenizer in DeepSeek's format (for the demo model).

Writes ``tokenizer.json`` (the ``tokenizers`` library) and ``tokenizer_config.json`` with
DeepSeek-V2's special tokens and chat template, so ``dsv2_jax.load_tokenizer`` and
transformers both read it. The special tokens take the last two ids, as in DeepSeek-V2.

Example::

    python -m dsv2_jax.training.bpe --input corpus.txt --vocab-size 6000 --out my_tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data import open_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
# DeepSeek-V2's own template (tokenizer_config.json of deepseek-ai/DeepSeek-V2-Lite-Chat).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def train_bpe(texts: list[str], vocab_size: int, out: str | Path, *, model_max_length: int = 4096) -> Path:
    """Train on ``texts`` and save the two files into ``out``; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 300 <= vocab_size <= 200_000:
        raise ValueError(f"vocab_size = {vocab_size}: expected 300..200000 (256 bytes + merges)")
    tok = Tokenizer(models.BPE())
    # Newlines stand alone and digits split one by one, as in DeepSeek's pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False,
               "single_word": False}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {**special, "content": BOS}, "eos_token": {**special, "content": EOS},
        "pad_token": {**special, "content": EOS}, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv2_jax.training.bpe", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="text files (.txt or .txt.gz)")
    p.add_argument("--vocab-size", type=int, default=6000)
    p.add_argument("--out", required=True)
    p.add_argument("--train-fraction", type=float, default=0.95,
                   help="train on the first fraction of each file (the rest is held out)")
    args = p.parse_args(argv)
    texts = []
    for f in args.input:
        with open_text(Path(f)) as fh:
            t = fh.read()
        texts.append(t[: int(len(t.encode()) * args.train_fraction)] if args.train_fraction < 1 else t)
    print(train_bpe(texts, args.vocab_size, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
