"""The 2 prefill + 2 decode simulator set shared by the DistServe tests."""

from __future__ import annotations

from dataclasses import dataclass

from support import sim_stats

FAST = ("--fast", "--health-poll-interval", "0.2")
ROLES = ("prefill", "prefill", "decode", "decode")


@dataclass
class PD:
    """Four running sims: their URLs and roles, and their DistServe counters."""

    urls: list[str]
    roles: list[str]

    def of(self, role: str) -> list[str]:
        return [u for u, r in zip(self.urls, self.roles, strict=True) if r == role]

    def stats(self, role: str) -> list[dict[str, int]]:
        return [sim_stats(u)["distserve"] for u in self.of(role)]
