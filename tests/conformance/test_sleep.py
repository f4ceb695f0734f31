"""Sleep, wakeup (levels, tags), the 503 gate, /health lagging a sleep, and abort
on sleep: the same script runs against the real LMDeploy and the simulator, and
what each step observed must match.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx2
import pytest
from conformance.differences import unexplained
from conformance.peer_support import API_KEY, POLL_INTERVAL
from conformance.shapes import shape_diff
from support import wait_until

from lmfleet.node.load import METRICS_PATH, READ, parse_metrics

JSON = {"content-type": "application/json"}
KEY = {"authorization": f"Bearer {API_KEY}"}


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello world"}], **extra}


def observe(response: httpx2.Response) -> tuple[int, str, Any]:
    media = response.headers.get("content-type", "").split(";")[0]
    body: Any = response.json() if media == "application/json" and response.content else None
    return response.status_code, media, body


def wait_health(client: httpx2.Client, url: str, want: str) -> list[tuple[int, str]]:
    """Poll /health until it says `want`; every answer seen on the way."""
    seen: list[tuple[int, str]] = []

    def health() -> list[tuple[int, str]]:
        response = client.get(url + "/health")
        seen.append((response.status_code, response.json()["status"]))
        return seen[-5:]

    wait_until(
        health,
        3 * POLL_INTERVAL + 2,
        f"{url}/health to say {want!r}",
        until=lambda recent: recent[-1][1] == want,
        step=0.1,
    )
    return seen


def sleep_script(url: str, model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx2.Client(timeout=30) as c:
        post = lambda path, **kw: c.post(url + path, **kw)  # noqa: E731
        out["sleep"] = observe(post("/sleep?level=1", headers={**JSON, **KEY}))
        out["is_sleeping"] = observe(c.get(url + "/is_sleeping", headers=KEY))
        out["chat"] = observe(post("/v1/chat/completions", json=chat_body(model), headers=KEY))
        out["chat_no_key"] = observe(post("/v1/chat/completions", json=chat_body(model)))
        out["completions"] = observe(
            post("/v1/completions", json={"model": model, "prompt": "hi"}, headers=KEY)
        )
        out["generate"] = observe(post("/generate", json={"prompt": "hi"}, headers=KEY))
        out["models"] = observe(c.get(url + "/v1/models", headers=KEY))
        out["encode"] = observe(post("/v1/encode", json={"input": "hi"}, headers=KEY))
        seen = wait_health(c, url, "sleeping")
        out["health_codes"] = sorted({code for code, _ in seen})
        out["health_sleeping"] = observe(c.get(url + "/health"))
        out["wake_weights"] = observe(post("/wakeup?tags=weights", headers={**JSON, **KEY}))
        out["after_weights"] = observe(c.get(url + "/is_sleeping", headers=KEY))
        out["chat_after_weights"] = observe(
            post("/v1/chat/completions", json=chat_body(model), headers=KEY)
        )
        out["wake_kv"] = observe(post("/wakeup?tags=kv_cache", headers={**JSON, **KEY}))
        out["after_kv"] = observe(c.get(url + "/is_sleeping", headers=KEY))
        out["chat_awake"] = observe(
            post("/v1/chat/completions", json=chat_body(model), headers=KEY)
        )
        out["health_back"] = wait_health(c, url, "healthy")[-1]
        out["sleep_2"] = observe(post("/sleep?level=2", headers={**JSON, **KEY}))
        out["asleep_2"] = observe(c.get(url + "/is_sleeping", headers=KEY))
        out["wake_all"] = observe(post("/wakeup", headers={**JSON, **KEY}))
        out["awake_2"] = observe(c.get(url + "/is_sleeping", headers=KEY))
        wait_health(c, url, "healthy")
    return out


def compare_records(name: str, real: dict[str, Any], sim: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for step, value in real.items():
        other = sim[step]
        if isinstance(value, tuple) and len(value) == 3:
            if value[:2] != other[:2]:
                problems.append(f"{step}: real {value[:2]}, sim {other[:2]}")
            problems += [f"{step} {d}" for d in shape_diff(value[2], other[2])]
            mine, theirs = value[2], other[2]
            if (
                isinstance(mine, dict)
                and isinstance(theirs, dict)
                and value[0] >= 400
                and mine.get("message") != theirs.get("message")
            ):
                problems.append(
                    f"{step}: message real {mine.get('message')!r}, sim {theirs.get('message')!r}"
                )
        elif value != other:
            problems.append(f"{step}: real {value!r}, sim {other!r}")
    return unexplained(name, problems)


def test_sleep_wakeup_levels_tags_and_gate(pair) -> None:
    real = sleep_script(pair.real.url, pair.model)
    sim = sleep_script(pair.sim.url, pair.model)
    assert real["sleep"][:2] == (200, "") and real["is_sleeping"][2] == {"is_sleeping": True}
    assert real["chat"][0] == 503 and real["chat_no_key"][0] == 503  # the gate is outermost
    assert real["health_codes"] == [200]  # healthy, then sleeping: never 503
    problems = compare_records("sleep", real, sim)
    assert not problems, "\n".join(problems)


def abort_script(url: str, model: str) -> dict[str, Any]:
    """A stream and a plain request in flight, then /sleep: both end with "abort"."""
    out: dict[str, Any] = {}
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = chat_body(
            model,
            stream=True,
            max_tokens=400,
            ignore_eos=True,
            stream_options={"include_usage": True},
        )
        with (
            httpx2.Client(timeout=30) as c,
            c.stream("POST", url + "/v1/chat/completions", json=body, headers=KEY) as r,
        ):
            out["stream_status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) >= 3:
                        started.set()

    def plain() -> None:
        body = chat_body(model, max_tokens=400, ignore_eos=True)
        with httpx2.Client(timeout=30) as c:
            out["plain"] = observe(c.post(url + "/v1/chat/completions", json=body, headers=KEY))

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    assert started.wait(20), f"{url}: the stream never started"
    # Kept: a head start for the plain request. Nothing shows it in flight on both
    # servers: real LMDeploy's lmdeploy:num_requests_running stays 0 here (stub engine).
    time.sleep(0.2)
    with httpx2.Client(timeout=30) as c:
        out["sleep"] = observe(c.post(url + "/sleep?level=1", headers={**JSON, **KEY}))
        for t in threads:
            t.join(30)
        out["wake"] = observe(c.post(url + "/wakeup", headers={**JSON, **KEY}))
        wait_health(c, url, "healthy")

    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    out["done_last"] = lines[-1] == "data: [DONE]"
    reasons = [ch["choices"][0].get("finish_reason") for ch in chunks if ch["choices"]]
    out["stream_finish"] = [r for r in reasons if r]
    out["usage_last"] = chunks[-1].get("usage") is not None and not chunks[-1]["choices"]
    out["abort_chunk_shape"] = next(
        ch for ch in chunks if ch["choices"] and ch["choices"][0].get("finish_reason")
    )
    out["plain_finish"] = out["plain"][2]["choices"][0]["finish_reason"]
    return out


def test_sleep_aborts_in_flight_requests(pair) -> None:
    real = abort_script(pair.real.url, pair.model)
    sim = abort_script(pair.sim.url, pair.model)
    assert real["stream_status"] == 200 and real["stream_finish"] == ["abort"]
    assert real["plain"][0] == 200 and real["plain_finish"] == "abort"
    assert real["done_last"] and real["usage_last"]
    problems = compare_records(
        "abort",
        {k: v for k, v in real.items() if k != "abort_chunk_shape"},
        {k: v for k, v in sim.items() if k != "abort_chunk_shape"},
    )
    problems += unexplained(
        "abort",
        [
            f"abort-chunk {d}"
            for d in shape_diff(real["abort_chunk_shape"], sim["abort_chunk_shape"])
        ],
    )
    assert not problems, "\n".join(problems)


def test_proxy_url_registration(pair) -> None:
    """Same body, sent once, before the port opens (LMDeploy also sends Content-Type)."""
    real = pair.proxy.wait_for(pair.real.port)
    sim = pair.proxy.wait_for(pair.sim.port)
    assert real.body == {"url": pair.real.url, "status": {"models": [pair.model], "role": 1}}
    assert sim.body == {"url": pair.sim.url, "status": {"models": [pair.model], "role": 1}}
    assert (real.port_open, sim.port_open) == (False, False)
    assert real.headers.get("content-type") == sim.headers.get("content-type") == "application/json"
    urls = [r.body["url"] for r in pair.proxy.seen]
    assert urls.count(pair.real.url) == urls.count(pair.sim.url) == 1


TELEMETRY = tuple("lmdeploy:" + name for name in READ)
"""What lmfleet/node/load.py reads: every name must be the real server's."""


@pytest.mark.parametrize("path", ["/metrics", METRICS_PATH])
def test_metrics_gauges(pair, path: str) -> None:
    """The names the monitor reads, from the whole answer and from the filtered one
    it asks for every round (`name[]`: the asked samples and nothing else)."""
    for server in pair.servers():
        response = httpx2.get(server.url + path, headers=KEY, timeout=10)
        assert response.status_code == 200, server.kind
        missing = [name for name in TELEMETRY if name + "{" not in response.text]
        assert not missing, f"{server.kind} /metrics lacks {missing}"
        load = parse_metrics(response.content)
        assert load is not None, server.kind
        assert load.outstanding >= 0 and load.prompt_tokens is not None, (server.kind, load)
        if path != "/metrics":
            names = {
                line.split("{")[0].split(" ")[0]
                for line in response.text.splitlines()
                if line and not line.startswith("#")
            }
            assert names == set(TELEMETRY), (server.kind, names - set(TELEMETRY))
