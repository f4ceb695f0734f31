"""Where `lmfleet serve`'s CPU goes per proxied request, by `perf` sampling.

Python profilers mislead on this path: cProfile's wall clock counts the proxy's
preemption by the sims inside whatever call was running (94 us in a one-line
socket write), and a CPU clock inflates every builtin call by its own reading.
`perf` samples the CPU as it is spent, kernel and C included; under Python >= 3.12
with `PYTHONPERFSUPPORT=1` each Python frame shows as a `py::function:file`
symbol, and DWARF call graphs give each sample's stack. Each sample is charged to
its innermost Python function (with the C and kernel work it caused: a socket
write's system call is charged to the function that wrote). This starts the bench's
setup (two `--fast` sims and wrk on core 1, the proxy alone on core 0), records
the proxy for `--seconds` under wrk's chat load (c=32; `--stream`: SSE streams of 16
chunks), and prints the top
functions and files by share, with the proxy's CPU per request in that run.

Needs `perf` (linux-perf) and a Python >= 3.12 venv with lmfleet installed, e.g.

    python3.12 -m venv /tmp/venv312 && /tmp/venv312/bin/pip install -e '.[serve]'
    .venv/bin/python -m bench.proxy_perf --python /tmp/venv312/bin/python [--seconds 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import tempfile
from pathlib import Path

import bench.proxy_overhead as overhead
from bench._common import LOAD_CPU, cpu_seconds, procs, start_sims, table, wrk


def record(python: str, seconds: float, data: Path, stream: bool = False) -> float:
    """Record the proxy under load into `data`; its CPU ms per request in that run
    (`stream`: wrk's SSE load, 16 chunks per answer, instead of chat)."""
    os.environ["PYTHONPERFSUPPORT"] = "1"  # inherited by the proxy's process
    overhead.PY = python
    with procs() as group:
        nodes = start_sims(group, 2, LOAD_CPU, "--fast", "--output-tokens", "16")
        pid, url = overhead.start_lmfleet(group, nodes)
        wrk(url, 32, 3, stream=stream)  # warm: connections, caches
        argv = ["perf", "record", "-F", "999", "--call-graph", "dwarf,16384", "-o", str(data)]
        perf = subprocess.Popen(
            [*argv, "-p", str(pid), "--", "sleep", f"{seconds:g}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        before = cpu_seconds(pid)
        result = wrk(url, 32, seconds, stream=stream)
        spent = cpu_seconds(pid) - before
        perf.wait(timeout=seconds + 120)
    return spent / result.requests * 1e3


def shares(data: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(samples, by innermost Python function, by its file)."""
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    functions: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    total = 0
    for sample in script.split("\n\n"):
        frames = [line.split(None, 1) for line in sample.strip().splitlines()]
        if not frames:
            continue
        total += 1
        for frame in frames:
            symbol = frame[1] if len(frame) > 1 else ""
            if symbol.startswith("py::"):
                function, _, path = symbol[4:].partition(":")
                path = path.split(" ")[0]
                if "lmfleet/" in path:
                    where = "lmfleet/" + path.split("lmfleet/", 1)[1]
                elif "site-packages/" in path:
                    where = path.split("site-packages/", 1)[1].split("/")[0]
                else:
                    where = path.rsplit("/", 1)[-1]
                functions[f"{function} ({where})"] += 1
                files[where] += 1
                break
        else:
            functions["(no Python frame)"] += 1
    return total, functions, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="a Python >= 3.12 with lmfleet[serve]")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--stream", action="store_true", help="SSE streams, not chat")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        data = Path(workdir) / "perf.data"
        per_request = record(args.python, args.seconds, data, args.stream)
        total, functions, files = shares(data)
    what = "stream" if args.stream else "chat request"
    print(f"{total} samples; the proxy's CPU: {per_request:.3f} ms per {what}\n")
    by_file = [[f, f"{100 * n / total:.1f} %"] for f, n in files.most_common(15)]
    print(table(["file", "share"], by_file))
    print()
    rows = [[f, f"{100 * n / total:.2f} %"] for f, n in functions.most_common(args.top)]
    print(table(["innermost Python function", "share"], rows))


if __name__ == "__main__":
    main()
