"""Execute the shipped notebooks top to bottom in a fresh kernel and check what they print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def execute(name: str, cwd: Path) -> tuple[str, list[dict[str, Any]]]:
    """Run one notebook; return its printed text and every display output."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",  # ipykernel's native spec: this interpreter (the venv)
        resources={"metadata": {"path": str(cwd)}},
        store_widget_state=True,
    )
    client.execute()
    printed: list[str] = []
    displays: list[dict[str, Any]] = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream" and output["name"] == "stdout":
                printed.append(output["text"])
            elif output["output_type"] in ("display_data", "execute_result"):
                displays.append(output["data"])
            elif output["output_type"] == "error":
                raise AssertionError(f"{name}: {output['ename']}: {output['evalue']}")
    return "".join(printed), displays


def test_quickstart(tmp_path: Path) -> None:
    text, displays = execute("quickstart.ipynb", tmp_path)
    assert "nodes ready: 3/3" in text
    assert "reply has text: True" in text
    assert "streamed chunks > 0: True" in text
    assert "300/300 ok, 0 failed" in text
    assert "batch ok: 300/300" in text
    assert "async batch ok: 50/50" in text
    assert "proxy answered: True" in text
    served = int(text.split("total requests served:")[1].split()[0])
    assert served >= 300 + 50 + 2 + 1
    dashboards = [d for d in displays if WIDGET_MIME in d and "text/html" in d]
    assert len(dashboards) == 1  # `fleet` as a cell's last expression: the live widget
    assert any("chat" in d["text/plain"] for d in displays if WIDGET_MIME in d)  # tqdm bar
    assert "<table" in dashboards[0]["text/html"] and "tokens/s" in dashboards[0]["text/html"]
    assert dashboards[0]["text/plain"].startswith("LMFleet: 3/3 healthy")


def test_failover(tmp_path: Path) -> None:
    text, displays = execute("failover.ipynb", tmp_path)
    assert "ready: 3 nodes" in text
    assert "all nodes used: True" in text
    assert "a is sleeping" in text
    assert "sleeping node got: 0" in text
    assert "a is healthy" in text
    assert "killed b half-way: 600/600 results" in text
    assert "lost: 0" in text
    ok = int(text.split("600/600 results, ")[1].split()[0])
    failed = int(text.split(" ok, ")[-1].split()[0])
    assert ok + failed == 600 and failed == 0
    assert "b is unhealthy" in text
    assert "dead node got: 0" in text
    assert "closed" in text
    html = [d["text/html"] for d in displays if WIDGET_MIME in d and "text/html" in d]
    assert html and "unhealthy" in html[0]


def test_rl_rollout_loop(tmp_path: Path) -> None:
    text, displays = execute("rl_rollout_loop.ipynb", tmp_path)
    assert "nodes ready: 3 at weight versions [0]" in text
    for step in range(3):
        assert f"step {step}: rollouts 24/24 ok on version {step}" in text
        assert f"step {step}: version {step + 1} on 3/3 nodes, 0 failed" in text
    assert "answer served by version 3" in text
    assert "inside: nodes ['sleeping', 'sleeping', 'sleeping']" in text
    assert "after: nodes ['healthy', 'healthy', 'healthy'] versions [4]" in text
    assert "rolling update: 3 nodes at version 5" in text
    assert "closed" in text
    html = [d["text/html"] for d in displays if WIDGET_MIME in d and "text/html" in d]
    assert html and "v3" in html[0]  # the dashboard's weights column
