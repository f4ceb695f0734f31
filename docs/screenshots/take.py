"""Take the HTML-fallback screenshot, docs/screenshots/dashboard-html.png (not run by `make test`).

    .venv/bin/python docs/screenshots/take.py

Needs `chromium` (apt-get install chromium). The live widget screenshot
(dashboard-widget.png) is taken in JupyterLab by widget_shot.py beside this file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lmfleet-shots-") as tmp:
        html_fallback(Path(tmp))


if __name__ == "__main__":
    main()
