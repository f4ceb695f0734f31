"""A real RL weight update on a GPU (`pytest -m gpu`): LMDeploy 0.18's api_server with
the Ray executor takes new random weights through `/update_weights`, and afterwards
answers at temperature 0 exactly as a fresh server loaded with the same tensors.

Skipped, with the reason, without lmdeploy, a GPU or Ray (LMDeploy 0.18 loads pushed
weights only with `--distributed-executor-backend ray`). The trainer side is this
test process: it holds the new tensors on the GPU and sends CUDA IPC handles made by
`lmfleet.weights.serialize` (LMDeploy's `serialize_state_dict`), as a colocated RL
trainer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gpu_model import build_tiny_llama, random_model, ready_or_close

from lmfleet import LMFleet
from lmfleet.launch.gpus import visible_gpus
from lmfleet.weights import serialize

pytestmark = pytest.mark.gpu

SERVER_ARGS = {
    "model-name": "tiny-llama",
    "session-len": 1024,
    "max-batch-size": 8,
    "cache-max-entry-count": 0.1,
    "eager-mode": True,
}
PROMPTS = ["hello world", "the quick brown fox", "lazy dog 7"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The model the server starts with (seed 0) and the one it is updated to (seed 1)."""
    pytest.importorskip("lmdeploy")
    pytest.importorskip("ray", reason="LMDeploy 0.18 loads pushed weights only with Ray")
    if not visible_gpus():
        pytest.skip("no GPU visible")
    old = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-old"), seed=0)
    new = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-new"), seed=1)
    return old, new


def answers(fleet: LMFleet) -> list[str]:
    client = fleet.client(max_retries=0)
    texts = []
    for prompt in PROMPTS:
        reply = client.chat.completions.create(
            model=fleet.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0.0,
        )
        texts.append(reply.choices[0].message.content or "")
    return texts


def launch(path: Path) -> LMFleet:
    fleet = LMFleet.launch(
        str(path), nodes=1, weight_updates=True, server_args=SERVER_ARGS, health_interval=1.0
    )
    return ready_or_close(fleet)


def test_update_weights_matches_a_fresh_server(models: tuple[Path, Path]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    old, new = models
    tokenizer = transformers.AutoTokenizer.from_pretrained(new)
    trainer: dict[str, Any] = {
        name: tensor.cuda().contiguous()
        for name, tensor in random_model(tokenizer, seed=1).state_dict().items()
    }
    with launch(new) as fresh:
        expected = answers(fresh)
    with launch(old) as fleet:
        before = answers(fleet)
        result = fleet.update_weights(lambda node: [serialize(trainer)], version=1)
        assert result.ok, result.failed
        assert fleet.nodes[0].weight_version == 1
        after = answers(fleet)
    torch.cuda.synchronize()
    assert after == expected
    assert before != expected  # the update changed what the node says
