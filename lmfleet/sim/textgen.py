"""Deterministic fake generation: the same prompt, seed and choice give the same text.

Each output token is one word with a leading space (" lorem"), drawn from a fixed
list by a 64-bit LCG seeded with crc32(prompt) and the seed, so results are equal
across processes and runs (Python's `hash()` is salted per process, so not that).

The natural length (where the "model" emits EOS) is `output_tokens`, or, with
`output_tokens_max`, a deterministic length in [output_tokens, output_tokens_max]
taken from the same hash. `max_tokens` below it cuts the output with
finish_reason "length"; `ignore_eos` makes it run to `max_tokens`. A stop string
ends the text just before its first occurrence with finish_reason "stop".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

WORDS = (
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
    "enim",
    "ad",
    "minim",
    "veniam",
    "quis",
    "nostrud",
    "exercitation",
    "ullamco",
    "laboris",
    "nisi",
    "aliquip",
    "ex",
    "ea",
    "commodo",
    "consequat",
    "duis",
    "aute",
    "irure",
    "in",
    "reprehenderit",
    "voluptate",
    "velit",
    "esse",
    "cillum",
    "fugiat",
    "nulla",
    "pariatur",
    "excepteur",
    "sint",
    "occaecat",
    "cupidatat",
    "non",
    "proident",
    "sunt",
    "culpa",
    "qui",
    "officia",
    "deserunt",
    "mollit",
    "anim",
    "id",
    "est",
)
_PIECES = tuple(" " + w for w in WORDS)
_MASK = (1 << 64) - 1
_MUL = 6364136223846793005
_INC = 1442695040888963407


@dataclass(frozen=True, slots=True)
class Output:
    """One generated choice: its token pieces (joined = text) and why it ended."""

    pieces: tuple[str, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        return len(self.pieces)


def prompt_hash(prompt: str, seed: int, index: int = 0) -> int:
    """64-bit state for choice `index` of `prompt` under `seed`."""
    return (zlib.crc32(prompt.encode()) ^ (seed * 0x9E3779B97F4A7C15) ^ (index << 40)) & _MASK


def natural_length(state: int, output_tokens: int, output_tokens_max: int | None) -> int:
    """Where the emulated model would stop on its own."""
    if output_tokens_max is None or output_tokens_max <= output_tokens:
        return output_tokens
    return output_tokens + (state >> 17) % (output_tokens_max - output_tokens + 1)


def generate(
    prompt: str,
    *,
    seed: int,
    index: int,
    max_tokens: int | None,
    output_tokens: int,
    output_tokens_max: int | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
) -> Output:
    """The full output of one choice, computed up front (timing only paces it)."""
    state = prompt_hash(prompt, seed, index)
    natural = natural_length(state, output_tokens, output_tokens_max)
    if max_tokens is None:
        length, reason = natural, "stop"
    elif ignore_eos or max_tokens < natural:
        length, reason = max_tokens, "length"
    else:
        length, reason = natural, "stop"
    pieces: list[str] = []
    for _ in range(length):
        state = (state * _MUL + _INC) & _MASK
        pieces.append(_PIECES[(state >> 33) % len(_PIECES)])
    if stop:
        return _apply_stop(pieces, stop, reason)
    return Output(tuple(pieces), reason)


def _apply_stop(pieces: list[str], stop: tuple[str, ...], reason: str) -> Output:
    """Cut the text just before the first stop string.

    The tokens generated up to and including the one that completed the stop
    string still count (in LMDeploy the stop word is a generated token); pieces
    past the cut become empty strings so the count and the text both stay right.
    """
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        hits = [pos for s in stop if s and (pos := text.find(s)) >= 0]
        if hits:
            visible = text[: min(hits)]
            kept: list[str] = []
            used = 0
            for p in pieces[: i + 1]:
                part = visible[used : used + len(p)]
                kept.append(part)
                used += len(part)
            return Output(tuple(kept), "stop")
    return Output(tuple(pieces), reason)
