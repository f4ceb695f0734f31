"""Start LMDeploy's own CLI with the stub engine in place of the PyTorch engine.

    .venv-peer/bin/python run_peer.py serve api_server MODEL_DIR --backend pytorch \
        --server-name 127.0.0.1 --server-port PORT [...]

The arguments are exactly `lmdeploy`'s; this only applies `stub_engine.patch()`
first, then calls `lmdeploy.cli.entrypoint.run()` (the `lmdeploy` console script).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stub_engine

if __name__ == "__main__":
    stub_engine.patch()
    from lmdeploy.cli.entrypoint import run

    sys.argv = ["lmdeploy", *sys.argv[1:]]
    run()
