"""Training data: reading, chat loss masks, packing with document boundaries, deterministic order."""

import json

import numpy as np
import pytest

from dsv2_jax.tokenizer import load_tokenizer
from dsv2_jax.training.byte_tokenizer import BOS, EOS, write_byte_tokenizer
from dsv2_jax.training.data import (Batches, DataError, TokenStream, heldout_batches, load_corpus,
                                 pack_rows, tokenize_chat)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("bytes")))


def test_byte_tokenizer(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)
    assert tok.encode("hé\n") == [104, 0xC3, 0xA9, 10]  # one id per UTF-8 byte
    assert tok.decode(tok.encode("深度 求索!")) == "深度 求索!"
    assert tok.encode(BOS + "a" + EOS) == [256, 97, 257]


def test_text_documents_and_loss(tok, tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "cd"}) + "\n\n" + json.dumps({"text": "e"}) + "\n")
    c = load_corpus([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")], tok)
    assert c.n_documents == 3
    assert c.train.ids.tolist() == [256, 97, 98, 257, 256, 99, 100, 257, 256, 101, 257]
    assert c.train.loss.tolist() == [False, True, True, True] * 2 + [False, True, True]
    assert c.train.doc.tolist() == [0] * 4 + [1] * 4 + [2] * 3


def test_chat_loss_only_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A!"}]
    ids, loss = tokenize_chat(tok, msgs)
    text = BOS + "S\n\nUser: Hi\n\nAssistant: Yo" + EOS + "User: Q\n\nAssistant: A!" + EOS
    assert ids.tolist() == tok.encode(text)
    # By hand: the targets are " Yo<eos>" and " A!<eos>" (the space after "Assistant:" belongs
    # to the reply, as the generation prompt ends with "Assistant:").
    chosen = [tok.decode([i]) if i < 256 else i for i, m in zip(ids.tolist(), loss) if m]
    assert chosen == [" ", "Y", "o", 257, " ", "A", "!", 257]
    assert not loss[: len(tok.encode(BOS + "S\n\nUser: Hi\n\nAssistant:"))].any()


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + "\n" + '{"text": "broken\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: not valid JSON"):
        load_corpus([str(f)], tok)
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: expected a key 'text' or 'messages'"):
        load_corpus([str(f)], tok)
    f.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:1: messages\[0\]\['role'\]"):
        load_corpus([str(f)], tok)
    with pytest.raises(DataError, match=r"data\.train\[0\] = .*nothing\*\.txt.*no such file"):
        load_corpus([str(tmp_path / "nothing*.txt")], tok)


def test_vocab_check(tok, tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(DataError, match="vocab_size is 100"):
        load_corpus([str(tmp_path / "a.txt")], tok, vocab_size=100)


def stream(docs):
    """TokenStream from lists of ids (every token a target except each document's first)."""
    ids = np.concatenate([np.asarray(d, np.int32) for d in docs])
    loss = np.concatenate([[False] + [True] * (len(d) - 1) for d in docs])
    doc = np.concatenate([[i] * len(d) for i, d in enumerate(docs)]).astype(np.int32)
    return TokenStream(ids, loss, doc)


def test_packing_by_hand():
    s = stream([[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]])  # 13 tokens
    b = pack_rows(s, np.array([0, 1, 2]), 4)  # rows of 4 + 1 tokens, overlapping by one
    assert b["inputs"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 30], [31, 32, 33, 34]]
    assert b["targets"].tolist() == [[11, 12, 13, 20], [21, 22, 30, 31], [32, 33, 34, 35]]
    # a target that starts the next document (predicted from the previous one) is not trained
    assert b["loss_mask"].astype(int).tolist() == [[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]]
    assert b["segments"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    # positions restart at each document start, and at the start of a row (a document
    # continued from the previous row is attended to from its first token in this row)
    assert b["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]


def test_chat_packing_keeps_assistant_mask(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ids, loss = tokenize_chat(tok, msgs)
    s = TokenStream(np.concatenate([ids, ids]), np.concatenate([loss, loss]),
                    np.repeat(np.array([0, 1], np.int32), len(ids)))
    n = len(ids)
    b = pack_rows(s, np.array([0]), 2 * n - 1)
    # targets are tokens 1..2n-1; the mask is the assistant mask shifted, minus the second BOS
    want = np.concatenate([loss, loss])[1:]
    assert b["loss_mask"][0].tolist() == want.tolist()
    assert b["targets"][0][b["loss_mask"][0]].tolist() == [ids[i] for i in range(n) if loss[i]] * 2


def test_deterministic_order_and_resume():
    s = stream([list(range(100 * i, 100 * i + 50)) for i in range(8)])  # 400 tokens
    a = Batches(s, seq_len=8, batch_size=4, seed=1)
    rows = a.rows
    assert rows == (400 - 1) // 8
    first = [a.next()["inputs"] for _ in range(30)]  # crosses several epochs
    again = Batches(s, 8, 4, seed=1)
    assert all((x == again.next()["inputs"]).all() for x in first)
    other = Batches(s, 8, 4, seed=2)
    assert not all((x == other.next()["inputs"]).all() for x in first[:3])
    # every row appears once per epoch (the remainder of 49 % 4 rows is skipped)
    epoch0 = np.concatenate([x[:, 0] for x in first[: rows // 4]])
    assert len(set(epoch0.tolist())) == rows // 4 * 4
    # restoring a saved state continues exactly where the saved iterator was
    b = Batches(s, 8, 4, seed=1)
    for _ in range(17):
        b.next()
    state = b.state()
    assert state == {"epoch": 1, "position": 20, "rows": rows}
    c = Batches(s, 8, 4, seed=1)
    c.restore(json.loads(json.dumps(state)))
    for x in first[17:]:
        assert (c.next()["inputs"] == x).all()
    with pytest.raises(DataError, match="changed"):
        Batches(s, 16, 4, seed=1).restore(state)


def test_heldout_is_the_end_of_the_text(tok, tmp_path):
    (tmp_path / "a.txt").write_text("x" * 998)  # 1000 tokens with BOS and EOS
    c = load_corpus([str(tmp_path / "a.txt")], tok, heldout_fraction=0.1)
    assert len(c.train) == 900 and len(c.heldout) == 100
    assert c.heldout.ids[-1] == tok.eos_id
    ev = heldout_batches(c.heldout, seq_len=16, batch_size=2, n_batches=10)
    assert len(ev) == 3  # 99 // 16 = 6 rows = 3 batches
    with pytest.raises(DataError, match="fewer than one batch"):
        Batches(c.heldout, 64, 4, seed=0, name="heldout")
