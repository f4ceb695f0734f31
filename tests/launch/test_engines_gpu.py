"""Real vLLM and SGLang servers on a GPU through the same launcher (`pytest -m gpu`).

Skipped without the engine installed or without a GPU; needs no internet (the tiny
random Llama of gpu_model.py). Checks the plumbing a fleet relies on: each engine
recognised, routed to, put to sleep and woken through its own routes, and (SGLang)
a weight update through `/update_weights_from_tensor` with its version reported.
vLLM's weight update is not here: its `/update_weights` needs a weight-transfer
engine set up on both sides (`--weight-transfer-config`,
`/init_weight_transfer_engine`, the trainer's NCCL or IPC sender); the simulated
test (tests/weights/test_engines.py) covers lmfleet's calls. Never run yet: no GPU
machine was lent to the session that wrote them.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
from gpu_model import build_tiny_llama, ready_or_close
from support import wait_until

from lmfleet import LMFleet, NodeStatus
from lmfleet.launch.gpus import visible_gpus

pytestmark = pytest.mark.gpu

SERVER_ARGS = {
    "vllm": {"served-model-name": "tiny-llama", "max-model-len": 1024, "enforce-eager": True},
    "sglang": {"served-model-name": "tiny-llama", "context-length": 1024},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not visible_gpus():
        pytest.skip("no GPU visible")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def launched(engine: str, model: Path) -> LMFleet:
    pytest.importorskip(engine)
    fleet = LMFleet.launch(
        str(model), engine=engine, server_args=SERVER_ARGS[engine], health_interval=1.0
    )
    return ready_or_close(fleet)


def ask(fleet: LMFleet) -> str | None:
    reply = fleet.client().chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hello world"}],
        max_tokens=8,
        temperature=0.0,
    )
    return reply.choices[0].message.content


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_real_engine_is_recognised_routed_slept_and_woken(tiny_model: Path, engine: str) -> None:
    with launched(engine, tiny_model) as fleet:
        (node,) = fleet.nodes
        assert node.engine == engine and node.engine_version
        before = ask(fleet)
        wait_until(lambda: fleet.nodes[0].queue is not None, timeout=30)  # its own /metrics
        fleet.sleep(level=1)
        assert fleet.nodes[0].state is NodeStatus.SLEEPING
        fleet.wakeup()
        assert fleet.nodes[0].state is NodeStatus.HEALTHY
        assert ask(fleet) == before  # same weights, temperature 0


def test_real_sglang_takes_a_weight_update_with_its_version(tiny_model: Path) -> None:
    pytest.importorskip("sglang")
    from sglang.srt.utils import MultiprocessingSerializer  # type: ignore[import-not-found]
    from transformers import AutoModelForCausalLM

    with launched("sglang", tiny_model) as fleet:
        before = ask(fleet)

        model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
        named = [(name, tensor.detach()) for name, tensor in model.named_parameters()]
        serialized = MultiprocessingSerializer.serialize(named, output_str=True)
        result = fleet.update_weights([{"serialized_named_tensors": [serialized]}], version=2)
        assert result.ok, result
        assert fleet.nodes[0].weight_version == 2
        url = fleet.nodes[0].url
        reported = httpx2.get(url + "/model_info", timeout=30).json()["weight_version"]
        assert reported == "2"
        assert ask(fleet) == before  # the same tensors again: the same answer
