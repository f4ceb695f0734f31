"""Real `lmdeploy serve api_server` on a GPU, through the same launcher (`pytest -m gpu`).

Skipped without lmdeploy or without a GPU. Needs no internet: a tiny Llama with
random weights and a byte-level BPE tokenizer are built here in code and saved
to a temporary directory; LMDeploy's PyTorch backend serves it. The output is
gibberish by design; the test checks the plumbing: routing, streaming, sleep,
wakeup, logs and teardown.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu_model import build_tiny_llama

from lmfleet import LMFleet, NodeStatus
from lmfleet.launch.gpus import visible_gpus

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lmdeploy")
    if not visible_gpus():
        pytest.skip("no GPU visible")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_real_lmdeploy_nodes_route_stream_sleep_and_wake(tiny_model: Path) -> None:
    fleet = LMFleet.launch(
        str(tiny_model),
        nodes=1,
        tp=1,
        backend="pytorch",
        server_args={
            "model-name": "tiny-llama",
            "session-len": 1024,
            "max-batch-size": 8,
            "cache-max-entry-count": 0.1,
            "eager-mode": True,
            "log-level": "INFO",
        },
        health_interval=1.0,
    )
    with fleet:
        try:
            fleet.wait_ready(timeout=600)
        except Exception:
            for node in fleet.nodes:
                print(fleet.logs(node.url, lines=200))
            raise
        assert fleet.model == "tiny-llama"
        client = fleet.client()
        messages = [{"role": "user", "content": "hello world"}]
        reply = client.chat.completions.create(
            model=fleet.model, messages=messages, max_tokens=8, temperature=0.0
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(
            model=fleet.model, messages=messages, max_tokens=8, stream=True
        )
        chunks = list(stream)
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")

        fleet.sleep(level=1)
        assert all(n.state is NodeStatus.SLEEPING for n in fleet.nodes)
        fleet.wakeup()
        fleet.wait_ready(timeout=120)
        again = client.chat.completions.create(model=fleet.model, messages=messages, max_tokens=4)
        assert again.choices[0].message is not None
        assert fleet.logs(fleet.nodes[0].url)
        pids = [node.pid for node in fleet.processes.values()]
    import psutil

    assert not any(pid is not None and psutil.pid_exists(pid) for pid in pids)
