"""Take the dashboard screenshots in docs/screenshots/ (not run by `make test`).

    .venv/bin/python docs/screenshots/take.py                    # HTML fallback only
    .venv/bin/python docs/screenshots/take.py --voila /tmp/jl/bin/voila   # + the live widget

Needs `chromium` (apt-get install chromium). The live widget is rendered by Voila
(Jupyter's widget frontend, served on 127.0.0.1 with its own assets: no CDN); install
it into a throwaway venv (`python -m venv /tmp/jl && /tmp/jl/bin/pip install voila`),
not into the dev extras. The notebook's kernel is this interpreter (the dev venv).
Status: the Voila page connects to the kernel but its widget views fail with a
JavaScript error (not yet diagnosed: likely a widget-manager version mismatch), so
docs/ ships only the HTML-fallback screenshot for now.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

SETUP = """\
import threading, time
from lmfleet import LMFleet

fleet = LMFleet.simulate(
    nodes=4, speed=[1, 1, 1, 0.33], health_interval=0.5,
    sim_args=("--ttft-ms", "20", "--tpot-ms", "4", "--health-poll-interval", "0.5",
              "--output-tokens", "64"),
)
fleet.wait_ready(timeout=60)
conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(400)]
fleet.chat_many(conversations, concurrency=24, progress=False, max_tokens=64)
fleet.sleep(level=1, nodes=[fleet.nodes[2].url])

def traffic():  # keeps the fleet busy while the page is open
    client = fleet.client()
    while True:
        fleet.chat_many(conversations[:200], concurrency=24, progress=False, max_tokens=64)
        for _ in client.chat.completions.create(model=fleet.model, max_tokens=64, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]):
            pass

threading.Thread(target=traffic, daemon=True).start()
time.sleep(3)
fleet  # displayed once so the next display shows token rates
"""


def notebook() -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=[
            new_markdown_cell("# lmfleet dashboard"),
            new_code_cell(SETUP),
            new_code_cell("time.sleep(2)\nfleet"),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    return nb


def chromium(url: str, out: Path, size: str, wait_ms: int) -> None:
    profile = tempfile.mkdtemp(prefix="lmfleet-chromium-")
    try:
        subprocess.run(
            [
                shutil.which("chromium") or "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={out}",
                f"--window-size={size}",
                f"--virtual-time-budget={wait_ms}",
                url,
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print("wrote", out)


def html_fallback(workdir: Path) -> None:
    """Execute the notebook, drop the widget views (as a frontend without widgets
    would), export with nbconvert and screenshot the page."""
    nb = notebook()
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    nb.cells = nb.cells[:1] + nb.cells[2:]  # keep the heading and the dashboard cell
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop(WIDGET_MIME, None)
    nb.metadata.pop("widgets", None)
    body, _ = HTMLExporter(template_name="classic").from_notebook_node(nb)
    page = workdir / "dashboard.html"
    page.write_text(body)
    chromium(page.as_uri(), HERE / "dashboard-html.png", "1200,420", 3000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live_widget(voila: str, workdir: Path) -> None:
    """Serve the notebook with Voila on 127.0.0.1 and screenshot the live widgets."""
    kernels = workdir / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (lmfleet)",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    path = workdir / "dashboard.ipynb"
    nb = notebook()
    nb.cells[1].source += "\n\n"  # voila shows outputs only
    nbformat.write(nb, path)
    port = free_port()
    env = {**os.environ, "JUPYTER_PATH": str(workdir / "jupyter")}
    server = subprocess.Popen(
        [voila, str(path), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "voila.log", "w"),  # noqa: SIM115 - closed with the process
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        # Live widgets render only after they talked to the kernel: wait in real time.
        python = str(Path(voila).with_name("python"))
        out = HERE / "dashboard-widget.png"
        page = f"http://127.0.0.1:{port}/"
        subprocess.run([python, str(HERE / "cdp_shot.py"), page, str(out), "25"], check=True)
        print("wrote", out)
    finally:
        server.terminate()
        server.wait(timeout=20)
        print((workdir / "voila.log").read_text()[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--voila", help="a voila executable (throwaway venv)")
    parser.add_argument("--skip-html", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmfleet-shots-") as tmp:
        workdir = Path(tmp)
        if not args.skip_html:
            html_fallback(workdir)
        if args.voila:
            live_widget(args.voila, workdir)


if __name__ == "__main__":
    main()
