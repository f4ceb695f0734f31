"""Shared bench helpers: pinned processes, ports, wrk runs, /proc CPU time.

Every process a bench starts goes through `start()` and is ended by `Procs.close()`
(by PID, SIGTERM then SIGKILL), so a bench leaves nothing behind, even on Ctrl-C.

Pinning on a 2-core machine: the proxy under test gets `PROXY_CPU` (core 0); the
load generator (wrk, the Python clients) and the backends share `LOAD_CPU` (core 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmfleet.launch.process import die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
PROXY_CPU = "0"
LOAD_CPU = "1"
MODEL = "internlm/internlm2_5-7b-chat"
TICKS = os.sysconf("SC_CLK_TCK")
WRK_LUA = ROOT / "bench" / "wrk" / "post.lua"


@contextlib.contextmanager
def fast_sim_proxy(output_tokens: int = 16, **fleet: Any) -> Iterator[tuple[Any, str]]:
    """One `lmfleet sim --fast` node (a child process), a fleet attached to it and its
    proxy in this process: (fleet, proxy URL). For the benches that profile or time the
    proxy's own code in-process (run as scripts with `PYTHONPATH` naming a checkout).
    `fleet`: more `LMFleet.attach` keywords."""
    from lmfleet import LMFleet
    from lmfleet.launch.process import wait_for_port

    port = free_port()
    argv = [sys.executable, "-m", "lmfleet.sim", "--host", "127.0.0.1", "--port", str(port)]
    sim = subprocess.Popen([*argv, "--fast", "--output-tokens", str(output_tokens)])
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        with LMFleet.attach([f"http://127.0.0.1:{port}"], health_interval=1.0, **fleet) as fleet:
            fleet.wait_ready(timeout=30)
            proxy = fleet.serve(port=0)
            try:
                yield fleet, proxy.url
            finally:
                proxy.stop()
    finally:
        sim.terminate()
        sim.wait(timeout=10)


def pin_self(cpu: str = LOAD_CPU) -> None:
    """Pin this process (and the children it starts later) to `cpu`."""
    os.sched_setaffinity(0, {int(c) for c in cpu.split(",")})


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    py = sys.version.split()[0]
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Python {py}, {time.strftime('%Y-%m-%d')}"
    )


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def children(pid: int) -> list[int]:
    """`pid`'s own child processes (e.g. the workers of `lmfleet serve --workers`)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants, in seconds."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Procs:
    """Processes started by one bench; `close()` ends each of them by PID."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        cpu: str,
        *,
        env: dict[str, str] | None = None,
        log: str = "",
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: it and its children
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            self.started.remove(proc)

    def stop_last(self) -> None:
        if self.started:
            self.stop(self.started[-1])

    def close(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


@contextlib.contextmanager
def procs() -> Iterator[Procs]:
    group = Procs()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield group
    finally:
        group.close()
        signal.signal(signal.SIGTERM, previous)


def wait_http(url: str, timeout: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == status:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer {status} within {timeout:g} s")
        time.sleep(0.1)


def wait_all_healthy(proxy: str, nodes: Sequence[str], timeout: float = 60.0) -> None:
    """Until the proxy at `proxy` shows every one of `nodes` healthy (`/nodes/status`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = get_json(proxy + "/nodes/status", timeout=2)
        except (OSError, ValueError):
            status = {}
        states = {u: s.get("state") for u, s in status.items()} if isinstance(status, dict) else {}
        if all(states.get(n) == "healthy" for n in nodes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proxy}: nodes not all healthy after {timeout:g} s: {states}")
        time.sleep(0.05)


def post_json(url: str, body: object, timeout: float = 10.0) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return bytes(resp.read())


def get_json(url: str, timeout: float = 10.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def sim_argv(port: int, *extra: str) -> list[str]:
    return [PY, "-m", "lmfleet.sim", "--port", str(port), "--log-level", "error", *extra]


def start_sims(group: Procs, count: int, cpu: str, *extra: str) -> list[str]:
    urls = []
    for _ in range(count):
        port = free_port()
        group.start(sim_argv(port, *extra), cpu)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(url + "/health")
    return urls


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int
    non2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(
    url: str,
    connections: int,
    seconds: float,
    *,
    stream: bool,
    max_tokens: int = 16,
    sessions: int = 0,
) -> WrkResult:
    """One wrk run (pinned to LOAD_CPU) of POST /v1/chat/completions; parsed summary.
    `sessions`: each request has one of that many `x-session-id`s, at random."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    env = {**os.environ, "WRK_STREAM": "1" if stream else "0", "WRK_MAX_TOKENS": str(max_tokens)}
    env["WRK_SESSIONS"] = str(sessions)
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    argv += ["--timeout", "10s", "-s", str(WRK_LUA), url + "/v1/chat/completions"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out.stdout}\n{out.stderr}")
    data = json.loads(line)
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        non2xx=data["non2xx"],
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
    )


def save_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def publish(path: Path, results: dict[str, Any], section: str) -> None:
    """Save `results` as JSON at `path` and `section` (their Markdown) beside it as
    `.md`, then print the section and the run's total `seconds`."""
    save_json(path, results)
    path.with_suffix(".md").write_text(section)
    print()
    print(section)
    print(f"total {results['seconds']:.0f} s", flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
