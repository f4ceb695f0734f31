"""A generation continued across a real weight update on a GPU (`pytest -m gpu`):
LMDeploy 0.18's api_server (Ray executor, `--enable-abort-handling`) runs a greedy
`/generate` of 400 tokens; mid-way the fleet pushes the very tensors the server
already has (`update_weights(..., in_flight="continue")`): the generation is cut by
the sleep and finished after the update from its prompt ids plus the ids it had,
and must equal the uninterrupted one token for token, with two version segments.

Skipped, with the reason, without lmdeploy, a GPU or Ray. Not yet run on a GPU: no
machine was lent to the session that wrote it (see the closing notes of issue 27).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from gpu_model import build_tiny_llama, random_model
from support import wait_until

from lmfleet import LMFleet
from lmfleet.launch.gpus import visible_gpus
from lmfleet.weights import serialize

pytestmark = pytest.mark.gpu

SERVER_ARGS = {
    "model-name": "tiny-llama",
    "session-len": 2048,
    "max-batch-size": 8,
    "cache-max-entry-count": 0.1,
    "eager-mode": True,
    "enable-abort-handling": True,
}
BODY = {"input_ids": [1, 15, 27, 33, 8], "max_tokens": 400, "ignore_eos": True, "temperature": 0}
URL = "http://lmfleet.invalid/generate"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lmdeploy")
    pytest.importorskip("ray", reason="LMDeploy 0.18 loads pushed weights only with Ray")
    if not visible_gpus():
        pytest.skip("no GPU visible")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


def test_a_greedy_generation_survives_an_update_with_the_same_tensors(model: Path) -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    trainer: dict[str, Any] = {
        name: tensor.cuda().contiguous()
        for name, tensor in random_model(tokenizer, seed=0).state_dict().items()
    }
    fleet = LMFleet.launch(
        str(model), nodes=1, weight_updates=True, server_args=SERVER_ARGS, wait_for_node=600
    )
    with fleet:
        fleet.wait_ready(timeout=900)
        client = fleet.client(max_retries=0, timeout=600)
        expected = client.post(URL, body=BODY, cast_to=object)["output_ids"]
        out: list[Any] = []
        thread = threading.Thread(
            target=lambda: out.append(client.post(URL, body=BODY, cast_to=object))
        )
        thread.start()
        wait_until(lambda: fleet.nodes[0].inflight, 60, "the generation on the node")
        result = fleet.update_weights(
            lambda node: [serialize(trainer)], version=1, in_flight="continue"
        )
        assert result.ok, result.failed
        thread.join(600)
    answer = out[0]
    assert answer["output_ids"] == expected
    versions = [segment[2] for segment in answer["meta_info"]["weight_versions"]]
    assert versions == [0, 1]  # cut by the update, finished after it
