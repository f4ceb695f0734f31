"""`lmfleet serve`'s Batch API survives the proxy: SIGKILLed mid-batch and restarted
with the same state directory, it finishes the batch without redoing finished lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
from cli_support import Console
from support import SimNode, StartSim, sim_stats, wait_until

from lmfleet.launch.process import free_port

CHAT = "/v1/chat/completions"
LINES = 60
CONCURRENCY = 2


def _serve(console: Callable[..., Console], port: int, node: SimNode, state: Path) -> Console:
    serve = console(
        "serve",
        "--port",
        str(port),
        "--node",
        node.url,
        "--health-interval",
        "0.2",
        "--state-dir",
        str(state),
        "--batch-concurrency",
        str(CONCURRENCY),
        env={"PYTHONUNBUFFERED": "1"},
    )
    serve.wait_for(r"lmfleet proxy on ")
    return serve


def test_a_batch_survives_a_killed_proxy(
    console: Callable[..., Console], start_sim: StartSim, tmp_path: Path
) -> None:
    node = start_sim("--ttft-ms", "5", "--tpot-ms", "10", "--model", "m")
    port = free_port()
    serve = _serve(console, port, node, tmp_path)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    text = "\n".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
            }
        )
        for i in range(LINES)
    )
    uploaded = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    wait_until(
        lambda: client.batches.retrieve(batch.id).request_counts,
        60,
        "a third of the batch done",
        until=lambda counts: counts is not None and counts.completed >= LINES // 3,
    )
    serve.kill()
    served_before = sim_stats(node.url)["by_path"][CHAT]
    assert served_before < LINES, "killed mid-batch"
    _serve(console, port, node, tmp_path)
    done = wait_until(
        lambda: client.batches.retrieve(batch.id),
        60,
        "the batch finished after the restart",
        until=lambda b: b.status == "completed",
    )
    assert done.request_counts is not None and done.request_counts.completed == LINES
    assert done.output_file_id is not None
    out = [json.loads(r) for r in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(f"r{i}" for i in range(LINES))
    # Only the lines in flight when the proxy died were asked twice.
    assert sim_stats(node.url)["by_path"][CHAT] <= LINES + CONCURRENCY
