"""Training data: read text / JSONL documents, tokenize, pack into fixed-length rows, batch.

* ``.txt``: one document per file. ``.jsonl``: one document per line, either
  ``{"text": ...}`` (pre-training: loss on every token) or ``{"messages": [...]}`` (chat SFT,
  rendered with the tokenizer's chat template; loss only on the assistant turns, their EOS
  included). Text documents are wrapped as ``BOS text EOS``; the chat template adds its own BOS.
  Either kind may be gzip-compressed (``.txt.gz``, ``.jsonl.gz``) and is then read directly.
* All documents, in file order, form one token stream. With ``heldout_fraction`` f the last f
  of the stream is held out for evaluation. The rest is cut into rows of ``seq_len + 1`` tokens
  overlapping by one (row r is tokens ``[r L, (r+1) L]``), so every token is a target once.
* Document boundaries are respected: each row carries segment ids (documents numbered from 0
  within the row) and positions restarting at 0 at each document start; the train step builds a
  block-diagonal causal attention mask from the segment ids, and a target whose token starts
  a new document (predicting the next document's BOS from the previous one) is not in the loss.
* Order: each epoch visits the rows in a permutation drawn from ``(seed, epoch)``; a batch takes
  the next ``batch_size`` rows and an epoch's remainder (fewer than a batch) is skipped. The
  iterator's whole state is ``{"epoch", "position", "rows"}``, a small dict saved in checkpoints.

The corpus is held in host memory (int32 ids): enough for fine-tuning sets and CPU runs; a
multi-terabyte pre-training corpus needs a sharded streaming reader behind the same batch format.

Example::

    corpus = load_corpus(["data/*.jsonl"], tokenizer, heldout_fraction=0.01)
    batches = Batches(corpus.train, seq_len=128, batch_size=8, seed=0)
    batch = batches.next()   # dict of [8, 128] arrays: inputs, targets, loss_mask, segments, positions
    state = batches.state()  # {"epoch": 0, "position": 8, "rows": ...}
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataError
from ..tokenizer import Tokenizer, validate_messages


@dataclasses.dataclass
class TokenStream:
    """Concatenated documents: ids [N] int32, loss [N] bool (token is a training target),
    doc [N] int32 (document index, increasing)."""

    ids: np.ndarray
    loss: np.ndarray
    doc: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def split(self, at: int) -> tuple["TokenStream", "TokenStream"]:
        return (TokenStream(self.ids[:at], self.loss[:at], self.doc[:at]),
                TokenStream(self.ids[at:], self.loss[at:], self.doc[at:]))


@dataclasses.dataclass
class Corpus:
    train: TokenStream
    heldout: TokenStream | None
    n_documents: int


# ---------------------------------------------------------------------------
# reading


def expand_paths(patterns: Sequence[str], key: str = "data.train") -> list[Path]:
    """Each entry is a path or a glob pattern; matches are sorted. Missing -> DataError."""
    out: list[Path] = []
    for i, pattern in enumerate(patterns):
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise DataError(f"{key}[{i}] = {pattern!r}: no such file (or the pattern matches no file)")
        out.extend(files)
    return out


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return "jsonl" if suffixes and suffixes[-1] in (".jsonl", ".json", ".ndjson") else "text"


def open_text(path: Path):
    """A text file or its gzip-compressed form (``*.gz``), read as UTF-8."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_records(path: Path, fmt: str = "auto", text_key: str = "text",
                 messages_key: str = "messages") -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)``: ``("text", str)`` or ``("messages", list)`` per document.

    ``where`` is ``"file"`` or ``"file:line"``, for error messages.
    """
    if _format_of(path, fmt) == "text":
        try:
            with open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        except (gzip.BadGzipFile, EOFError) as e:
            raise DataError(f"{path}: not a complete gzip file ({e})") from None
        if not text.strip():
            what = "empty" if not text else "only whitespace"
            raise DataError(f"{path}: {what}: no text to train on")
        yield str(path), ("text", text)
        return
    with open_text(path) as f:
        for n, line in enumerate(f, start=1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            if messages_key in obj:
                yield where, ("messages", obj[messages_key])
            elif text_key in obj:
                if not isinstance(obj[text_key], str):
                    raise DataError(f"{where}: {text_key!r} must be a string, "
                                    f"found {type(obj[text_key]).__name__}")
                yield where, ("text", obj[text_key])
            else:
                raise DataError(f"{where}: expected a key {text_key!r} or {messages_key!r}, "
                                f"found {sorted(obj)}")


# ---------------------------------------------------------------------------
# tokenizing


def tokenize_text(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``BOS text EOS``; every token but the BOS is a target."""
    ids = np.asarray([tok.bos_id, *tok.encode(text), tok.eos_id], np.int32)
    loss = np.ones(ids.shape, bool)
    loss[0] = False
    return ids, loss


def assistant_spans(tok: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies.

    Reply i spans from the end of the prompt rendered for it (``messages[:i]`` with the
    generation prompt) to the end of ``messages[:i+1]`` rendered: its text and its EOS.
    """
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant message")
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError("the chat template does not render a conversation as the "
                             "concatenation of its turns; cannot find the assistant tokens")
        spans.append((len(prompt), len(upto)))
    return full, spans


def tokenize_chat(tok: Tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Template-rendered ids; a token is a target iff it starts inside an assistant reply."""
    validate_messages(messages)
    text, spans = assistant_spans(tok, messages)
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    starts = np.asarray([s for s, _ in enc.offsets], np.int64)
    loss = np.zeros(ids.shape, bool)
    for a, b in spans:
        loss |= (starts >= a) & (starts < b)
    return ids, loss


def load_corpus(patterns: Sequence[str], tok: Tokenizer, *, fmt: str = "auto",
                heldout_fraction: float = 0.0, text_key: str = "text",
                messages_key: str = "messages", vocab_size: int | None = None) -> Corpus:
    """Read, tokenize and concatenate every document; hold out the stream's last fraction."""
    ids, loss, doc = [], [], []
    n = 0
    for path in expand_paths(patterns):
        for where, (kind, value) in read_records(path, fmt, text_key, messages_key):
            try:
                if kind == "text":
                    i, l = tokenize_text(tok, value)
                else:
                    i, l = tokenize_chat(tok, value)
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: {e}") from None
            ids.append(i)
            loss.append(l)
            doc.append(np.full(i.shape, n, np.int32))
            n += 1
    stream = TokenStream(np.concatenate(ids), np.concatenate(loss), np.concatenate(doc))
    if vocab_size is not None and len(stream) and int(stream.ids.max()) >= vocab_size:
        raise DataError(f"tokenizer {tok.name}: produces id {int(stream.ids.max())}, but the "
                        f"model's vocab_size is {vocab_size}")
    if heldout_fraction:
        at = int(round(len(stream) * (1.0 - heldout_fraction)))
        train, heldout = stream.split(at)
        return Corpus(train, heldout, n)
    return Corpus(stream, None, n)


# ---------------------------------------------------------------------------
# packing and batching


def num_rows(stream: TokenStream, seq_len: int) -> int:
    return max(0, (len(stream) - 1) // seq_len)


def pack_rows(stream: TokenStream, rows: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The packed rows ``rows`` as model inputs, each [len(rows), seq_len]:

    inputs, targets (int32), loss_mask (bool: target counts), segments (int32 document number
    within the row, from 0), positions (int32, restarting at each document start).
    """
    idx = np.asarray(rows, np.int64)[:, None] * seq_len + np.arange(seq_len + 1)  # [R, L+1]
    ids, loss, doc = stream.ids[idx], stream.loss[idx], stream.doc[idx]
    same_doc = doc[:, 1:] == doc[:, :-1]
    seg_doc = doc[:, :-1]
    segments = (seg_doc - seg_doc[:, :1]).astype(np.int32)
    # positions: distance to the first token of the same document within the row
    t = np.arange(seq_len)
    starts = np.where(np.concatenate([np.ones((len(rows), 1), bool), ~same_doc[:, :-1]], 1), t, 0)
    positions = (t - np.maximum.accumulate(starts, axis=1)).astype(np.int32)
    return {
        "inputs": ids[:, :-1].astype(np.int32),
        "targets": ids[:, 1:].astype(np.int32),
        "loss_mask": loss[:, 1:] & same_doc,
        "segments": segments,
        "positions": positions,
    }


class Batches:
    """Deterministic batches of packed rows; ``state()`` / ``restore()`` resume exactly.

    ``next()`` returns a dict of [batch_size, seq_len] arrays (see :func:`pack_rows`).
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, name: str = "data"):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rows = num_rows(stream, seq_len)
        if self.rows < batch_size:
            raise DataError(
                f"{name}: {len(stream)} tokens make {self.rows} sequences of data.seq_len = {seq_len}, "
                f"fewer than one batch of {batch_size}")
        self.epoch, self.position = 0, 0
        self._order = None

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def next(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > self.rows:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        rows = self._order[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return pack_rows(self.stream, rows, self.seq_len)

    def __iter__(self):
        while True:
            yield self.next()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "rows": self.rows}

    def restore(self, state: dict[str, int]) -> None:
        if int(state["rows"]) != self.rows:
            raise DataError(
                f"data: the checkpoint's iterator state is for {state['rows']} sequences, the "
                f"data now gives {self.rows}; the training files or data.seq_len changed")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def heldout_batches(stream: TokenStream, seq_len: int, batch_size: int, n_batches: int):
    """The first ``n_batches`` batches of held-out rows, in order (fewer if the text is short)."""
    rows = num_rows(stream, seq_len)
    out = []
    for b in range(min(n_batches, rows // batch_size)):
        out.append(pack_rows(stream, np.arange(b * batch_size, (b + 1) * batch_size), seq_len))
    return out
