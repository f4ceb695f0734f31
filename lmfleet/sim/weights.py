"""What the emulated node remembers about weight updates, readable at GET /sim/stats.

The simulator cannot load tensors, so it keeps what a test needs to check that a
fleet drove an update correctly instead:

- `buckets`: update bodies accepted since the last finished update;
- `digest`: crc32 chained over their payloads, in order (`payload_digest` computes
  the same value from the bodies a test sent), so a lost, repeated or reordered
  bucket shows;
- `updates` / `version`: finished updates (`version` survives /sim/stats/reset;
  LMDeploy reports no version, this is the simulator's own);
- `updated_while_serving`: finished updates while the KV cache was awake, i.e. the
  node could serve requests with half-loaded weights: a lifecycle mistake;
- `groups`: open weight-update groups (/init_weights_update_group);
- `admin_calls`: the last `ADMIN_LOG_SIZE` lifecycle and weight calls, in order, as
  `"POST /sleep?level=1"`, `"POST /update_weights finished"` (query as received).

State only, no I/O (plus the lock that serializes the group routes, as LMDeploy's
engine does): the routes are in weight_routes.py.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ADMIN_LOG_SIZE = 200


def payload_bytes(payload: Any) -> bytes:
    """The bytes a payload contributes to the digest: a str as UTF-8, anything
    else as compact JSON with sorted keys (independent of how a client ordered it)."""
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def payload_digest(payloads: Iterable[Any], start: int = 0) -> str:
    """The `digest` the node reports after receiving `payloads` in this order."""
    crc = start
    for payload in payloads:
        crc = zlib.crc32(payload_bytes(payload), crc)
    return f"{crc:08x}"


def call_line(scope: Mapping[str, Any], suffix: str = "") -> str:
    """`"POST /sleep?level=1"`: one admin_calls entry for the request in `scope`."""
    query = scope.get("query_string", b"").decode("latin-1")
    line = f"{scope['method']} {scope['path']}" + (f"?{query}" if query else "")
    return f"{line} {suffix}" if suffix else line


@dataclass
class Group:
    """One weight-update group as /init_weights_update_group declared it."""

    name: str
    world_size: int
    rank_offset: int
    master_address: str
    master_port: int
    backend: str


@dataclass
class WeightLedger:
    """The weight-update accounting of one node."""

    updates: int = 0
    buckets: int = 0
    crc: int = 0
    last_digest: str | None = None
    version: int = 0
    weight_version: str = "default"
    """The version the engine reports (vLLM `/weight_info`, SGLang `/model_info`),
    as the last finished update named it; LMDeploy reports none."""
    updated_while_serving: int = 0
    groups: dict[str, Group] = field(default_factory=dict)
    admin_calls: deque[str] = field(default_factory=lambda: deque(maxlen=ADMIN_LOG_SIZE))
    # LMDeploy's engine runs the group routes one at a time (_run_weights_update).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @property
    def digest(self) -> str:
        return f"{self.crc:08x}"

    def record_call(self, line: str) -> None:
        self.admin_calls.append(line)

    def add_bucket(self, payload: Any) -> None:
        """One accepted body: count it and chain its payload into the digest."""
        self.buckets += 1
        self.crc = zlib.crc32(payload_bytes(payload), self.crc)

    def finish(self, *, serving: bool, weight_version: str | None = None) -> None:
        """A finished update: the buckets so far are the new weights.

        `serving`: the KV cache was awake, so requests could have run meanwhile.
        `weight_version`: the version the update named (vLLM, SGLang), if any.
        """
        if weight_version is not None:
            self.weight_version = weight_version
        self.updates += 1
        self.version += 1
        self.updated_while_serving += serving
        self.last_digest = self.digest
        self.buckets = 0
        self.crc = 0

    def reset(self) -> None:
        """Zero the counters and the update in progress; keep what describes the
        loaded weights (`version`, `last_digest`) and the open groups."""
        self.updates = self.buckets = self.crc = self.updated_while_serving = 0
        self.admin_calls.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "buckets": self.buckets,
            "digest": self.digest,
            "last_digest": self.last_digest,
            "groups": sorted(self.groups),
            "version": self.version,
            "weight_version": self.weight_version,
            "updated_while_serving": self.updated_while_serving,
        }
