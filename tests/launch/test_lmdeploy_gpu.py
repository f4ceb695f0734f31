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

from lmfleet import LMFleet, NodeStatus
from lmfleet.launch.gpus import visible_gpus

pytestmark = pytest.mark.gpu

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lmdeploy")
    if not visible_gpus():
        pytest.skip("no GPU visible")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = tokenizers.ByteLevelBPETokenizer()
    corpus = [f"hello world {i} the quick brown fox jumps over the lazy dog" for i in range(200)]
    specials = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe.train_from_iterator(corpus, vocab_size=512, min_frequency=1, special_tokens=specials)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64: supported by every attention kernel
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    generation = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    generation.save_pretrained(path)
    return path


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
