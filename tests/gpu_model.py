"""A tiny Llama with random weights and a byte-level BPE tokenizer, built in code.

For the `-m gpu` tests: no internet is needed, and LMDeploy's PyTorch backend
serves it. Its output is gibberish by design; the tests check plumbing and, for
weight updates, that the same tensors give the same temperature-0 output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """Save the tokenizer and a random model (seeded) under `path`; return `path`."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
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
    model = random_model(tokenizer, seed)
    model.save_pretrained(path)
    generation = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    generation.save_pretrained(path)
    return path


def random_model(tokenizer: Any, seed: int) -> Any:
    """The tiny Llama with weights drawn from `seed` (bfloat16, on the CPU)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
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
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def ready_or_close(fleet: Any, timeout: float = 900.0) -> Any:
    """`fleet` once its launched nodes are ready; else their log tails printed (the
    only trace a GPU run leaves), the fleet closed and the error raised."""
    try:
        fleet.wait_ready(timeout=timeout)
    except Exception:
        for node in fleet.nodes:
            print(fleet.logs(node.url, lines=200))
        fleet.close()
        raise
    return fleet
