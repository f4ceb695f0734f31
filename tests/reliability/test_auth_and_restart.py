"""Auth on every proxy route, node keys that never leak, a proxy restarted under running
nodes, and nothing left behind (threads, sockets, processes) after a fleet closes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx2
import openai
import psutil
import pytest
from support import StartSim, chat, wait_until

from lmfleet import LMFleet, NoHealthyNodeError
from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port
from lmfleet.proxy import ProxyOptions, ProxyServer
from lmfleet.proxy.app import ROUTES
from lmfleet.proxy.options import DEFAULT_PUBLIC_PATHS

Served = tuple[LMFleet, ProxyServer]
QUICK = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"
NODE_KEY = "node-secret-5f1c"


def test_client_keys_on_every_route_and_admin_keys_for_registration(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    node = start_sim(*QUICK).url
    options = ProxyOptions(api_keys=("client-k",), admin_keys=("admin-k",))
    _, server = serve_fleet([node], serve={"options": options})
    client_auth = {"authorization": "Bearer client-k"}
    admin_auth = {"authorization": "Bearer admin-k"}
    for path, methods in [*ROUTES.items(), ("/v1/chat/completions", {"POST": None})]:
        for method in methods:
            anonymous = httpx2.request(method, server.url + path, timeout=10)
            if path in DEFAULT_PUBLIC_PATHS:  # probes and scrapes: /health, /liveness, ...
                assert anonymous.status_code == 200, path
                continue
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            assert anonymous.json()["message"] == "Unauthorized."
            if path.startswith(("/nodes/", "/fleet/")):
                with_client_key = httpx2.request(method, server.url + path, headers=client_auth)
                assert with_client_key.status_code == 401, path  # clients cannot administer
    intruder = {"url": f"http://127.0.0.1:{free_port()}", "status": {"models": [MODEL]}}
    refused = httpx2.post(server.url + "/nodes/add", json=intruder, headers=client_auth)
    assert refused.status_code == 401
    accepted = httpx2.post(server.url + "/nodes/add", json=intruder, headers=admin_auth)
    assert accepted.status_code == 200
    reply = openai.OpenAI(base_url=server.url + "/v1", api_key="client-k", max_retries=0)
    assert chat(reply, MODEL, "authorised", max_tokens=1).choices


def test_node_keys_never_leak(
    serve_fleet: Callable[..., Served], start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = start_sim(*QUICK, "--api-keys", NODE_KEY).url
    fleet, server = serve_fleet([node], api_key=NODE_KEY, wait_for_node=0.3)
    chat(fleet.client(), MODEL, "routed", max_tokens=1)
    seen = [
        repr(fleet),
        fleet.status().model_dump_json(),
        repr(fleet.registry.snapshot()),
        fleet._repr_html_(),
        httpx2.get(server.url + "/nodes/status").text,
        httpx2.get(server.url + "/fleet/status").text,
        httpx2.get(server.url + "/metrics").text,
        httpx2.get(server.url + "/health").text,
        httpx2.post(server.url + "/v1/chat/completions", json={"model": "x"}).text,
    ]
    fleet.sleep(nodes=[node])
    with pytest.raises(NoHealthyNodeError) as caught:
        chat(fleet.client(max_retries=0), MODEL, "nobody awake", max_tokens=1)
    seen += [str(caught.value), httpx2.post(server.url + "/v1/completions").text]
    seen += [record.getMessage() for record in caplog.records]
    for text in seen:
        assert NODE_KEY not in text


def test_proxy_process_restarted_under_running_nodes(start_sim: StartSim, tmp_path: Path) -> None:
    nodes = [start_sim(*QUICK).url for _ in range(2)]
    port = free_port()
    state = tmp_path / "nodes.json"
    argv = [sys.executable, "-m", "lmfleet.cli", "serve", "--port", str(port)]
    argv += ["--state-file", str(state), "--health-interval", "0.2"]
    url = f"http://127.0.0.1:{port}"

    def start(run: int) -> ManagedProcess:
        proc = ManagedProcess(argv, log_path=tmp_path / f"proxy-{run}.log")
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        return proc

    def served_ok() -> int:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=3)
        return sum(bool(chat(client, MODEL, f"q{i}", max_tokens=1).choices) for i in range(6))

    first = start(1)
    try:
        for node in nodes:
            body = {"url": node, "status": {"models": [MODEL], "role": 1}}
            assert httpx2.post(url + "/nodes/add", json=body).status_code == 200
        assert served_ok() == 6
    finally:
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=20) == 0
    second = start(2)
    try:
        assert sorted(httpx2.get(url + "/nodes/status").json()) == sorted(nodes)
        assert served_ok() == 6  # nodes are back from the state file; nobody re-registered
    finally:
        second.terminate()


def test_a_killed_proxy_restarted_with_the_same_flags_serves_registered_nodes(
    start_sim: StartSim, tmp_path: Path, private_state_dir: Path
) -> None:
    """A node that registered itself once (`--proxy-url`), a proxy SIGKILLed under it and
    started again with the same flags (no state flag at all: the default state
    directory): the node is served again, and it never registered a second time."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "lmfleet.cli", "serve", "--port", str(port)]
    argv += ["--health-interval", "0.2"]

    def start(run: int) -> ManagedProcess:
        proc = ManagedProcess(argv, log_path=tmp_path / f"proxy-{run}.log")
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        return proc

    def served(node: str, text: str) -> None:
        wait_until(
            lambda: httpx2.get(url + "/nodes/status", timeout=10).json(),
            timeout=30,
            until=lambda nodes: nodes.get(node, {}).get("state") == "healthy",
        )
        assert chat(client, MODEL, text, max_tokens=1).choices

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    first = start(1)
    try:
        node = start_sim(*QUICK, "--proxy-url", url).url
        served(node, "before")
        log = first.log_path.read_text()
        assert f"node {node} added (registered itself" in log, log
    finally:
        first.kill()
    kept = private_state_dir / "lmfleet" / f"serve-{port}.json"
    assert node in kept.read_text()
    second = start(2)
    try:
        served(node, "after")
        log = second.log_path.read_text()
        assert f"node {node} added (reloaded from {kept}" in log, log
        assert "1 node(s) reloaded" in log, log
        assert "registered itself" not in log, log  # the node never registered again
        # The banner counts the nodes it serves, the reloaded one included.
        wait_until(second.log_path.read_text, until=lambda log: f"on {url} (1 node(s))" in log)
    finally:
        second.terminate()


def test_self_registration_past_client_keys_is_the_operators_choice(
    start_sim: StartSim, tmp_path: Path
) -> None:
    """`lmdeploy serve proxy --api-keys` lets nodes register keyless (it leaves
    /nodes open); `lmfleet serve --api-keys` does not (a client could register a
    node that steals traffic). The refusal is said in the proxy's log, where the
    operator looks, and `--public-paths ... /nodes/add` opens registration alone."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "lmfleet.cli", "serve", "--port", str(port)]
    argv += ["--api-keys", "team-key", "--disable-cache-status", "--health-interval", "0.2"]
    keyed = {"Authorization": "Bearer team-key"}

    def start(run: int, *flags: str) -> ManagedProcess:
        proc = ManagedProcess([*argv, *flags], log_path=tmp_path / f"proxy-{run}.log")
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        return proc

    closed = start(1)
    try:
        start_sim(*QUICK, "--proxy-url", url)
        said = "POST /nodes/add from 127.0.0.1 refused: no valid key (LMDeploy nodes register"
        wait_until(closed.log_path.read_text, until=lambda log: said in log)
        assert httpx2.get(url + "/nodes/status", headers=keyed, timeout=10).json() == {}
    finally:
        closed.terminate()
    opened = start(2, "--public-paths", "/health", "/readiness", "/metrics", "/nodes/add")
    try:
        node = start_sim(*QUICK, "--proxy-url", url).url
        wait_until(
            lambda: httpx2.get(url + "/nodes/status", headers=keyed, timeout=10).json(),
            timeout=30,
            until=lambda nodes: nodes.get(node, {}).get("state") == "healthy",
        )
        client = openai.OpenAI(base_url=url + "/v1", api_key="team-key", max_retries=0)
        assert chat(client, MODEL, "registered keyless", max_tokens=1).choices
        assert httpx2.get(url + "/v1/models", timeout=10).status_code == 401  # still keyed
        assert httpx2.get(url + "/nodes/status", timeout=10).status_code == 401
    finally:
        opened.terminate()


def test_nothing_left_behind_after_close(start_sim: StartSim) -> None:
    node = start_sim(*QUICK).url
    me = psutil.Process()
    threads, fds = set(threading.enumerate()), me.num_fds()
    children = {p.pid for p in me.children(recursive=True)}  # the sim node only
    for _ in range(3):
        with LMFleet.attach([node], health_interval=0.2) as fleet:
            fleet.wait_ready(timeout=30)
            server = fleet.serve(port=0)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            chat(client, MODEL, "through the proxy", max_tokens=1)
            routed = fleet.client()
            chat(routed, MODEL, "in-process", max_tokens=1)
            routed.close()
            client.close()
    wait_until(
        lambda: set(threading.enumerate()) - threads,
        5,
        "every thread started by the fleets to end",
        until=lambda extra: not extra,
    )
    assert me.num_fds() <= fds + 2  # sockets and pipes closed (allow lazily opened files)
    assert {p.pid for p in me.children(recursive=True)} == children
