"""Parsing a node's /metrics: LMDeploy 0.18's names, labels, engines, and what is missing."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from lmfleet.node.load import METRICS_PATH, PACE_MIN_TOKENS, NodeLoad, parse_metrics
from lmfleet.node.state import NodeState

LMDEPLOY = b"""# HELP lmdeploy:num_requests_running Number of requests in model execution batches.
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="m"} 3.0
lmdeploy:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE lmdeploy:num_requests_waiting gauge
lmdeploy:num_requests_waiting{engine="0",model_name="m"} 4.0
lmdeploy:num_requests_waiting{engine="1",model_name="m"} 0.0
lmdeploy:num_api_requests_waiting{engine="0",model_name="m"} 1.0
lmdeploy:num_api_requests_routed{engine="0",model_name="m"} 9.0
lmdeploy:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5
lmdeploy:gpu_cache_usage_perc{engine="1",model_name="m"} 0.25
lmdeploy:prefix_cache_hit_rate{engine="0",model_name="m"} 0.8
lmdeploy:prompt_tokens_total{engine="0",model_name="m"} 1200.0
lmdeploy:generation_tokens_total{engine="0",model_name="m"} 3.5e3
lmdeploy:request_prefill_time_seconds_bucket{engine="0",le="0.1",model_name="m"} 7.0
process_cpu_seconds_total 12.5
"""


def test_lmdeploy_gauges_are_summed_over_engines_and_ratios_averaged() -> None:
    load = parse_metrics(LMDEPLOY, read_at=5.0, local_inflight=2, fresh_for=1.0)
    assert load == NodeLoad(
        running=5.0,
        waiting=4.0,
        api_waiting=1.0,
        api_routed=9.0,
        cache_usage=0.375,
        prefix_hit_rate=0.8,
        prompt_tokens=1200.0,
        generation_tokens=3500.0,
        read_at=5.0,
        local_inflight=2,
        fresh_for=1.0,
    )
    assert load.outstanding == 10.0  # engine running + waiting, and the api server's queue
    assert load.others(5.5) == 8.0  # ours (2) were counted in the report


def test_the_simulators_metrics_parse() -> None:
    text = (
        b'lmdeploy:num_requests_running{model_name="m"} 1\n'
        b'lmdeploy:num_requests_waiting{model_name="m"} 0\n'
    )
    load = parse_metrics(text)
    assert load is not None and (load.outstanding, load.cache_usage) == (1.0, None)


def test_no_queue_gauge_is_no_report() -> None:
    assert parse_metrics(b"") is None
    assert parse_metrics(b"process_cpu_seconds_total 1\nlmdeploy:prompt_tokens_total 3\n") is None
    assert parse_metrics(b"<html>404</html>") is None


def test_the_metrics_path_asks_for_every_sample_the_parser_reads() -> None:
    """The monitor asks `/metrics?name[]=...` (prometheus_client's filter): an answer
    holding only the asked samples must say what the whole answer says."""
    target = urlsplit(METRICS_PATH)
    assert target.path == "/metrics"
    asked = {value.encode() for key, value in parse_qsl(target.query) if key == "name[]"}
    kept = [
        line
        for line in LMDEPLOY.splitlines()
        if not line.startswith(b"#") and line.split(b"{")[0].split(b" ")[0] in asked
    ]
    assert parse_metrics(b"\n".join(kept)) == parse_metrics(LMDEPLOY)
    assert len(kept) == 11  # everything but the histogram and the process metric


def test_unparsable_values_are_skipped() -> None:
    text = b"lmdeploy:num_requests_running 2\nlmdeploy:num_requests_waiting NaN\n"
    load = parse_metrics(text)
    assert load is not None and load.outstanding == 2.0


def test_others_fade_by_half_each_interval_once_stale() -> None:
    load = NodeLoad(running=8, waiting=0, read_at=0.0, local_inflight=0, fresh_for=2.0)
    assert [load.others(t) for t in (1.0, 2.0, 4.0, 6.0)] == [8.0, 8.0, 4.0, 2.0]


def test_the_peers_requests_count_as_they_are_now_not_as_reported() -> None:
    # Read when ours were 1 and our peers' 3: 6 reported, so 2 are other clients'.
    load = NodeLoad(running=6, waiting=0, read_at=0.0, local_inflight=1, peer_inflight=3)
    assert load.others(0.5) == 2.0
    # Since the read, the peers started 4 more (7) and we finished ours: held is
    # ours now + the peers' now + the report's rest, none counted twice.
    node = NodeState(url="http://n", inflight=0, peers=7, load=load)
    assert node.held(0.5) == 9.0
    assert NodeState(url="http://n", inflight=2, peers=1).held(0.5) == 3.0  # no report


def _read(at: float, running: float, tokens: float | None, previous: NodeLoad | None) -> NodeLoad:
    text = f"lmdeploy:num_requests_running {running}\n"
    if tokens is not None:
        text += f'lmdeploy:generation_tokens_total{{engine="0"}} {tokens}\n'
    load = parse_metrics(text.encode(), read_at=at, previous=previous)
    assert load is not None
    return load


def test_pace_is_batch_seconds_per_generated_token() -> None:
    first = _read(10.0, 4.0, 100.0, None)
    assert first.pace is None  # one read: nothing to compare with
    second = _read(11.0, 4.0, 500.0, first)  # 4 sequences x 1 s, 400 tokens
    assert second.pace == 4.0 / 400.0
    # the running average of the two reads counts: 2 sequences on average over 2 s
    third = _read(13.0, 0.0, 900.0, second)  # 2 s later: the old half counts
    assert third.busy_seconds == 0.5 * 4.0 + 4.0 and third.paced_tokens == 0.5 * 400 + 400
    assert third.pace == (0.5 * 4.0 + 4.0) / (0.5 * 400 + 400)


def test_pace_waits_for_enough_tokens_and_survives_a_restart() -> None:
    first = _read(0.0, 1.0, 0.0, None)
    few = _read(1.0, 1.0, PACE_MIN_TOKENS / 2, first)
    assert few.pace is None
    enough = _read(2.0, 1.0, 2 * PACE_MIN_TOKENS, few)
    assert enough.pace is not None
    restarted = _read(3.0, 1.0, 5.0, enough)  # the counter went backwards
    assert restarted.pace == enough.pace
    no_counter = _read(4.0, 1.0, None, restarted)
    assert no_counter.pace is None  # a node that stopped exporting it gives none
