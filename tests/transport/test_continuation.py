"""Generations that survive their node (transport/continuation.py), over real sims.

A greedy `/generate` of 400 tokens is cut mid-way (its node SIGKILLed, gone
silent, or put to sleep by a weight update with `in_flight="continue"`); the
caller still gets one answer, equal token for token to the uninterrupted one,
through the fleet's clients and through the proxy, streamed and not. The sims'
tokens are a function of the weights and of every id before them (sim/textgen.py,
`own_output_suffix`), as a greedy model's are, so a continuation that sent the
wrong ids would show as different tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from support import (
    GENERATING,
    LOADS_WEIGHTS,
    SimNode,
    StartSim,
    alive,
    in_thread,
    sim_stats,
    sse_events,
    streaming_node,
    wait_until,
)

from lmfleet import LMFleet
from lmfleet.config import FleetOptions, RoutingOptions
from lmfleet.errors import UnknownRequestError
from lmfleet.transport.continuation import parse_versions
from lmfleet.transport.token_dialects import Generation

PROMPT = [11, 12, 13, 14, 15]
BODY = {"input_ids": PROMPT, "max_tokens": 400, "ignore_eos": True}
SHORT = {**BODY, "max_tokens": 150}
"""For the tests that cut several generations one after another (stalls)."""
URL = "http://lmfleet.invalid/generate"
SLOW = GENERATING
WEIGHTS = LOADS_WEIGHTS

pytestmark = pytest.mark.xdist_group("continuation")


def _ids(events: list[dict[str, Any]]) -> list[int]:
    return [token for event in events for token in event["output_ids"]]


def _reference(node: SimNode, body: dict[str, Any] = BODY) -> dict[str, Any]:
    """The uninterrupted generation, asked of one node directly."""
    answer = httpx2.post(node.url + "/generate", json=body, timeout=30)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


@pytest.fixture
def two(start_sim: StartSim) -> list[SimNode]:
    return [start_sim(*SLOW), start_sim(*SLOW)]


def _attach(nodes: list[SimNode], strategy: str = "least_load", **routing: Any) -> LMFleet:
    options = FleetOptions(routing=RoutingOptions(**{"wait_for_node": 10.0, **routing}))
    fleet = LMFleet.attach(
        [n.url for n in nodes], options=options, strategy=strategy, health_interval=0.2
    )
    fleet.wait_ready(timeout=30)
    return fleet


def test_the_sim_continues_its_own_greedy_output(two: list[SimNode]) -> None:
    whole = _reference(two[0])["output_ids"]
    rest = _reference(two[1], {**BODY, "input_ids": PROMPT + whole[:150], "max_tokens": 250})
    assert rest["output_ids"] == whole[150:]
    assert rest["meta_info"]["prompt_tokens"] == len(PROMPT) + 150


def test_a_stream_cut_by_a_killed_node_continues_on_another(two: list[SimNode]) -> None:
    expected = _reference(two[0])["output_ids"]
    with _attach(two) as fleet:
        client = fleet.client(max_retries=0)

        def stream() -> list[dict[str, Any]]:
            with client._client.stream("POST", URL, json={**BODY, "stream": True}) as answer:
                assert answer.status_code == 200
                return sse_events(answer.iter_lines())

        thread, out = in_thread(stream)
        streaming_node(two).process.kill()
        thread.join(60)
    events = out[0]
    assert _ids(events) == expected
    last = events[-1]["meta_info"]
    assert last["finish_reason"] == {"type": "length"}
    assert last["completion_tokens"] == 400 and last["prompt_tokens"] == len(PROMPT)
    assert last["weight_versions"] == [[0, 400, 0]]
    survivor = next(n for n in two if alive(n))
    assert sim_stats(survivor.url)["by_path"]["/generate"] >= 1


def test_a_non_streamed_generation_survives_a_killed_node(two: list[SimNode]) -> None:
    expected = _reference(two[0])
    with _attach(two) as fleet:
        client = fleet.client(max_retries=0)
        thread, out = in_thread(lambda: client.post(URL, body=BODY, cast_to=object))
        streaming_node(two).process.kill()  # the fleet streams it from the node regardless
        thread.join(60)
    answer = out[0]
    assert answer["output_ids"] == expected["output_ids"]
    assert answer["text"] == expected["text"]
    assert answer["meta_info"]["completion_tokens"] == 400
    assert answer["meta_info"]["finish_reason"] == {"type": "length"}


TEXT_BODY = {"prompt": "a prompt the node tokenizes", "max_tokens": 400, "ignore_eos": True}


def test_a_text_prompt_is_generated_from_the_ids_v1_encode_gives(two: list[SimNode]) -> None:
    asked = {"input": TEXT_BODY["prompt"], "do_preprocess": False, "add_bos": True}
    ids = httpx2.post(two[0].url + "/v1/encode", json=asked, timeout=10).json()["input_ids"]
    by_ids = _reference(two[1], {**TEXT_BODY, "prompt": None, "input_ids": ids})
    assert _reference(two[0], TEXT_BODY) == by_ids


def test_a_cut_text_prompt_continues_exactly_from_its_ids(two: list[SimNode]) -> None:
    expected = _reference(two[0], TEXT_BODY)
    with _attach(two) as fleet:
        client = fleet.client(max_retries=0)
        thread, out = in_thread(lambda: client.post(URL, body=TEXT_BODY, cast_to=object))
        streaming_node(two).process.kill()
        thread.join(60)
    answer = out[0]
    assert answer["output_ids"] == expected["output_ids"]
    assert answer["text"] == expected["text"]
    assert answer["meta_info"]["prompt_tokens"] == expected["meta_info"]["prompt_tokens"]
    survivor = next(n for n in two if alive(n))
    assert sim_stats(survivor.url)["by_path"]["/v1/encode"] == 1


@pytest.mark.anyio
async def test_a_stalled_node_is_left_and_the_generation_continues(two: list[SimNode]) -> None:
    expected = _reference(two[0])["output_ids"]
    httpx2.post(two[0].url + "/sim/faults", json={"stall_stream_after": 120}).raise_for_status()
    with _attach(two, "round_robin", stall_timeout=1.0) as fleet:
        client = fleet.async_client(max_retries=0)
        answers = []
        for _ in range(2):  # round robin over two nodes: one lands on the staller
            answers.append(await client.post(URL, body=BODY, cast_to=object))
    assert [a["output_ids"] for a in answers] == [expected, expected]
    # The staller took one or both (beside the reference); the other node finished
    # each of those, and answered the rest itself: two requests in all.
    assert sim_stats(two[0].url)["by_path"]["/generate"] >= 2
    assert sim_stats(two[1].url)["by_path"]["/generate"] == 2


def test_through_the_proxy_a_killed_node_costs_the_caller_nothing(
    two: list[SimNode], serve_fleet: Callable[..., Any]
) -> None:
    expected = _reference(two[0])["output_ids"]
    _, server = serve_fleet([n.url for n in two])

    def stream() -> list[dict[str, Any]]:
        body = {**BODY, "stream": True}
        with httpx2.stream("POST", server.url + "/generate", json=body, timeout=60) as answer:
            return sse_events(answer.iter_lines())

    thread, out = in_thread(stream)
    streaming_node(two).process.kill()
    thread.join(60)
    assert _ids(out[0]) == expected


@pytest.fixture
def weighted(start_sim: StartSim) -> list[SimNode]:
    return [start_sim(*SLOW, *WEIGHTS), start_sim(*SLOW, *WEIGHTS)]


def test_continue_through_a_weight_update_with_the_same_weights(weighted: list[SimNode]) -> None:
    with _attach(weighted) as fleet:
        fleet.update_weights("same", version=1)
        expected = _reference(weighted[0])["output_ids"]
        client = fleet.client(max_retries=0)
        thread, out = in_thread(lambda: client.post(URL, body=BODY, cast_to=object))
        streaming_node(weighted)
        result = fleet.update_weights("same", version=2, in_flight="continue")
        assert result.ok
        # The update did not wait for the generation: it is still running.
        assert thread.is_alive()
        thread.join(60)
    answer = out[0]
    assert answer["output_ids"] == expected
    segments = answer["meta_info"]["weight_versions"]
    assert [s[2] for s in segments] == [1, 2] and segments[-1][1] == 400


def test_continue_with_new_weights_records_the_segments(weighted: list[SimNode]) -> None:
    with _attach(weighted) as fleet:
        old = _reference(weighted[0])["output_ids"]
        client = fleet.client(max_retries=0)

        def stream() -> list[dict[str, Any]]:
            with client._client.stream("POST", URL, json={**BODY, "stream": True}) as answer:
                return sse_events(answer.iter_lines())

        thread, out = in_thread(stream)
        streaming_node(weighted)
        assert fleet.update_weights("new", version=1, in_flight="continue").ok
        thread.join(60)
        events = out[0]
        ids = _ids(events)
        (start, cut, v0), (cut2, end, v1) = events[-1]["meta_info"]["weight_versions"]
        assert (start, v0, v1, end) == (0, 0, 1, 400) and cut == cut2
        assert ids[:cut] == old[:cut] and ids[cut:] != old[cut:]
        rest_body = {**BODY, "input_ids": PROMPT + ids[:cut], "max_tokens": 400 - cut}
        rest = _reference(weighted[0], rest_body)
        assert ids[cut:] == rest["output_ids"]


def test_abort_gives_the_caller_the_partial_answer(weighted: list[SimNode]) -> None:
    with _attach(weighted) as fleet:
        client = fleet.client(max_retries=0)
        thread, out = in_thread(lambda: client.post(URL, body=BODY, cast_to=object))
        streaming_node(weighted)
        assert fleet.update_weights("x", version=1, in_flight="abort").ok
        thread.join(60)
    answer = out[0]
    assert answer["meta_info"]["finish_reason"] == {"type": "abort"}
    assert 0 < len(answer["output_ids"]) < 400


# -- request ids and aborting one request ---------------------------------------------

ABORTABLE = (*SLOW, "--enable-abort-handling")


@pytest.fixture
def abortable(start_sim: StartSim) -> list[SimNode]:
    return [start_sim(*ABORTABLE), start_sim(*ABORTABLE)]


def _open_stream(
    client: Any, body: dict[str, Any], headers: dict[str, str] | None = None, url: str = URL
) -> tuple[threading.Thread, list[Any], threading.Event, list[str]]:
    """Stream `body` in a thread; the answer's request id once its head is in."""
    ids: list[str] = []
    head = threading.Event()

    def run() -> list[dict[str, Any]]:
        with client.stream("POST", url, json=body, headers=headers or {}) as answer:
            ids.append(answer.headers["x-lmfleet-request-id"])
            head.set()
            return sse_events(answer.iter_lines())

    thread, out = in_thread(run)
    return thread, out, head, ids


def test_every_answer_carries_a_request_id_and_one_generation_is_aborted_by_it(
    abortable: list[SimNode],
) -> None:
    with _attach(abortable, "round_robin") as fleet:
        http = fleet.client(max_retries=0)._client
        chat = http.post(  # short: this client reads with httpx2's default 5 s timeout
            "http://lmfleet.invalid/v1/chat/completions",
            json={
                "model": fleet.model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8,
            },
        )
        assert chat.status_code == 200 and chat.headers["x-lmfleet-request-id"]
        stream = {**BODY, "stream": True}
        cut, cut_out, head, ids = _open_stream(http, stream)
        kept, kept_out, _, _ = _open_stream(http, stream, {"x-lmfleet-request-id": "mine-1"})
        assert head.wait(20)
        wait_until(lambda: sum(sim_stats(n.url)["streaming"] for n in abortable) == 2, 20)
        assert fleet.abort(ids[0]) != []
        cut.join(60)
        kept.join(60)
        with pytest.raises(UnknownRequestError):
            fleet.abort(ids[0])  # ended: nothing to abort
    cut_events, kept_events = cut_out[0], kept_out[0]
    assert cut_events[-1]["meta_info"]["finish_reason"] == {"type": "abort"}
    assert 0 < len(_ids(cut_events)) < 400
    assert len(_ids(kept_events)) == 400  # the other generation was left alone


def test_the_proxy_aborts_by_request_id_and_passes_abort_request_on(
    abortable: list[SimNode], serve_fleet: Callable[..., Any]
) -> None:
    _, server = serve_fleet([n.url for n in abortable])
    proxy = httpx2.Client(base_url=server.url, timeout=60)
    by_id, by_id_out, head, ids = _open_stream(
        proxy, {**BODY, "stream": True}, {"x-lmfleet-request-id": "rollout-7"}, "/generate"
    )
    session = {**BODY, "stream": True, "session_id": 4242}
    by_session, by_session_out, _, _ = _open_stream(proxy, session, url="/generate")
    assert head.wait(20) and ids == ["rollout-7"]
    wait_until(lambda: sum(sim_stats(n.url)["streaming"] for n in abortable) == 2, 20)
    assert proxy.post("/fleet/abort?request_id=rollout-7").status_code == 200
    answer = proxy.post("/abort_request", json={"session_id": 4242})
    assert (answer.status_code, answer.content) == (200, b"")
    by_id.join(60)
    by_session.join(60)
    for events in (by_id_out[0], by_session_out[0]):
        assert events[-1]["meta_info"]["finish_reason"] == {"type": "abort"}
    unknown = proxy.post("/abort_request", json={"session_id": 4242})
    assert unknown.status_code == 404 and unknown.json()["type"] == "not_found"


def test_a_caller_that_goes_away_frees_the_node(
    two: list[SimNode], serve_fleet: Callable[..., Any]
) -> None:
    fleet, server = serve_fleet([n.url for n in two])
    body = {**BODY, "stream": True}
    with httpx2.stream("POST", server.url + "/generate", json=body, timeout=60) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                break  # one token in: hang up
    # The node stops generating (LMDeploy aborts a request whose client went away) and
    # the fleet's lease ends: nothing stays in flight anywhere.
    wait_until(lambda: sum(sim_stats(n.url)["inflight"] for n in two) == 0, 20)
    wait_until(lambda: sum(n.inflight for n in fleet.nodes) == 0, 20)
    assert sum(sim_stats(n.url)["aborted"] for n in two) == 1


def test_a_client_that_stops_reading_frees_the_node(two: list[SimNode]) -> None:
    with _attach(two) as fleet:
        http = fleet.client(max_retries=0)._client
        with http.stream("POST", URL, json={**BODY, "stream": True}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: {"):
                    break
        wait_until(lambda: sum(n.inflight for n in fleet.nodes) == 0, 20)
        wait_until(lambda: sum(sim_stats(n.url)["inflight"] for n in two) == 0, 20)


def test_an_updates_cut_uses_up_no_attempt(weighted: list[SimNode]) -> None:
    # One attempt only: a cut for a weight update is no failure, so a generation moved
    # by a rolling update (node by node, maybe twice) still ends whole.
    with _attach(weighted, max_attempts=1) as fleet:
        client = fleet.client(max_retries=0)
        thread, out = in_thread(lambda: client.post(URL, body=BODY, cast_to=object))
        streaming_node(weighted)
        assert fleet.update_weights("w", version=1, rolling=1, in_flight="continue").ok
        thread.join(60)
    answer = out[0]
    assert len(answer["output_ids"]) == 400
    assert answer["meta_info"]["finish_reason"] == {"type": "length"}
    assert len(answer["meta_info"]["weight_versions"]) >= 2


def test_continue_drains_what_it_cannot_continue(weighted: list[SimNode]) -> None:
    # A chat answer cannot be continued: the update (the default, in_flight="continue")
    # waits for it, while a /generate on the same fleet is cut and continued.
    with _attach(weighted, "round_robin") as fleet:
        client = fleet.client(max_retries=0)
        chat, chat_out = in_thread(
            lambda: client.chat.completions.create(
                model=fleet.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=300,
                extra_body={"ignore_eos": True},
            )
        )
        generation, gen_out = in_thread(lambda: client.post(URL, body=BODY, cast_to=object))
        wait_until(lambda: sum(sim_stats(n.url)["streaming"] for n in weighted) >= 1, 20)
        wait_until(lambda: sum(sim_stats(n.url)["inflight"] for n in weighted) == 2, 20)
        assert fleet.update_weights("w", version=1).ok  # the default: continue
        # The chat was waited for: it ended before its node went to sleep.
        assert not chat.is_alive()
        chat.join(60)
        generation.join(60)
    assert chat_out[0].choices[0].finish_reason == "length"
    assert chat_out[0].usage.completion_tokens == 300
    assert len(gen_out[0]["output_ids"]) == 400
    assert [s[2] for s in gen_out[0]["meta_info"]["weight_versions"]] == [0, 1]


def test_the_sync_client_leaves_a_stalled_node_too(two: list[SimNode]) -> None:
    # A blocking read gets the stall bound (transport/read_bound.py): without it the
    # stalled read would wait for the caller's 20 s timeout, and the call would fail.
    expected = _reference(two[0], SHORT)["output_ids"]
    httpx2.post(two[0].url + "/sim/faults", json={"stall_stream_after": 60}).raise_for_status()
    with _attach(two, "round_robin", stall_timeout=1.0, first_byte_timeout=60.0) as fleet:
        client = fleet.client(max_retries=0, timeout=20)
        for stream in (False, True):
            for _ in range(2):  # round robin over two nodes: one lands on the staller
                if stream:
                    with client._client.stream("POST", URL, json={**SHORT, "stream": True}) as r:
                        ids = _ids(sse_events(r.iter_lines()))
                else:
                    ids = client.post(URL, body=SHORT, cast_to=object)["output_ids"]
                assert ids == expected
    assert sim_stats(two[0].url)["by_path"]["/generate"] >= 3


def test_a_fleet_that_does_not_follow_relays_generate_as_it_came(two: list[SimNode]) -> None:
    with _attach(two, follow_generations=False) as fleet:
        client = fleet.client(max_retries=0)
        answer = client.post(URL, body={**BODY, "max_tokens": 5}, cast_to=object)
    assert "weight_versions" not in answer["meta_info"]  # the node's own answer, as is
    assert len(answer["output_ids"]) == 5


@pytest.mark.anyio
async def test_through_the_proxy_a_stalled_node_is_left(
    two: list[SimNode], serve_fleet: Callable[..., Any]
) -> None:
    expected = _reference(two[0], SHORT)["output_ids"]
    httpx2.post(two[0].url + "/sim/faults", json={"stall_stream_after": 60}).raise_for_status()
    options = FleetOptions(routing=RoutingOptions(stall_timeout=1.0, wait_for_node=10.0))
    _, server = serve_fleet([n.url for n in two], options=options, strategy="round_robin")
    async with httpx2.AsyncClient(base_url=server.url, timeout=60) as proxy:
        for stream in (False, True):  # round robin: one of each pair lands on the staller
            for _ in range(2):
                answer = await proxy.post("/generate", json={**SHORT, "stream": stream})
                lines = answer.text.splitlines()
                ids = _ids(sse_events(iter(lines))) if stream else answer.json()["output_ids"]
                assert ids == expected
    assert sim_stats(two[0].url)["by_path"]["/generate"] >= 2


def test_a_callers_timeout_shorter_than_the_generation_is_kept(two: list[SimNode]) -> None:
    # The fleet streams the generation from the node, so bytes keep coming; the caller
    # asked for one answer within 0.5 s, and 400 tokens take longer: its timeout holds.
    with _attach(two) as fleet:
        client = fleet.client(max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            client.post(URL, body=BODY, cast_to=object)
        wait_until(lambda: sum(n.inflight for n in fleet.nodes) == 0, 20)
        wait_until(lambda: sum(sim_stats(n.url)["inflight"] for n in two) == 0, 20)
        # A long enough timeout gets the whole answer.
        answer = fleet.client(max_retries=0, timeout=60).post(URL, body=BODY, cast_to=object)
        assert len(answer["output_ids"]) == 400


@pytest.mark.anyio
async def test_an_async_callers_timeout_is_kept_too(two: list[SimNode]) -> None:
    with _attach(two) as fleet:
        client = fleet.async_client(max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            await client.post(URL, body=BODY, cast_to=object)


def test_the_versions_header_reads_back_as_the_segments() -> None:
    gen = Generation({"input_ids": PROMPT}, stream=False)
    gen.record([1, 2, 3], "abc", 3)
    gen.record([4], "d", 4)
    assert gen.versions_header() == "0-3:3,3-4:4"
    assert parse_versions(gen.versions_header()) == gen.versions == [[0, 3, 3], [3, 4, 4]]
    assert parse_versions("") == [] and parse_versions("0-x:1") is None
