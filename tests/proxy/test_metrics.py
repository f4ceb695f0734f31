"""`/metrics` and the docs agree: every metric name the docs give is one the proxy serves.

The served names are read from a real proxy's `/metrics` after traffic (so every
labelled metric has a sample), as Prometheus sees them: a counter is queried as
`NAME_total`, a histogram by its family name (`_bucket`, `_sum`, `_count`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx2
import openai
from prometheus_client.parser import text_string_to_metric_families
from support import chat

from lmfleet import LMFleet
from lmfleet.proxy import ProxyServer

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = sorted([*DOCS.glob("*.md"), *(DOCS / "guide").glob("*.md")])
METRICS_PAGE = DOCS / "proxy.md"
"""The page that lists every metric."""
NAME = re.compile(r"\blmfleet_(?!priority\b)[a-z_]+")
"""A metric's name in the docs; `lmfleet_priority` is a request's body field
(lmfleet/priority.py), not a metric."""
KEY = "sk-client"


def served_metrics(url: str) -> tuple[set[str], set[str]]:
    """(every name a query may use, the name each family is documented by)."""
    text = httpx2.get(url + "/metrics", timeout=5).text
    queryable: set[str] = set()
    documented: set[str] = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("lmfleet_"):
            continue
        queryable |= {sample.name for sample in family.samples}
        if family.type in ("histogram", "summary"):
            queryable.add(family.name)
            documented.add(family.name)
        elif family.type == "counter":
            documented.add(family.name + "_total")
        elif not family.name.endswith("_created"):  # prometheus_client's own companions
            documented.add(family.name)
    return queryable, documented


WORKERS_ONLY = {"lmfleet_proxy_workers", "lmfleet_proxy_worker_requests_total"}
"""Served by `lmfleet serve --workers N` only (tests/cli/test_serve_workers.py reads them)."""


def test_every_metric_the_docs_name_is_served(
    serve_fleet: Callable[..., tuple[LMFleet, ProxyServer]], two_nodes: list[str]
) -> None:
    _, server = serve_fleet(two_nodes, serve={"api_keys": [KEY]})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    for _ in chat(client, "internlm/internlm2_5-7b-chat", "hi", max_tokens=4, stream=True):
        pass  # latency and TTFT samples, one request counted
    assert httpx2.get(server.url + "/v1/models", timeout=5).status_code == 401  # one error
    queryable, documented = served_metrics(server.url)
    assert "lmfleet_node_errors_total" in queryable  # the parse saw the node families

    named = {name: page for page in PAGES for name in NAME.findall(page.read_text())}
    assert named, "no metric name found in the docs: the pattern broke"
    unknown = {name: page.relative_to(DOCS).as_posix() for name, page in named.items()}
    unknown = {
        name: page
        for name, page in unknown.items()
        if name not in queryable and name not in WORKERS_ONLY
    }
    assert not unknown, f"docs name metrics /metrics does not serve: {unknown}"
    # And the metrics page lists every one the proxy serves.
    listed = set(NAME.findall(METRICS_PAGE.read_text()))
    assert not documented - listed, f"not in docs/proxy.md: {sorted(documented - listed)}"
