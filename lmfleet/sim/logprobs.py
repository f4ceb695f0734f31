"""Deterministic logprobs in the forms LMDeploy 0.18's api_server returns them.

The engine side first: for every position LMDeploy's engine hands the server one
row, a dict {token_id: value} (PyTorch `engine_loop._update_logprobs`: the chosen
token first, then the top n, values descending; a chosen token that is also in the
top n appears once, so a row has n entries, or n + 1 when the chosen token ranks
below the top n). `row()` builds that row. The response builders then follow the
server code that turns rows into JSON:

- chat (`chat_completions/logprobs.py`): `{"token", "bytes", "logprob",
  "top_logprobs"}` per token, where `top_logprobs` holds the row's entries other
  than the chosen token: n - 1 alternatives for a top-ranked token, not n, and
  never the chosen token itself (unlike OpenAI);
- `output_token_logprobs` (chat `return_logprob`, `/generate`): `[logprob, id]`;
- `/generate`'s top lists (`endpoints/generate.py` `_create_top_logprobs`):
  `[logprob, id]` sorted descending, at most n, the chosen token dropped only when
  the row has more than n entries.

Values (simulator conventions): a generated token is always the most likely one
(rank 0, as greedy decoding picks it); a prompt token scored by `/generate`'s
input logprobs ranks 0 about half of the time, else 1..5 or below the top n.
Probabilities fall geometrically by rank with a per-position ratio, so every
value is <= 0 and the row's probabilities sum to at most 1. Under
`--logprobs-mode raw_logits` the values are logits instead: the logprob plus a
per-position normaliser in [5, 15), as LMDeploy returns the unnormalised scores.
Everything derives from crc32 and splitmix64 state, so the same request gets the same values
in every process.
"""

from __future__ import annotations

import math
import zlib

from lmfleet.sim.textgen import WORDS

FIRST_WORD_ID = 1000  # generated piece " lorem" is id 1000 (see generation._TOKEN_IDS)
EOS_ID = 2
BOS_ID = 1
_POOL = len(WORDS)  # 61: a prime, so any step in 1..60 walks every word once
_SYNTHETIC_ID = 2000  # ids past the word list, for top lists longer than it
_MASK = (1 << 64) - 1

Row = dict[int, float]


def token_text(token_id: int) -> str:
    """The raw tokenizer token LMDeploy puts in chat logprobs (`convert_ids_to_tokens`).

    SentencePiece style (the sim's default model, InternLM2, is SentencePiece): a
    word with its leading space is "▁word", not the decoded " word".
    """
    index = token_id - FIRST_WORD_ID
    if 0 <= index < _POOL:
        return "\u2581" + WORDS[index]
    if token_id == EOS_ID:
        return "</s>"
    return f"<tok{token_id}>"


def text_ids(text: str, add_bos: bool = False) -> list[int]:
    """Prompt token ids: one per 4 characters (the simulator's token rule), after a
    BOS (id 1) when asked; the same ids `/v1/encode` returns."""
    ids = [zlib.crc32(text[i : i + 4].encode()) % 32000 + 3 for i in range(0, len(text), 4)]
    return [BOS_ID, *ids] if add_bos else ids


def mix(state: int, value: int) -> int:
    """`state` with `value` folded in: splitmix64's finaliser, so every input bit
    reaches every output bit (a bare LCG step would leave the low bits blind to
    the high ones, where textgen keeps the choice index)."""
    x = (state + (value + 1) * 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _candidates(state: int, exclude: int, count: int) -> list[int]:
    """`count` distinct token ids other than `exclude`, in an order drawn from `state`."""
    start = (state >> 20) % _POOL
    step = 1 + (state >> 40) % (_POOL - 1)
    ids = [FIRST_WORD_ID + (start + k * step) % _POOL for k in range(_POOL)]
    ids = [i for i in ids if i != exclude]
    extra = count - len(ids)
    if extra > 0:
        ids += [_SYNTHETIC_ID + k for k in range(extra)]
    return ids[:count]


def row(state: int, chosen: int, n: int, rank: int, logits: bool = False) -> Row:
    """One position's row as LMDeploy's engine returns it, for a top-`n` request.

    `rank`: where `chosen` stands among the model's candidates (0 = most likely).
    """
    ratio = 0.5 + ((state >> 8) & 0xFFFF) / 0xFFFF * 2.0  # log-ratio between ranks
    floor = -math.log1p(-math.exp(-ratio))  # so that sum(exp(-(floor + r*ratio))) <= 1
    top = floor + ((state >> 24) & 0xFFFF) / 0xFFFF  # -log p of rank 0
    shift = 5.0 + ((state >> 40) & 0xFFFF) / 0xFFFF * 10.0 if logits else 0.0

    def value(r: int) -> float:
        return round(shift - (top + r * ratio), 6)

    others = _candidates(state, chosen, n)
    ranked = [*others[:rank], chosen, *others[rank:]] if rank < n else others
    values = {token: value(r) for r, token in enumerate(ranked[:n])}
    first = values.get(chosen, value(max(rank, n)))
    return {chosen: first, **values}


def output_rows(
    state: int, ids: list[int], n: int, logits: bool = False, offset: int = 0
) -> list[Row]:
    """Rows of generated tokens `ids` (steps `offset`...): each is the top-1 choice."""
    return [row(mix(state, offset + i), token, n, 0, logits) for i, token in enumerate(ids)]


def input_rows(ids: list[int], start: int, n: int, logits: bool = False) -> list[Row]:
    """`/generate` input logprobs: one row per token of `ids[start + 1:]`, each
    scoring that token given the ones before it."""
    rows: list[Row] = []
    state = 0
    for i, token in enumerate(ids):
        if i > start:
            pick = mix(state, token) >> 33
            rank = 0 if pick % 2 == 0 else [1, 1, 2, 3, 5, n + 1][(pick >> 1) % 6]
            rows.append(row(state, token, n, rank, logits))
        state = mix(state, token)
    return rows


def chat_content(ids: list[int], rows: list[Row]) -> list[dict[str, object]]:
    """`_create_chat_completion_logprobs`: the chosen token's entry; the rest of the
    row, in row order, as its top_logprobs."""
    content: list[dict[str, object]] = []
    for token_id, top in zip(ids, rows, strict=True):
        item: dict[str, object] = {"token": "", "bytes": [], "logprob": 0.0}
        alternatives: list[dict[str, object]] = []
        for top_id, value in top.items():
            token = token_text(top_id)
            entry = {"token": token, "bytes": list(token.encode()), "logprob": value}
            if top_id == token_id:
                item.update(entry)
            else:
                alternatives.append(entry)
        item["top_logprobs"] = alternatives
        content.append(item)
    return content


def token_pairs(ids: list[int], rows: list[Row]) -> list[list[float | int]]:
    """`[logprob, id]` of each chosen token (`output_token_logprobs` and friends)."""
    return [[top[token], token] for token, top in zip(ids, rows, strict=True)]


def top_pairs(ids: list[int], rows: list[Row], n: int) -> list[list[list[float | int]]]:
    """`/generate`'s `_create_top_logprobs`: per position, at most `n` `[logprob, id]`
    sorted descending; the chosen token is dropped only from a row longer than n."""
    result = []
    for token, top in zip(ids, rows, strict=True):
        items = [(value, top_id) for top_id, value in top.items()]
        if len(items) > n:
            items = [(value, top_id) for value, top_id in items if top_id != token]
        items.sort(key=lambda item: item[0], reverse=True)
        result.append([[value, top_id] for value, top_id in items[:n]])
    return result
