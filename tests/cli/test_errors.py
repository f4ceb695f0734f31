"""A configuration mistake is one line, `lmfleet: error: ...`, and exit status 2."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import run_lmfleet

from lmfleet.launch.process import free_port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def assert_one_line_error(done: object, expected: str) -> None:
    status, stdout, stderr = done.returncode, done.stdout, done.stderr  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, f"status {status}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stderr + stdout
    errors = [line for line in lines if line.startswith("lmfleet: error: ")]
    assert len(errors) == 1, stderr
    assert expected in errors[0], stderr
    assert expected in errors[0], errors[0]
    assert lines[-1] == errors[0], "the error is the last thing printed"


MISTAKES = {
    "bad node URL": (["serve", "--node", "notaurl::", "--port", "0"], {}, "invalid port"),
    "bad strategy": (["demo", "--strategy", "bogus"], {}, "unknown routing strategy 'bogus'"),
    "no GPUs": (
        ["launch", "some/model", "--port", "0"],
        {"CUDA_VISIBLE_DEVICES": "-1"},
        "GPU",
    ),
    "ssl without files": (
        ["serve", "--ssl", "--port", "0"],
        {"SSL_KEYFILE": "", "SSL_CERTFILE": ""},
        "--ssl needs the environment variable(s) SSL_KEYFILE and SSL_CERTFILE",
    ),
    "ssl with a missing certificate": (
        ["serve", "--ssl", "--port", "0"],
        {"SSL_KEYFILE": "/nonexistent/key.pem", "SSL_CERTFILE": "/nonexistent/cert.pem"},
        "cannot serve HTTPS with certificate /nonexistent/cert.pem",
    ),
    "cache status and state dir": (
        ["serve", "--disable-cache-status", "--state-dir", "/tmp/lmfleet-x", "--port", "0"],
        {},
        "--disable-cache-status and --state-dir contradict each other",
    ),
    "cache status and state file": (
        ["serve", "--disable-cache-status", "--state-file", "/tmp/x.json", "--port", "0"],
        {},
        "--disable-cache-status and --state-file contradict each other",
    ),
    "invalid option value": (
        ["serve", "--max-body-bytes", "0", "--port", "0"],
        {},
        "max_body_bytes: Input should be greater than or equal to 1 (got 0)",
    ),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_configuration_mistakes_are_one_line(case: str) -> None:
    args, env, expected = MISTAKES[case]
    assert_one_line_error(run_lmfleet(*args, env=env), expected)


def test_a_busy_port_is_one_line(busy_port: int) -> None:
    node = f"http://127.0.0.1:{free_port()}"
    done = run_lmfleet("serve", "--node", node, "--port", str(busy_port))
    assert_one_line_error(done, f"cannot serve on 127.0.0.1:{busy_port}: the port is in use")
    done = run_lmfleet("sim", "--port", str(busy_port))
    assert_one_line_error(done, f"cannot serve on 127.0.0.1:{busy_port}: the port is in use")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ["serve", "--node", "notaurl::", "--port", "0"]
    done = run_lmfleet("--debug", *args)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
    done = run_lmfleet(*args, env={"LMFLEET_DEBUG": "1"})
    assert "Traceback" in done.stderr
    done = run_lmfleet(args[0], "--debug", *args[1:])  # after the subcommand too
    assert "Traceback" in done.stderr


def test_usage_errors_keep_argparse_wording() -> None:
    done = run_lmfleet("serve", "--no-such-flag")
    assert done.returncode == 2
    assert "lmfleet: error: unrecognized arguments: --no-such-flag" in done.stderr


def test_launched_nodes_not_ready_say_why() -> None:
    """`lmfleet launch` gives up after --ready-timeout with each node's reason, status 2."""
    done = run_lmfleet(
        "launch", "m", "--simulate", "--port", "0", "--ready-timeout", "2",
        "--health-interval", "0.2", "--server-arg", "unhealthy",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = next(line for line in done.stderr.splitlines() if line.startswith("lmfleet: error:"))
    assert error == "lmfleet: error: nodes not ready after 2 s", done.stderr
    assert "Engine health probe failed" in done.stderr.split(error, 1)[1], done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"kind": "lmfleet serve node list", "version": 2, "nodes": [{"url": "http://12',
            "is not valid JSON (truncated or corrupt?)",
        ),
        ('{"proxy_config": {"nodes": {}}}', "is not an lmfleet serve node list"),
    ],
    ids=["truncated", "foreign"],
)
def test_a_bad_state_file_is_one_line_naming_it(tmp_path: Path, text: str, expected: str) -> None:
    """Never a crash with a traceback, and never silently replaced: the file stays."""
    state = tmp_path / "nodes.json"
    state.write_text(text)
    done = run_lmfleet("serve", "--state-file", str(state), "--port", "0")
    assert_one_line_error(done, f"the state file {state} {expected}")
    assert "--disable-cache-status" in done.stderr
    assert state.read_text() == text
