"""A 258-token byte-level tokenizer for tiny models trained from scratch on a CPU.

DeepSeek's own vocabulary has 102,400 rows: its embedding and lm_head dwarf a model small
enough to train here in a minute. This tokenizer maps each byte to one token (ids 0..255, in
GPT-2's byte-to-unicode alphabet so the `tokenizers` ByteLevel decoder reads it), adds DeepSeek's
BOS (256) and EOS (257) and DeepSeek-V2's chat template, and is written as an ordinary
``tokenizer.json`` + ``tokenizer_config.json`` folder, so ``load_tokenizer``, ``dsv2_jax.save``
and transformers treat it like any other.

Example::

    from dsv2_jax.training.byte_tokenizer import write_byte_tokenizer
    from dsv2_jax.tokenizer import load_tokenizer
    tok = load_tokenizer(write_byte_tokenizer("/tmp/bytes"))
    tok.encode("hé")   # [104, 195, 169]
"""

from __future__ import annotations

import json
from pathlib import Path

from .bpe import (  # DeepSeek-V2's special tokens and chat template
    BOS,
    CHAT_TEMPLATE,
    EOS,
)

VOCAB_SIZE = 258  # 256 bytes + BOS + EOS


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (index = byte)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return [chr(chars[b]) for b in range(256)]


def write_byte_tokenizer(folder: str | Path) -> Path:
    """Write the byte tokenizer's two files into ``folder`` (created) and return it."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(BOS, special=True, normalized=False),
                            tokenizers.AddedToken(EOS, special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    return folder
