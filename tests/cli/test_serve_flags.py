"""`lmfleet serve` takes every `lmdeploy serve proxy` flag, read from LMDeploy's own parser.

LMDeploy 0.18 runs in the conformance peer venv (`make peer`); its parser is built
there and described as JSON, so a flag LMDeploy adds later fails this suite.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from cli_support import Console, help_gaps, help_text, run_lmfleet
from conformance.peer_support import PEER_PYTHON, peer_unavailable
from support import StartSim, sim_stats, wait_until

from lmfleet.cli import build_parser
from lmfleet.cli.serve import fleet_keywords, fleet_options
from lmfleet.config import FleetOptions, merge_options
from lmfleet.launch.process import free_port
from lmfleet.proxy.options import ProxyOptions
from lmfleet.sim.options import DEFAULT_MODEL

DESCRIBE_LMDEPLOY_PROXY = """
import json, sys
from lmdeploy.cli.cli import CLI
from lmdeploy.cli.serve import SubCliServe
CLI.add_parsers()
SubCliServe.add_parsers()
parser = SubCliServe.subparsers.choices["proxy"]
flags = [
    {"flags": a.option_strings, "dest": a.dest, "nargs": a.nargs,
     "choices": list(a.choices) if a.choices else None}
    for a in parser._actions if a.option_strings and a.dest != "help"
]
parsed = vars(parser.parse_args(sys.argv[1:]))
print(json.dumps({"flags": flags, "parsed": {k: v for k, v in parsed.items() if k != "run"}}))
"""


ALL_FLAGS = [
    "--server-name", "127.0.0.1",
    "--server-port", "8000",
    "--serving-strategy", "DistServe",
    "--dummy-prefill",
    "--routing-strategy", "min_expected_latency",
    "--disable-cache-status",
    "--migration-protocol", "NVLINK",
    "--link-type", "IB",
    "--disable-gdr",
    "--api-keys", "key-1", "key-2",
    "--ssl",
    "--log-level", "DEBUG",
]  # fmt: skip
"""Every flag of `lmdeploy serve proxy` 0.18, each away from its default."""


@cache
def lmdeploy_proxy() -> dict[str, Any]:
    """LMDeploy's proxy flags, and its parse of `ALL_FLAGS` (proof that they are its own).

    One run of the peer's python (importing lmdeploy takes seconds), shared by the tests.
    """
    argv = ALL_FLAGS
    if (why := peer_unavailable()) is not None:
        pytest.skip(why)
    done = subprocess.run(
        [str(PEER_PYTHON), "-c", DESCRIBE_LMDEPLOY_PROXY, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["serve"]
    return parser


def test_every_lmdeploy_proxy_flag_is_accepted_with_its_choices() -> None:
    ours = {flag: action for action in serve_parser()._actions for flag in action.option_strings}
    theirs = lmdeploy_proxy()["flags"]
    assert len(theirs) >= 12  # the 0.18 list; fewer means the description broke
    untried = {flag["flags"][0] for flag in theirs} - set(ALL_FLAGS)
    assert not untried, f"add {untried} to ALL_FLAGS, so that they run at once below"
    for flag in theirs:
        name = flag["flags"][0]
        assert name in ours, f"lmdeploy serve proxy {name} is not accepted by lmfleet serve"
        action = ours[name]
        if flag["nargs"] == 0:
            assert action.nargs == 0, f"{name} is a switch in LMDeploy"
        else:
            assert action.nargs == flag["nargs"], f"{name} takes nargs={flag['nargs']!r}"
        if flag["choices"]:
            choices = {str(c).upper() for c in action.choices or ()}
            missing = {c for c in flag["choices"] if c.upper() not in choices}
            assert not missing, f"{name} lacks LMDeploy's choices {missing}"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, made with the openssl command."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


def test_all_lmdeploy_flags_at_once_over_https(
    console: Callable[..., Console], start_sim: StartSim, tmp_path: Path
) -> None:
    """LMDeploy's whole flag set in one command line, HTTPS included, then a real request.

    DistServe with `--dummy-prefill` sends each chat straight to a decode node
    with a dummy migration; the node registers over HTTPS as LMDeploy's do.
    """
    parsed = lmdeploy_proxy()["parsed"]  # LMDeploy's own parser takes the same line
    assert parsed["ssl"] and parsed["dummy_prefill"] and parsed["api_keys"] == ["key-1", "key-2"]
    port = free_port()
    lmdeploy_args = [str(port) if arg == "8000" else arg for arg in ALL_FLAGS]

    key, cert = self_signed(tmp_path)
    env = {"SSL_KEYFILE": str(key), "SSL_CERTFILE": str(cert)}
    proxy = console("serve", *lmdeploy_args, "--health-interval", "0.2", env=env)
    url = proxy.wait_for(r"lmfleet proxy on (https://\S+)").group(1)
    assert url == f"https://127.0.0.1:{port}"

    decode = start_sim("--role", "decode", "--health-poll-interval", "0.2", "--fast")
    trusted = ssl.create_default_context(cafile=str(cert))
    admin = {"authorization": "Bearer key-1"}
    with httpx2.Client(verify=trusted, timeout=10) as http:
        assert http.get(url + "/liveness").status_code == 200
        added = http.post(
            url + "/nodes/add", json={"url": decode.url, "status": {"role": 3}}, headers=admin
        )
        assert added.status_code == 200, added.text
        with pytest.raises(httpx2.TransportError):  # plain HTTP is not served
            httpx2.get(f"http://127.0.0.1:{port}/liveness", timeout=5)

    client = openai.OpenAI(
        base_url=url + "/v1",
        api_key="key-2",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=trusted),
    )
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    stats = sim_stats(decode.url)
    assert stats["completed"] == 1
    migration = stats["distserve"]["last_migration"]
    assert stats["distserve"]["dummy_decodes"] == 1, stats
    assert (migration["is_dummy_prefill"], migration["protocol"]) == (True, 3)  # NVLINK
    assert proxy.stop(signal.SIGTERM) == 0, proxy
    assert "Traceback" not in str(proxy)


def test_idle_and_admission_flags_reach_the_fleet_options() -> None:
    """`--auto-sleep-after` (which turns on wake on demand), `--auto-sleep-level`,
    `--admission-queue` and `--weight-version`, on `serve` and on `launch` alike."""
    flags = ["--auto-sleep-after", "30", "--auto-sleep-level", "2"]
    flags += ["--admission-queue", "5", "--weight-version", "3"]
    launch = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for parser, model in ((serve_parser(), []), (launch.choices["launch"], ["m"])):
        args = parser.parse_args(model + flags)
        options = merge_options(fleet_options(args), fleet_keywords(args))
        assert options.auto_sleep_after == 30.0 and options.auto_sleep_level == 2
        assert options.routing.wake_on_demand and options.routing.admission_queue == 5
        assert options.weight_version == 3
    defaults = serve_parser().parse_args([])
    options = merge_options(fleet_options(defaults), fleet_keywords(defaults))
    assert options == FleetOptions()  # no flag: every default, auto-sleep off
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--auto-sleep-level", "3"])
    text = serve_parser().format_help()
    for flag in ("--auto-sleep-after", "--auto-sleep-level", "--admission-queue"):
        assert flag in text
    assert "--weight-version" in text


def test_every_flag_has_help_that_states_its_default() -> None:
    """`lmfleet serve --help` alone tells what each absent flag means."""
    parser = serve_parser()
    assert help_gaps(parser) == []
    # Each flag of an option field states the field's default (tests/cli/test_option_flags.py
    # checks them all; these are the ones users ask about).
    fleet = FleetOptions()
    stated = {
        "--health-interval": fleet.health.interval,
        "--wait-for-node": fleet.routing.wait_for_node,
        "--first-byte-timeout": fleet.routing.first_byte_timeout,
        "--min-ready": fleet.min_ready,
        "--admission-queue": fleet.routing.admission_queue,
        "--weight-version": fleet.weight_version,
    }
    for flag, value in stated.items():
        assert f"default {value:g}" in help_text(parser, flag), flag
    assert "default: never" in help_text(parser, "--auto-sleep-after")
    # The printed help, as a user sees it (the console script, a fresh process).
    done = run_lmfleet("serve", "--help")
    assert done.returncode == 0, done.stderr
    printed = " ".join(done.stdout.split())
    assert f"get a 413 (default {ProxyOptions().max_body_bytes})" in printed
    assert f"before 504 (default {ProxyOptions().upstream_timeout:g})" in printed


def test_serve_auto_sleep_puts_an_idle_node_to_sleep_and_wakes_it_on_use(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    node = start_sim("--health-poll-interval", "0.2", "--fast")
    proxy = console(
        "serve", "--node", node.url, "--port", "0", "--health-interval", "0.2",
        "--auto-sleep-after", "0.5",
    )  # fmt: skip
    url = proxy.wait_for(r"lmfleet proxy on (http://\S+)").group(1)
    proxy.wait_for(rf"node {node.url} idle for .*: putting it to sleep \(level 1", timeout=30)
    wait_until(lambda: sim_stats(node.url)["sleeping"], timeout=20, what="the node asleep")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "wake"}], max_tokens=2
    )
    assert reply.choices[0].message.content
    assert proxy.stop(signal.SIGTERM) == 0, proxy
    assert "Traceback" not in str(proxy)


def test_a_node_flag_carries_its_own_priority_and_speed(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    first, second = start_sim("--fast"), start_sim("--fast")
    proxy = console(
        "serve", "--node", first.url, "--node", f"{second.url},priority=50,speed=0.5",
        "--port", "0", "--health-interval", "0.2",
    )  # fmt: skip
    url = proxy.wait_for(r"lmfleet proxy on (http://\S+)").group(1)
    status = httpx2.get(url + "/nodes/status", timeout=5).json()
    assert (status[first.url]["priority"], status[first.url]["speed"]) == (0, None)
    assert (status[second.url]["priority"], status[second.url]["speed"]) == (50, 0.5)
    assert proxy.stop(signal.SIGTERM) == 0, proxy


def test_a_node_flag_with_an_unknown_setting_is_refused() -> None:
    done = run_lmfleet("serve", "--node", "http://127.0.0.1:9,prio=5", "--port", "0")
    assert done.returncode == 2
    assert "unknown setting 'prio' (known: priority, speed" in done.stderr


def test_model_alias_and_unify_flags_reach_the_fleet() -> None:
    args = build_parser().parse_args(
        ["serve", "--model-alias", "i7=a/m,/data/m", "--model-alias", "q=q1", "--unify-models"]
    )
    keywords = fleet_keywords(args)
    assert keywords["aliases"] == {"i7": ("a/m", "/data/m"), "q": ("q1",)}
    assert keywords["unify_models"] is True
    done = run_lmfleet("serve", "--model-alias", "i7", "--port", "0")
    assert done.returncode == 2 and "expected NAME=REAL[,REAL...]" in done.stderr


def test_a_node_flag_takes_its_key_and_headers_from_the_environment(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    key, team = "sk-only-this-node-42", "team-value-secret"
    node = start_sim("--fast", "--api-keys", key, "--record-headers", "X-Team")
    proxy = console(
        "serve", "--node",
        f"{node.url},key-env=THE_NODE_KEY,header-env=X-Team:THE_TEAM,health-interval=0.2",
        "--port", "0",
        env={"THE_NODE_KEY": key, "THE_TEAM": team},
    )  # fmt: skip
    url = proxy.wait_for(r"lmfleet proxy on (http://\S+)").group(1)
    wait_until(lambda: httpx2.get(url + "/readiness", timeout=5).status_code == 200)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content
    assert team in sim_stats(node.url, key)["headers"]["x-team"]
    status = httpx2.get(url + "/nodes/status", timeout=5).text
    assert "THE_NODE_KEY" in status and key not in status and team not in status
    assert proxy.stop(signal.SIGTERM) == 0, proxy
    assert key not in str(proxy) and team not in str(proxy)
