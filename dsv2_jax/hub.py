"""Resolve a model argument to a local folder: a folder on disk, or a hub repo id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HubError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.md", "tokenizer*"]


def resolve_model_path(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local folder for a folder path or a Hugging Face repo id ("owner/name").

    A repo id is fetched with ``huggingface_hub.snapshot_download`` (config, safetensors and
    tokenizer files only); when the hub cannot be reached the error says so and names the id.
    """
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists():
        raise NotADirectoryError(f"{s}: expected a model folder (config.json + *.safetensors), found a file")
    if not _REPO_ID.match(s) or s.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{s}: no such model folder (and not a hub repo id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, revision=revision, allow_patterns=_PATTERNS))
    except Exception as e:  # the hub raises many kinds; all mean "could not get it"
        kind = type(e).__name__
        offline = "offline" in str(e).lower() or "connect" in str(e).lower() or kind in (
            "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError")
        why = "the Hugging Face hub could not be reached" if offline else "the hub refused it"
        raise HubError(f"{s}: not a local folder, and {why} to download it ({kind}: {_first_line(e)})") from None


def _first_line(e: Exception, limit: int = 400) -> str:
    """The first line of an error message, cut at a word boundary past ``limit`` characters."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + " ..."
