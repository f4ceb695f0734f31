"""Screenshot a page after `wait` real seconds via Chromium's DevTools protocol.

`chromium --screenshot` fires at the load event, before live widgets have talked to
their kernel; this waits in real time instead. Run with a Python that has
`websocket-client` (the Voila venv has it):  python cdp_shot.py URL OUT.png WAIT
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # websocket-client


def main(url: str, out: str, wait: float, port: int = 9333) -> None:
    profile = tempfile.mkdtemp(prefix="lmfleet-cdp-")
    browser = subprocess.Popen(
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
            "--window-size=1200,600",
            "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={port}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        targets: list[dict[str, str]] = []
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as resp:
                    targets = [t for t in json.load(resp) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        time.sleep(wait)
        ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=30)
        ws.send(json.dumps({"id": 1, "method": "Page.captureScreenshot"}))
        while True:
            reply = json.loads(ws.recv())
            if reply.get("id") == 1:
                break
        with open(out, "wb") as f:
            f.write(base64.b64decode(reply["result"]["data"]))
        ws.close()
    finally:
        browser.terminate()
        browser.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
