"""Screenshot the live ipywidgets dashboard in JupyterLab: docs/screenshots/dashboard-widget.png.

    python -m venv /tmp/jlab-venv
    /tmp/jlab-venv/bin/pip install jupyterlab 'jupyterlab_widgets==3.0.*' websocket-client
    /tmp/jlab-venv/bin/python docs/screenshots/widget_shot.py

Run it with the throwaway venv's Python (JupyterLab and `websocket-client` are not dev
extras); pick the `jupyterlab_widgets` that matches the kernel's ipywidgets (3.0.x for
ipywidgets 8.1.x). The kernel is the repo's `.venv` Python (`--kernel-python`), so the
dashboard is the working tree's. Needs `chromium` (apt-get install chromium).

JupyterLab serves its own bundled widget frontend on 127.0.0.1 (no CDN). Headless
Chromium opens the notebook, and the script drives it over the DevTools protocol: it
runs the setup cell (four simulated nodes, background traffic, one node asleep) and the
`fleet` cell, waits until the live table is filled, lets it refresh for a few seconds
(token rates need two readings), screenshots that cell, then runs the `fleet.close()`
cell, shuts the kernel down and stops the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import websocket  # websocket-client
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

SETUP = """\
import threading, time
from lmfleet import LMFleet

fleet = LMFleet.simulate(
    nodes=4, speed=[1, 1, 1, 0.33], sim_args=("--ttft-ms", "20", "--tpot-ms", "5")
)
fleet.wait_ready(60)
stop = threading.Event()

def traffic():  # streamed chats until `stop` is set
    client = fleet.client()
    while not stop.is_set():
        for _chunk in client.chat.completions.create(
            model=fleet.model, max_tokens=48, stream=True,
            messages=[{"role": "user", "content": "tell me a story"}],
        ):
            pass

workers = [threading.Thread(target=traffic, daemon=True) for _ in range(6)]
for worker in workers:
    worker.start()
time.sleep(3)
fleet.sleep(nodes=[fleet.nodes[2].url])"""

CLOSE = "stop.set()\nfor worker in workers:\n    worker.join()\nfleet.close()"

# JavaScript run in the page (JupyterLab exposes `window.jupyterapp` with
# --LabApp.expose_app_in_browser). Cell 0 is the heading; 1 setup, 2 `fleet`, 3 close.
PANEL = "jupyterapp.shell.currentWidget"
KERNEL_READY = f"""(() => {{
  const p = window.jupyterapp && {PANEL};
  const k = p && p.sessionContext && p.sessionContext.session
    && p.sessionContext.session.kernel;
  return !!(k && k.connectionStatus === 'connected' && k.status === 'idle'
    && p.content.widgets.length === 4);
}})()"""
RUN_CELL = """(i => {{
  const p = {panel};
  p.content.activeCellIndex = i;
  jupyterapp.commands.execute('notebook:run-cell');
  return true;
}})({index})"""
DASHBOARD_STATE = f"""(() => {{
  const cell = {PANEL}.content.widgets[2].node;
  const err = cell.querySelector('[data-mime-type$="stderr"]');
  const grid = cell.querySelector('.widget-gridbox');
  const header = cell.querySelector('.widget-vbox > .widget-html');
  return JSON.stringify({{
    error: err ? err.innerText : null,
    widgetError: cell.querySelector('.jp-OutputArea-output') ?
      (cell.querySelector('.jp-OutputArea-output').innerText.match(/Error[^\\n]*/) || [null])[0]
      : null,
    cells: grid ? grid.querySelectorAll('.widget-html').length : 0,
    header: header ? header.innerText : '',
  }});
}})()"""
CLIP = f"""(() => {{
  {PANEL}.content.activeCellIndex = 0;  // no active-cell marker or toolbar on the shot
  document.activeElement && document.activeElement.blur();
  const cell = {PANEL}.content.widgets[2].node;
  cell.scrollIntoView({{block: 'start'}});
  const r = cell.getBoundingClientRect();
  const grid = cell.querySelector('.widget-gridbox').getBoundingClientRect();
  return JSON.stringify({{x: r.left, y: r.top, width: Math.min(r.width, grid.right - r.left + 24),
                          height: r.height + 4}});
}})()"""
CELL_DONE = f"""(i => {{
  const cell = {PANEL}.content.widgets[i];
  return cell.model.executionCount !== null
    && {PANEL}.sessionContext.session.kernel.status === 'idle';
}})"""

SETTINGS = {  # no news / update pop-ups in the screenshot
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def notebook() -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=[
            new_markdown_cell("# lmfleet dashboard"),
            new_code_cell(SETUP),
            new_code_cell("fleet"),
            new_code_cell(CLOSE),
        ]
    )
    nb.metadata["kernelspec"] = {
        "name": "lmfleet",
        "display_name": "Python (lmfleet)",
        "language": "python",
    }
    return nb


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.load(resp)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class Page:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.console: list[str] = []
        self.call("Runtime.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"]["args"]
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                self.console.append(f"{message['params']['type']}: {text}")
            elif message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.console.append(f"exception: {details.get('exception', details)}")
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}; console:\n" + "\n".join(self.console))


def start_lab(jupyter: str, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    kernels = workdir / "jupyter" / "kernels" / "lmfleet"
    kernels.mkdir(parents=True)
    spec = {
        "argv": [KERNEL_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (lmfleet)",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    for name, values in SETTINGS.items():
        path = workdir / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    (workdir / "workspaces").mkdir()
    nbformat.write(notebook(), workdir / "dashboard.ipynb")
    env = {
        **os.environ,
        "JUPYTER_PATH": str(workdir / "jupyter"),
        "JUPYTER_CONFIG_DIR": str(workdir / "config"),
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
    }
    return subprocess.Popen(
        [
            jupyter,
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--IdentityProvider.token=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={workdir}",
            "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={workdir / 'settings'}",
            f"--LabApp.workspaces_dir={workdir / 'workspaces'}",
            "--LabApp.news_url=",
            "--LabApp.extension_manager=readonly",
            "--allow-root",
        ],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "lab.log", "w"),
    )


def start_chromium(url: str, profile: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            shutil.which("chromium") or "chromium",
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={port}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def shoot(page: Page, out: Path, settle: float) -> None:
    page.wait_for(KERNEL_READY, 120, "the notebook's kernel")
    page.eval("jupyterapp.shell.collapseLeft(), jupyterapp.shell.collapseRight(), true")
    for index in (1, 2):
        page.eval(RUN_CELL.format(panel=PANEL, index=index))
    deadline = time.monotonic() + 180
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = json.loads(page.eval(DASHBOARD_STATE))
        if state["error"] or state["widgetError"]:
            raise RuntimeError(f"the dashboard cell failed: {state}\n" + "\n".join(page.console))
        # header row + 4 nodes, 9 columns + actions; rates once traffic was measured twice
        if state["cells"] >= 5 * 9 and "tokens/s" in state["header"]:
            break
        time.sleep(1)
    else:
        raise TimeoutError(f"no live dashboard: {state}\n" + "\n".join(page.console))
    time.sleep(settle)  # a few refreshes: in-flight and token rates settle
    clip = json.loads(page.eval(CLIP))
    time.sleep(0.5)
    clip = json.loads(page.eval(CLIP))  # after the scroll
    shot = page.call("Page.captureScreenshot", format="png", clip={**clip, "scale": 1})
    out.write_bytes(base64.b64decode(shot["data"]))
    print("wrote", out, json.loads(page.eval(DASHBOARD_STATE))["header"])


def main() -> None:
    global KERNEL_PYTHON
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--jupyter", default=str(Path(sys.executable).with_name("jupyter")), help="jupyter CLI"
    )
    parser.add_argument("--kernel-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--out", type=Path, default=HERE / "dashboard-widget.png")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds of live refreshes")
    args = parser.parse_args()
    KERNEL_PYTHON = args.kernel_python
    with tempfile.TemporaryDirectory(prefix="lmfleet-lab-") as tmp:
        workdir = Path(tmp)
        lab_port, cdp_port = free_port(), free_port()
        base = f"http://127.0.0.1:{lab_port}"
        lab = start_lab(args.jupyter, workdir, lab_port)
        browser = None
        try:
            wait_http(f"{base}/api/status", 60)
            url = f"{base}/lab/tree/dashboard.ipynb"
            browser = start_chromium(url, workdir / "chromium", cdp_port)
            targets = wait_http(f"http://127.0.0.1:{cdp_port}/json", 30)
            pages = [t for t in targets if t.get("type") == "page"]
            page = Page(pages[0]["webSocketDebuggerUrl"])
            try:
                shoot(page, args.out, args.settle)
            finally:
                try:  # close the fleet from the notebook, then stop the kernel
                    page.eval(RUN_CELL.format(panel=PANEL, index=3))
                    page.wait_for(f"({CELL_DONE})(3)", 60, "fleet.close()")
                except Exception as exc:  # noqa: BLE001 - the kernel shutdown below closes it too
                    print("closing the fleet from the notebook failed:", exc)
                page.ws.close()
        finally:
            if browser is not None:
                browser.terminate()
                browser.wait(timeout=20)
            try:
                for kernel in wait_http(f"{base}/api/kernels", 5):
                    request = urllib.request.Request(
                        f"{base}/api/kernels/{kernel['id']}", method="DELETE"
                    )
                    urllib.request.urlopen(request, timeout=30).close()
            except OSError as exc:
                print("kernel shutdown failed:", exc)
            lab.terminate()  # SIGTERM: the server stops without asking
            lab.wait(timeout=30)
            print((workdir / "lab.log").read_text()[-1500:])


KERNEL_PYTHON = sys.executable

if __name__ == "__main__":
    main()
