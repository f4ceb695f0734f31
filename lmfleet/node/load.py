"""What a node says about its own load: its engine's Prometheus `/metrics`, parsed.

A client sees only its own requests; a node serving several clients (notebooks, an
eval job, a proxy replica) is busier than any one of them knows. LMDeploy 0.18's
api_server exports, per engine (`{engine="0",model_name="..."}`), the gauges
`lmdeploy:num_requests_running`, `num_requests_waiting` (in the engine),
`num_api_requests_waiting` (in the api server, waiting for a request handle) and
`num_api_requests_routed`, `gpu_cache_usage_perc`, `prefix_cache_hit_rate`, and
the counters `prompt_tokens_total` and `generation_tokens_total`. vLLM and SGLang
export the same counts under their own names (`MetricNames`, one per engine
profile: lmfleet/node/profile.py).

The gauges lag the engine (they are set once per scheduling step, and a read can
still count requests that have finished), and every report already includes this
process's requests of that moment. So a report is kept with the local in-flight
count at the time of the read, and `NodeLoad.others` is what *other* clients had
on the node then, trusted fully for `fresh_for` seconds and less after that.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import urlencode

FIELDS = (
    "running",
    "waiting",
    "api_waiting",
    "api_routed",
    "cache_usage",
    "prefix_hit_rate",
    "prompt_tokens",
    "generation_tokens",
)
"""What `NodeLoad` reads from a report, whatever the engine calls it."""

_RATIOS = frozenset({"cache_usage", "prefix_hit_rate"})
"""Per-engine fractions: averaged over engines. Everything else is summed."""


class MetricNames:
    """One engine's Prometheus names for the `NodeLoad` fields, and how to ask for them.

    `names` maps a field of `FIELDS` to the sample name after `prefix` (LMDeploy
    `lmdeploy:num_requests_running`, vLLM `vllm:num_requests_running`, SGLang
    `sglang:num_running_reqs`); a field the engine does not export is left out and
    stays None in its reports. Built once per engine (`node/profile.py`).
    """

    __slots__ = ("_fields", "_sample", "names", "path", "prefix")

    def __init__(self, prefix: str, names: dict[str, str]) -> None:
        if unknown := names.keys() - set(FIELDS):
            raise ValueError(f"not NodeLoad fields: {sorted(unknown)}")
        self.prefix = prefix
        self.names = dict(names)
        self._fields = {sample: name for name, sample in names.items()}
        self.path = "/metrics?" + urlencode(
            [("name[]", prefix + sample) for sample in names.values()], safe=":"
        )
        """`/metrics` asking for those samples alone. LMDeploy, vLLM and SGLang
        serve `/metrics` with prometheus_client, which answers `name[]` with just
        the named samples: ~1 KB instead of ~10 KB (mostly latency histograms), so
        the monitor reads and parses a tenth of the bytes every round. A server
        that ignores the filter answers everything, which parses the same."""
        alternatives = "|".join(re.escape(sample) for sample in names.values())
        self._sample = re.compile(
            rb"\n" + re.escape(prefix.encode()) + rb"(" + alternatives.encode() + rb")"
            rb"(?:\{[^}\n]*\})?[ \t]+(\S+)"
        )
        """One sample line of a metric we read; labels (engines, ranks, model names)
        are ignored. It starts with a literal (a newline and the prefix), not with
        `^` in multi-line mode: `re` then jumps from candidate to candidate instead
        of trying every position, which makes a real ~10 KB answer (mostly
        histograms and process metrics) about seven times cheaper to read."""

    @property
    def samples(self) -> tuple[str, ...]:
        """The full sample names read (prefix included)."""
        return tuple(self.prefix + sample for sample in self.names.values())

    def sums(self, text: bytes) -> dict[str, float] | None:
        """Each field's value in `text`: counts summed over the engine's series (its
        data-parallel ranks), fractions averaged; None when it has neither queue
        gauge (not this engine's `/metrics`, or not metrics at all)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        fields = self._fields
        for name_bytes, value_bytes in self._sample.findall(b"\n" + text):
            try:
                value = float(value_bytes)
            except ValueError:
                continue
            if math.isnan(value):
                continue
            name = fields[name_bytes.decode()]
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
        if "running" not in sums and "waiting" not in sums:
            return None
        for name in _RATIOS & sums.keys():
            sums[name] /= counts[name]
        return sums


LMDEPLOY_METRICS = MetricNames(
    "lmdeploy:",
    {
        "running": "num_requests_running",
        "waiting": "num_requests_waiting",
        "api_waiting": "num_api_requests_waiting",
        "api_routed": "num_api_requests_routed",
        "cache_usage": "gpu_cache_usage_perc",
        "prefix_hit_rate": "prefix_cache_hit_rate",
        "prompt_tokens": "prompt_tokens_total",
        "generation_tokens": "generation_tokens_total",
    },
)
"""LMDeploy 0.18 (lmdeploy/metrics/loggers.py; the conformance suite checks them
against the real api_server)."""

READ = tuple(LMDEPLOY_METRICS.names.values())
"""LMDeploy's samples read, after the `lmdeploy:` prefix."""

METRICS_PATH = LMDEPLOY_METRICS.path
"""LMDeploy's filtered `/metrics` (`MetricNames.path`)."""


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """One read of a node's `/metrics`, with what this process had on it at that time.

    Counts are summed over the node's engines (data-parallel ranks); the two
    fractions are averaged. A metric the node does not export is None.
    """

    running: float
    waiting: float
    api_waiting: float | None = None
    api_routed: float | None = None
    cache_usage: float | None = None
    prefix_hit_rate: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    read_at: float = 0.0
    """`time.monotonic()` when the answer arrived."""
    local_inflight: int = 0
    """This process's requests in flight on the node when the answer arrived."""
    peer_inflight: int = 0
    """Its peers' (`NodeState.peers`) at that time: they are counted as shared, not
    from the report, so that they are current."""
    fresh_for: float = 2.0
    """Seconds the report is trusted fully (the monitor's interval); it fades after."""
    pace: float | None = None
    """Seconds per generated token per sequence in the batch, over the recent reports
    (`_pace`): the node's own speed as it runs now, without its queue."""
    busy_seconds: float = 0.0
    """Sequence-seconds in the batch over the recent reports (faded sum)."""
    paced_tokens: float = 0.0
    """Tokens generated over the recent reports (faded sum, same half-life)."""

    @property
    def outstanding(self) -> float:
        """Requests the node holds: in its engine, and waiting in its api server."""
        return self.running + self.waiting + (self.api_waiting or 0.0)

    def others(self, now: float) -> float:
        """Other clients' requests on the node (neither ours nor our peers'), as of
        this report, faded with its age.

        Fully trusted for `fresh_for` seconds, then halved every `fresh_for` seconds:
        a node that stopped answering `/metrics` slowly becomes "only what we know".
        """
        theirs = max(0.0, self.outstanding - self.local_inflight - self.peer_inflight)
        age = now - self.read_at
        if age <= self.fresh_for or theirs == 0.0:
            return theirs
        halvings = (age - self.fresh_for) / max(self.fresh_for, 1e-3)
        return theirs * math.pow(0.5, halvings)


def report_of(load: NodeLoad) -> dict[str, float]:
    """The `FIELDS` a report gave (`load_of` makes the same load of them again)."""
    return {name: value for name in FIELDS if (value := getattr(load, name)) is not None}


def parse_metrics(
    text: bytes,
    *,
    read_at: float = 0.0,
    local_inflight: int = 0,
    peer_inflight: int = 0,
    fresh_for: float = 2.0,
    previous: NodeLoad | None = None,
    names: MetricNames = LMDEPLOY_METRICS,
) -> NodeLoad | None:
    """The node's load from Prometheus text in its engine's `names`; None when it
    exports no queue gauge.

    `previous`, the node's last report, gives the pace (`_pace`)."""
    sums = names.sums(text)
    if sums is None:
        return None
    return load_of(
        sums,
        read_at=read_at,
        local_inflight=local_inflight,
        peer_inflight=peer_inflight,
        fresh_for=fresh_for,
        previous=previous,
    )


def load_of(
    sums: dict[str, float],
    *,
    read_at: float,
    local_inflight: int = 0,
    peer_inflight: int = 0,
    fresh_for: float = 2.0,
    previous: NodeLoad | None = None,
) -> NodeLoad:
    """The `NodeLoad` of one report's `FIELDS` (`MetricNames.sums`): read here, or by
    another worker of this proxy and shared (lmfleet/proxy/shared.py), in which
    case the pace is still this process's, from its own `previous`."""
    running = sums.get("running", 0.0)
    generated = sums.get("generation_tokens")
    pace, busy, made = _pace(read_at, running, generated, previous)
    return NodeLoad(
        running=running,
        waiting=sums.get("waiting", 0.0),
        api_waiting=sums.get("api_waiting"),
        api_routed=sums.get("api_routed"),
        cache_usage=sums.get("cache_usage"),
        prefix_hit_rate=sums.get("prefix_hit_rate"),
        prompt_tokens=sums.get("prompt_tokens"),
        generation_tokens=generated,
        read_at=read_at,
        local_inflight=local_inflight,
        peer_inflight=peer_inflight,
        fresh_for=fresh_for,
        pace=pace,
        busy_seconds=busy,
        paced_tokens=made,
    )


PACE_HALF_LIFE = 2.0
"""Seconds after which a report's tokens and batch time count half in the pace."""

PACE_MIN_TOKENS = 16.0
"""Tokens (decayed) needed before a pace is given: fewer say more about noise."""


def _pace(
    read_at: float, running: float, generated: float | None, old: NodeLoad | None
) -> tuple[float | None, float, float]:
    """The node's decode pace, from the tokens it generated since `old`:
    (`pace`, `busy_seconds`, `paced_tokens`) of the new report.

    A node's latency as a client sees it includes its queue, so it says "slow" about
    a fast node that is busy. Its generation counter and running gauge do not: the
    generated tokens divided into the sequence-seconds spent in the batch (running
    averaged over the two reads) is the seconds one sequence takes per token there
    now, batch slow-down included, queue excluded. Both sums fade with a half-life
    of `PACE_HALF_LIFE` seconds; a counter that went backwards (a restart) keeps
    the last pace. Until `PACE_MIN_TOKENS` have been seen the last pace (or None)
    stands.
    """
    if old is None or generated is None or old.generation_tokens is None:
        return None, 0.0, 0.0
    elapsed = read_at - old.read_at
    tokens = generated - old.generation_tokens
    if elapsed <= 0.0 or tokens < 0.0:
        return old.pace, 0.0, 0.0
    fade = math.pow(0.5, elapsed / PACE_HALF_LIFE)
    busy = fade * old.busy_seconds + elapsed * (old.running + running) / 2.0
    made = fade * old.paced_tokens + tokens
    pace = busy / made if made >= PACE_MIN_TOKENS and busy > 0.0 else old.pace
    return pace, busy, made


def next_capacity(old: float | None, load: NodeLoad | None) -> float | None:
    """The node's batch capacity after `load`: the requests it ran while others waited
    in its engine (its batch was full), or more when it runs more without a queue;
    `old` when the report says neither."""
    if load is None:
        return old
    if load.waiting > 0 and load.running > 0:
        return load.running
    if old is not None and load.running > old:
        return load.running
    return old
