"""Write data/shakespeare-chat.jsonl: two-turn chats cut from the demo's training text.

    python tools/make_shakespeare_chat.py

Each record is one speech (the user turn) and the speech that answers it (the assistant
turn), taken in order from the first 95% of data/shakespeare.txt.gz (the demo's training
part; the held-out 5% is never used): 240 pairs of 40-400 characters, every 7th eligible pair.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEAKER = re.compile(r"^([A-Z][A-Z .'-]+)\.\n", re.M)


def speeches(text: str):
    marks = list(SPEAKER.finditer(text))
    for a, b in zip(marks, marks[1:]):
        body = " ".join(text[a.end(): b.start()].split())
        yield a.group(1), body


def main() -> None:
    with gzip.open(ROOT / "data" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    text = text[: int(len(text) * 0.95)]
    pairs = []
    prev = None
    for who, body in speeches(text):
        if prev and prev[0] != who and all(40 <= len(s) <= 400 for s in (prev[1], body)):
            pairs.append((prev[1], body))
        prev = (who, body)
    chosen = pairs[::7][:240]
    out = ROOT / "data" / "shakespeare-chat.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for user, reply in chosen:
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    print(f"{out}: {len(chosen)} chats")


if __name__ == "__main__":
    main()
