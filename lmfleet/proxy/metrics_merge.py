"""One `/metrics` for the proxy when it runs as several workers (`--workers N`).

The worker that is scraped gathers every other worker's text (lmfleet/proxy/hub.py)
and answers their sum, as Prometheus' multiprocess mode would: counters and
histograms add up (requests, errors, latencies), and so do the gauges that count
what is in flight or waiting; every other gauge (a node's state, its version, its
error rate) is the answering worker's own view, which the shared facts keep equal
where it is decided. `lmfleet_proxy_workers` says how many workers answered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

SUMMED_GAUGES = frozenset(
    {"lmfleet_node_inflight", "lmfleet_proxy_inflight", "lmfleet_requests_waiting"}
)
"""Gauges that count across workers: what each holds adds up to the proxy's."""
_FIRST_ONLY = ("_created",)


def merge(texts: Sequence[str]) -> bytes:
    """The Prometheus text of `texts` merged (the first is the answering worker's)."""
    order: list[str] = []
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for position, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                order.append(family.name)
                families[family.name] = (family.type, family.documentation, {})
            kind, _, samples = families[family.name]
            summed = kind in ("counter", "histogram", "summary") or family.name in SUMMED_GAUGES
            for row in family.samples:
                key = (row.name, tuple(sorted(row.labels.items())))
                if key not in samples:
                    samples[key] = row.value
                elif summed and not row.name.endswith(_FIRST_ONLY) and position:
                    samples[key] += row.value
    lines = [
        "# HELP lmfleet_proxy_workers workers whose metrics this answer adds up",
        "# TYPE lmfleet_proxy_workers gauge",
        f"lmfleet_proxy_workers {len(texts)}",
    ]
    for name in order:
        kind, documentation, samples = families[name]
        lines.append(f"# HELP {name} {_escape_help(documentation)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample, labels), value in samples.items():
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(
                f"{sample}{{{shown}}} {_number(value)}" if shown else f"{sample} {_number(value)}"
            )
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
