"""The fleet's assembled `/generate` answers against the real server's own.

The fleet follows every `/generate` as a stream (transport/continuation.py), also
when its caller asked for one answer, and assembles that answer itself. Here a real
LMDeploy 0.18 api_server (stub engine, `--logprobs-mode raw_logprobs`) answers the
same bodies twice: directly, non-streamed, and through a fleet; the answers must
be equal field by field (text, output_ids, every `meta_info` field), the fleet's
adding only `meta_info.weight_versions`. Streams are compared event by event the
same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conformance.peer_support import API_KEY, Server, start_peer

from lmfleet import LMFleet

AUTH = {"Authorization": f"Bearer {API_KEY}"}
IDS = [5, 6, 7, 8, 9, 10]
BODIES = {
    "ids": {"input_ids": IDS},
    "ids-short": {"input_ids": IDS, "max_tokens": 5},
    "ids-ignore-eos": {"input_ids": IDS, "max_tokens": 40, "ignore_eos": True},
    "prompt": {"prompt": "hello world"},
    "logprobs": {"input_ids": IDS, "max_tokens": 6, "return_logprob": True},
    "top-logprobs": {
        "input_ids": IDS,
        "max_tokens": 6,
        "return_logprob": True,
        "top_logprobs_num": 3,
    },
    "stop-word": {"prompt": "hello world", "stop": ["delta"]},
}


@pytest.fixture(scope="module")
def peer(peer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("assembled-logs")
    server = start_peer(peer_model, logs, "--api-keys", API_KEY, "--logprobs-mode", "raw_logprobs")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(peer: Server) -> Iterator[LMFleet]:
    with LMFleet.attach([peer.url], api_key=API_KEY, health_interval=0.3) as fleet:
        fleet.wait_ready(timeout=60)
        yield fleet


def _without_versions(answer: dict[str, Any]) -> dict[str, Any]:
    meta = dict(answer.get("meta_info") or {})
    meta.pop("weight_versions", None)
    return {**answer, "meta_info": meta}


def _events(response: httpx2.Response) -> list[dict[str, Any]]:
    lines = response.text.splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


@pytest.mark.parametrize("name", sorted(BODIES))
def test_an_assembled_answer_equals_the_servers_own(
    name: str, peer: Server, fleet: LMFleet
) -> None:
    body = BODIES[name]
    own = httpx2.post(peer.url + "/generate", json=body, headers=AUTH, timeout=60)
    through = fleet.client(max_retries=0).post(
        "http://lmfleet.invalid/generate", body=body, cast_to=httpx2.Response
    )
    assert own.status_code == through.status_code == 200
    assembled = through.json()
    assert assembled["meta_info"]["weight_versions"] == (
        [[0, len(assembled["output_ids"]), 0]] if assembled["output_ids"] else []
    )
    assert _without_versions(assembled) == own.json()


@pytest.mark.parametrize("name", sorted(BODIES))
def test_a_followed_stream_equals_the_servers_own(name: str, peer: Server, fleet: LMFleet) -> None:
    body = {**BODIES[name], "stream": True}
    own = httpx2.post(peer.url + "/generate", json=body, headers=AUTH, timeout=60)
    through = fleet.client(max_retries=0).post(
        "http://lmfleet.invalid/generate", body=body, cast_to=httpx2.Response
    )
    assert own.status_code == through.status_code == 200
    assert through.text.rstrip().endswith("data: [DONE]")
    assert [_without_versions(e) for e in _events(through)] == _events(own)


@pytest.mark.parametrize("prompt", ["hello world", "  two  spaces\nand a new line"])
def test_a_text_prompt_is_generated_from_the_ids_v1_encode_gives(prompt: str, peer: Server) -> None:
    """What makes a cut text prompt's continuation exact: the fleet continues it
    from the ids `/v1/encode` (no chat template, with BOS) makes of the prompt."""
    asked = {"input": prompt, "do_preprocess": False, "add_bos": True}
    encoded = httpx2.post(peer.url + "/v1/encode", json=asked, headers=AUTH, timeout=60)
    ids = encoded.json()["input_ids"]
    by_text = httpx2.post(peer.url + "/generate", json={"prompt": prompt}, headers=AUTH, timeout=60)
    by_ids = httpx2.post(peer.url + "/generate", json={"input_ids": ids}, headers=AUTH, timeout=60)
    assert by_text.status_code == by_ids.status_code == 200
    assert by_text.json() == by_ids.json()
    assert by_text.json()["meta_info"]["prompt_tokens"] == len(ids)
    no_bos = httpx2.post(
        peer.url + "/generate", json={"input_ids": ids[1:]}, headers=AUTH, timeout=60
    )
    assert no_bos.json()["output_ids"] != by_ids.json()["output_ids"]  # the ids matter
