"""Workload schedules for the routing-quality bench: pure data, the same for every router.

A schedule is decided entirely by (mix, seed, request count, rate or concurrency):
arrival times, the chat messages, the prompt as the simulator sees it and the exact
number of output tokens. Every router of a cell replays the very same schedule, and
the offline replay (bench/routing_replay.py) computes its baselines from it too.

Why the pieces are drawn from separate seeded streams: the arrival stream is drawn
at unit rate and divided by the rate, and prompts and outputs have streams of their
own, so the 80 % and 95 % cells of one seed send the same requests, only closer
together, and changing the number of clients moves no prompt.

Output lengths are exact: the live nodes run with a natural length far above any
scheduled length (`--output-tokens 100000`) and each request carries
`max_tokens = output_tokens`, so the node generates exactly the scheduled count
(finish_reason "length").

Prefix cache: the simulator caches 64-character blocks of the templated prompt,
hashed as a chain from the first character. Each live run puts a fixed-width salt
(`run_salt`) at the very start of every prompt, so no block of an earlier run can
match: as the cache is an LRU, the stale blocks are also the first evicted, which
makes a salted run equivalent to one on a flushed cache (the simulator has no flush
route). The replay uses a salt of the same width so block boundaries match.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Literal

from lmfleet.sim.engine import count_tokens
from lmfleet.sim.protocol import chat_prompt

Mode = Literal["open", "closed"]
SALT_WIDTH = 16  # len(run_salt(...)); the replay's placeholder has the same width


def run_salt(seed: int, run: int) -> str:
    """A fixed-width prefix unique to one live run: `[r0003-0007]` plus padding."""
    salt = f"[r{seed:04d}-{run:04d}] "
    return salt.ljust(SALT_WIDTH)


REPLAY_SALT = "[replay]".ljust(SALT_WIDTH)


@dataclass(frozen=True, slots=True)
class Request:
    """One scheduled request. `arrival` is seconds after start (open loop only).

    `client` is the independent router that sends it: a client process with its own
    `LMFleet.attach`, or a proxy replica, depending on the cell.
    """

    index: int
    client: int
    arrival: float
    system: str
    history: tuple[tuple[str, str], ...]  # earlier (user, assistant) turns
    user: str
    output_tokens: int

    def messages(self, salt: str) -> list[dict[str, str]]:
        """The chat messages sent; `salt` starts the first message."""
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": salt + self.system})
            salt = ""
        for question, answer in self.history:
            out.append({"role": "user", "content": salt + question})
            out.append({"role": "assistant", "content": answer})
            salt = ""
        out.append({"role": "user", "content": salt + self.user})
        return out

    def sim_prompt(self, salt: str = REPLAY_SALT) -> str:
        """The text the simulator counts and caches (its chat template)."""
        return chat_prompt(self.messages(salt))

    def prompt_tokens(self) -> int:
        """Prompt tokens as the simulator counts them (independent of the salt's text)."""
        return count_tokens(self.sim_prompt())


@dataclass(frozen=True, slots=True)
class Schedule:
    """All requests of one (cell, seed), in issue order per client.

    Open loop: each request is sent at its `arrival`. Closed loop: client `c` keeps
    `concurrency[c]` requests in flight, taking its requests in index order, and
    every client stops issuing once client 0 (the primary) has finished all of its
    `primary_requests` requests; the other clients' lists are long enough never to
    run out first.
    """

    mix: str
    seed: int
    mode: Mode
    clients: int
    requests: tuple[Request, ...]
    rate: float = 0.0  # open loop: requests/s
    concurrency: tuple[int, ...] = ()  # closed loop: in flight per client

    def for_client(self, client: int) -> list[Request]:
        return [r for r in self.requests if r.client == client]


# -- output and prompt length distributions --------------------------------------

OUTPUT_MIX: tuple[tuple[float, int, int], ...] = ((0.70, 8, 64), (0.25, 64, 192), (0.05, 192, 384))
"""(weight, low, high) of output tokens, uniform within a band: mostly short chat
answers, a quarter medium, one in twenty long. The long band dominates p99."""


def draw_output(rng: random.Random, mix: tuple[tuple[float, int, int], ...] = OUTPUT_MIX) -> int:
    u = rng.random()
    for weight, low, high in mix:
        if u < weight:
            return rng.randint(low, high)
        u -= weight
    _, low, high = mix[-1]
    return rng.randint(low, high)


def coarse_mix(coarsen: int) -> tuple[tuple[float, int, int], ...]:
    """OUTPUT_MIX in tokens `coarsen` times longer: each band's ends divided, rounded up.

    With the nodes' TPOT multiplied by `coarsen` (NodeModel.coarsened), a request
    decodes for about as long, in `coarsen` times fewer steps: fewer timer wake-ups
    per second, so a time-scaled run keeps each step long against timer overshoot.
    """
    return tuple((w, -(-low // coarsen), -(-high // coarsen)) for w, low, high in OUTPUT_MIX)


def mean_output(mix: tuple[tuple[float, int, int], ...] = OUTPUT_MIX) -> float:
    """Exact mean of `draw_output` (uniform integers in each band)."""
    return sum(w * (low + high) / 2 for w, low, high in mix) / sum(w for w, _, _ in mix)


def _corpus(size: int = 1 << 16) -> tuple[str, ...]:
    rng = random.Random("corpus")
    return tuple(rng.choice(("lorem", "ipsum", "dolor", "sit", "amet")) for _ in range(size))


_CORPUS = _corpus()


def _words(rng: random.Random, count: int) -> str:
    """`count` filler words: a slice of a fixed corpus at a random offset (one draw, fast)."""
    start = rng.randrange(len(_CORPUS) - count)
    return " ".join(_CORPUS[start : start + count])


def chat_request(rng: random.Random, seed: int, index: int) -> tuple[str, str]:
    """(system, user) of the plain chat mix: a unique prompt, 20-1500 words.

    Log-normal length (median about 150 words): the unique head makes every
    64-character block distinct, so this mix never hits the prefix cache.
    """
    words = min(1500, max(20, int(rng.lognormvariate(5.0, 0.8))))
    return "", f"request {seed}-{index}: {_words(rng, words)}"


@dataclass
class _Session:
    system: str
    history: list[tuple[str, str]]


PREFIX_SESSIONS = 48
"""Conversations of the prefix mix. With about 2,000 prompt tokens each, their working
set (~100k tokens) is larger than one node's prefix cache (4,096 blocks = 65k tokens)
but fits in three: routing decides whether a node keeps its conversations cached."""


def _prefix_sessions(rng: random.Random, count: int) -> list[_Session]:
    """Long system prompts (about 1,500 tokens each), one per conversation."""
    return [_Session(f"assistant {s} policy: " + _words(rng, 1000), []) for s in range(count)]


def prefix_request(
    rng: random.Random, sessions: list[_Session], turns: int
) -> tuple[str, tuple[tuple[str, str], ...], str]:
    """(system, history, user) of the prefix-heavy mix: multi-turn chats.

    A request continues a random conversation: its prompt is the conversation so
    far plus a new question, so it shares every block but the tail with the
    conversation's previous request. After `turns` turns the conversation starts
    over under the same system prompt.
    """
    session = sessions[rng.randrange(len(sessions))]
    if len(session.history) >= turns:
        session.history.clear()
    question = f"question {rng.randrange(10**6)}: " + _words(rng, rng.randint(30, 120))
    history = tuple(session.history)
    session.history.append((question, _words(rng, rng.randint(20, 80))))
    return session.system, history, question


# -- schedules ---------------------------------------------------------------------


def _content(mix: str, seed: int, n: int) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """(system, history, user) of `n` requests of `mix`, from the seed's prompt stream."""
    rng = random.Random(f"{seed}:{mix}:prompts")
    if mix == "chat":
        return [(s, (), u) for s, u in (chat_request(rng, seed, i) for i in range(n))]
    if mix == "prefix":
        sessions = _prefix_sessions(rng, PREFIX_SESSIONS)
        return [prefix_request(rng, sessions, turns=6) for _ in range(n)]
    raise ValueError(f"unknown mix {mix!r}; known: chat, prefix")


def _outputs(mix: str, seed: int, n: int, coarsen: int) -> list[int]:
    rng = random.Random(f"{seed}:{mix}:outputs")
    bands = coarse_mix(coarsen)
    return [draw_output(rng, bands) for _ in range(n)]


def _clients(seed: int, n: int, clients: int) -> list[int]:
    """Which client sends each request: an even random split (independent Poisson streams)."""
    rng = random.Random(f"{seed}:clients")
    return [rng.randrange(clients) for _ in range(n)]


def open_schedule(
    mix: str, seed: int, n: int, rate: float, clients: int = 1, coarsen: int = 1
) -> Schedule:
    """`n` Poisson arrivals at `rate` requests/s, split at random over `clients`."""
    if n < 1 or rate <= 0:
        raise ValueError("need n >= 1 and rate > 0")
    arrivals_rng = random.Random(f"{seed}:arrivals")
    t = 0.0
    arrivals = []
    for _ in range(n):
        t += arrivals_rng.expovariate(1.0)
        arrivals.append(t / rate)
    content = _content(mix, seed, n)
    outputs = _outputs(mix, seed, n, coarsen)
    owners = _clients(seed, n, clients)
    requests = tuple(Request(i, owners[i], arrivals[i], *content[i], outputs[i]) for i in range(n))
    return Schedule(mix, seed, "open", clients, requests, rate=rate)


def closed_schedule(
    mix: str, seed: int, n: int, concurrency: tuple[int, ...], coarsen: int = 1
) -> Schedule:
    """Closed loop: client c keeps `concurrency[c]` in flight; client 0 sends `n` requests.

    Every other client gets `n` requests too (it never runs out before client 0 is
    done; what it has not sent by then is never sent).
    """
    clients = len(concurrency)
    content = _content(mix, seed, n * clients)
    outputs = _outputs(mix, seed, n * clients, coarsen)
    requests = tuple(
        Request(i, i % clients, 0.0, *content[i], outputs[i]) for i in range(n * clients)
    )
    return Schedule(mix, seed, "closed", clients, requests, concurrency=concurrency)


# -- the cost of a request on a node, for capacity -----------------------------------


@dataclass(frozen=True, slots=True)
class MixMeans:
    """Mean prompt tokens and mean output tokens of a mix (fixed, seed-independent)."""

    prompt_tokens: float
    output_tokens: float


@functools.cache
def mix_means(mix: str, coarsen: int = 1, sample: int = 4000) -> MixMeans:
    """Means from a fixed large sample (seed -1), so capacity is one number per mix."""
    content = _content(mix, -1, sample)
    prompts = [count_tokens(Request(0, 0, 0.0, s, h, u, 1).sim_prompt()) for s, h, u in content]
    return MixMeans(math.fsum(prompts) / len(prompts), mean_output(coarse_mix(coarsen)))
