"""The OpenAI Batch API on the proxy (proxy/batch_api.py), driven by the real `openai`
SDK against a proxy under real uvicorn over real sims."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
import psutil
import pytest
from support import SimNode, StartSim, sim_stats, wait_until

from lmfleet.proxy.options import ProxyOptions

CHAT = "/v1/chat/completions"

pytestmark = pytest.mark.xdist_group("batch_api")


def line(i: int, model: str, **body: Any) -> str:
    asked = {"model": model, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4}
    return json.dumps(
        {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {**asked, **body}}
    )


@pytest.fixture
def sims(start_sim: StartSim) -> list[SimNode]:
    return [start_sim("--ttft-ms", "5", "--tpot-ms", "2") for _ in range(2)]


def submit(client: openai.OpenAI, text: str) -> Any:
    """Upload `text` as a batch input file and start a chat batch on it."""
    uploaded = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")


def reaches(client: openai.OpenAI, batch_id: str, status: str) -> Any:
    """The batch once it has `status`."""
    return wait_until(
        lambda: client.batches.retrieve(batch_id),
        30,
        f"the batch {status}",
        until=lambda b: b.status == status,
    )


def lines_done(client: openai.OpenAI, batch_id: str, count: int) -> None:
    wait_until(
        lambda: client.batches.retrieve(batch_id).request_counts,
        30,
        f"{count} lines done",
        until=lambda counts: counts is not None and counts.completed >= count,
    )


def rows(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    text = client.files.content(file_id).text
    return [json.loads(row) for row in text.splitlines() if row]


def test_a_batch_end_to_end_with_the_openai_sdk(
    sims: list[SimNode], serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    fleet, server = serve_fleet(
        [s.url for s in sims], serve={"options": ProxyOptions(jobs_dir=tmp_path / "jobs")}
    )
    model = fleet.model
    lines = [line(i, model) for i in range(30)]
    lines.insert(7, "{not json")
    lines.insert(12, line(99, model).replace(CHAT, "/v1/embeddings"))
    lines.append(line(5, model))  # r5 again: its own error
    lines.append(line(40, model, max_tokens=-1))  # the node's 400
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(
        file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch"
    )
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"k": "v"}
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"k": "v"}
    done = reaches(client, batch.id, "completed")
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (34, 30)
    assert done.request_counts.failed == 4
    out = rows(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"r{i}" for i in range(30))
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert out[0]["response"]["body"]["object"] == "chat.completion"
    errors = rows(client, done.error_file_id)
    assert len(errors) == 4
    by_id = {r["custom_id"]: r for r in errors}
    assert by_id[None]["error"]["message"] == "the line is not valid JSON"
    assert "url must be" in by_id["r99"]["error"]["message"]
    assert "earlier line" in by_id["r5"]["error"]["message"]
    assert by_id["r40"]["response"]["status_code"] == 400  # a per-line 400 from the node
    served = sum(sim_stats(s.url)["by_path"].get(CHAT, 0) for s in sims)
    assert served == 31  # the valid lines once each, the refused one once
    listed = client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.BadRequestError, match="endpoint must be"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/x", completion_window="24h")  # type: ignore[arg-type]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_an_input_with_no_lines_fails_its_batch_in_one_log_line(
    sims: list[SimNode],
    serve_fleet: Callable[..., Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An empty input is the caller's mistake: the batch fails saying so (as OpenAI's
    do, in `errors`), and the proxy's log gets one WARNING, not a traceback."""
    caplog.set_level(logging.INFO, logger="lmfleet")
    _, server = serve_fleet(
        [sims[0].url], serve={"options": ProxyOptions(jobs_dir=tmp_path / "jobs")}
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    batch = submit(client, "\n\n")
    failed = reaches(client, batch.id, "failed")
    assert failed.errors is not None and failed.errors.data is not None
    assert failed.errors.data[0].message == "the input file has no request lines"
    said = [r for r in caplog.records if batch.id in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in said if "failed" in r.getMessage()] == [
        (logging.WARNING, None)
    ]


def _closed_by_us(port: int) -> int:
    """Connections to `port` that this machine closed first and waits out (TIME_WAIT):
    the proxy's, where it did not keep a connection to that node alive."""
    return sum(
        1
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_TIME_WAIT and c.raddr and c.raddr.port == port
    )


def test_a_finished_batch_leaves_the_upstream_connections_kept_alive(
    sims: list[SimNode], serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    """A batch's client is closed when the batch ends; the transport it went by is
    the proxy's own, which must go on keeping its node connections alive (it did
    not: every request after the first batch opened and closed a connection)."""
    node = sims[0]
    fleet, server = serve_fleet(
        [node.url], serve={"options": ProxyOptions(jobs_dir=tmp_path / "jobs")}
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    batch = submit(client, "\n".join(line(i, fleet.model) for i in range(3)))
    reaches(client, batch.id, "completed")
    port = int(node.url.rsplit(":", 1)[1])
    before = _closed_by_us(port)
    body = {"model": fleet.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx2.Client(base_url=server.url, timeout=10) as caller:
        for _ in range(12):
            assert caller.post("/v1/chat/completions", json=body).status_code == 200
    assert _closed_by_us(port) - before < 3


def test_a_line_past_the_proxys_upstream_timeout_counts_against_its_node(
    start_sim: StartSim, serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    """A batch runs with the proxy's `--upstream-timeout`, the fleet's bound on its
    nodes (not a caller's, which would be no mark against the node): a line that
    runs past it is the node's failure, as a forwarded request's would be."""
    hung = start_sim("--ttft-ms", "5", "--tpot-ms", "2", "--hang")
    fleet, server = serve_fleet(
        [hung.url],
        serve={
            "upstream_timeout": 0.3,
            "options": ProxyOptions(jobs_dir=tmp_path / "jobs", batch_concurrency=1),
        },
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    batch = submit(client, line(0, fleet.model))
    done = reaches(client, batch.id, "completed")
    assert done.request_counts is not None and done.request_counts.failed == 1
    assert fleet.status().nodes[0].errors >= 1


def test_a_cancelled_batch_keeps_what_finished(
    start_sim: StartSim, serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    slow = start_sim("--ttft-ms", "5", "--tpot-ms", "40")
    fleet, server = serve_fleet(
        [slow.url],
        serve={"options": ProxyOptions(jobs_dir=tmp_path / "jobs", batch_concurrency=2)},
    )
    text = "\n".join(line(i, fleet.model, max_tokens=8) for i in range(40))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    batch = submit(client, text)
    lines_done(client, batch.id, 2)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = reaches(client, batch.id, "cancelled")
    assert done.request_counts is not None and 2 <= done.request_counts.completed < 40
    assert len(rows(client, done.output_file_id)) == done.request_counts.completed
    with pytest.raises(openai.BadRequestError, match="cannot cancel"):
        client.batches.cancel(batch.id)


def test_a_batch_past_its_window_expires_with_what_it_finished(
    start_sim: StartSim, serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    """Resumed by a proxy after its completion window ended, a batch expires: the
    lines it finished in the output file, the others in the error file."""
    slow = start_sim("--ttft-ms", "5", "--tpot-ms", "40")
    options = ProxyOptions(jobs_dir=tmp_path / "jobs", batch_concurrency=1)
    fleet, server = serve_fleet([slow.url], serve={"options": options})
    text = "\n".join(line(i, fleet.model, max_tokens=8) for i in range(20))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    batch = submit(client, text)
    lines_done(client, batch.id, 2)
    server.stop()
    stored = tmp_path / "jobs" / "batches" / f"{batch.id}.json"
    record = json.loads(stored.read_text())
    assert record["status"] == "in_progress"
    record["expires_at"] = int(time.time()) - 1  # the window ended while it was down
    stored.write_text(json.dumps(record))
    again = fleet.serve(port=0, options=options)
    client = openai.OpenAI(base_url=again.url + "/v1", api_key="unused", max_retries=0)
    done = reaches(client, batch.id, "expired")
    assert done.expired_at is not None and done.request_counts is not None
    finished = done.request_counts.completed
    assert finished >= 2 and finished + done.request_counts.failed == 20
    errors = rows(client, done.error_file_id)
    assert len(errors) == 20 - finished
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    again.stop()


def test_keys_apply_to_the_batch_api(
    sims: list[SimNode], serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    options = ProxyOptions(jobs_dir=tmp_path / "jobs", api_keys=("right",))
    _, server = serve_fleet([sims[0].url], serve={"options": options})
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.list()
    right = openai.OpenAI(base_url=server.url + "/v1", api_key="right", max_retries=0)
    assert right.files.create(file=("in.jsonl", b"{}\n"), purpose="batch").bytes == 3
    with pytest.raises(openai.BadRequestError, match="purpose"):
        right.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")


def test_each_client_key_sees_only_its_own_files_and_batches(
    sims: list[SimNode], serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    # A proxy for a team: a batch's input and output hold one member's prompts and
    # answers, which another member's key must not list, read, cancel or delete.
    jobs = tmp_path / "jobs"
    options = ProxyOptions(jobs_dir=jobs, api_keys=("alice-key", "bob-key"))
    fleet, server = serve_fleet([sims[0].url], serve={"options": options})
    alice, bob = (
        openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for key in ("alice-key", "bob-key")
    )
    batch = submit(alice, "\n".join(line(i, fleet.model) for i in range(3)))
    done = reaches(alice, batch.id, "completed")
    assert len(rows(alice, done.output_file_id)) == 3
    mine = {f.id for f in alice.files.list()}
    assert mine == {batch.input_file_id, done.output_file_id}
    assert [b.id for b in alice.batches.list()] == [batch.id]
    assert (
        not hasattr(done, "owner")
        and "owner" not in alice.files.retrieve(batch.input_file_id).model_extra
    )  # type: ignore[operator]

    assert bob.files.list().data == [] and bob.batches.list().data == []
    for file_id in mine:
        with pytest.raises(openai.NotFoundError, match="No such File object"):
            bob.files.retrieve(file_id)
        with pytest.raises(openai.NotFoundError):
            bob.files.content(file_id)
        with pytest.raises(openai.NotFoundError):
            bob.files.delete(file_id)
    with pytest.raises(openai.NotFoundError, match="No such Batch object"):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError, match="No such File object"):
        bob.batches.create(
            input_file_id=batch.input_file_id, endpoint=CHAT, completion_window="24h"
        )
    assert {f.id for f in alice.files.list()} == mine  # nothing of alice's went

    stored = b"".join(p.read_bytes() for p in jobs.rglob("*.json"))
    assert b"alice-key" not in stored and b"bob-key" not in stored  # a digest, not the key


def _age(jobs: Path, file_id: str) -> None:
    """Make a file's time run out, as 30 days would (its object, as the proxy wrote it)."""
    stored = jobs / "files" / f"{file_id}.json"
    record = json.loads(stored.read_text())
    record["expires_at"] = int(time.time()) - 1
    stored.write_text(json.dumps(record))


def test_files_expire_as_openais_do_and_finished_batches_keep_no_journal(
    start_sim: StartSim, serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    """A proxy that runs for months must not keep every batch's prompts and answers:
    files expire (30 days, or their `expires_after`), expired ones are gone at once
    and deleted by the proxy's sweep (at its start, then every minute), but for the
    input of a batch that still runs; a finished batch's journal is deleted."""
    slow = start_sim("--ttft-ms", "5", "--tpot-ms", "40")
    jobs = tmp_path / "jobs"
    options = ProxyOptions(jobs_dir=jobs, batch_concurrency=1)
    fleet, server = serve_fleet([slow.url], serve={"options": options})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    plain = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    assert plain.expires_at == plain.created_at + 30 * 24 * 3600
    hour = client.files.create(
        file=("b.jsonl", b"{}\n"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert hour.expires_at == hour.created_at + 3600
    for wrong in (60, 31 * 24 * 3600):
        with pytest.raises(openai.BadRequestError, match="from 3600"):
            client.files.create(
                file=("c.jsonl", b"{}\n"),
                purpose="batch",
                expires_after={"anchor": "created_at", "seconds": wrong},
            )

    short = client.batches.create(
        input_file_id=client.files.create(
            file=("d.jsonl", line(0, fleet.model).encode()), purpose="batch"
        ).id,
        endpoint=CHAT,
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    done = reaches(client, short.id, "completed")
    assert done.output_file_id is not None
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200
    assert not list((jobs / "batches").glob("*.sqlite*"))  # its answers are in the output
    with pytest.raises(openai.BadRequestError, match="output_expires_after"):
        client.batches.create(
            input_file_id=plain.id,
            endpoint=CHAT,
            completion_window="24h",
            output_expires_after={"anchor": "now", "seconds": 7200},  # type: ignore[typeddict-item]
        )

    running = submit(client, "\n".join(line(i, fleet.model, max_tokens=8) for i in range(20)))
    lines_done(client, running.id, 1)
    server.stop()  # while the batch runs
    for file_id in (hour.id, done.output_file_id, running.input_file_id):
        _age(jobs, file_id)
    again = fleet.serve(port=0, options=options)
    client = openai.OpenAI(base_url=again.url + "/v1", api_key="unused", max_retries=0)
    for file_id in (hour.id, done.output_file_id):
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(file_id)
    listed = {f.id for f in client.files.list()}
    assert plain.id in listed and hour.id not in listed and done.output_file_id not in listed
    assert (jobs / "files" / plain.id).exists()
    wait_until(
        lambda: (
            not (jobs / "files" / hour.id).exists()
            and not (jobs / "files" / done.output_file_id).exists()
        ),  # type: ignore[operator]
        10,
        "the sweep deleting the expired files",
    )
    # The same sweep kept the running batch's expired input for it, and it completes.
    assert (jobs / "files" / running.input_file_id).exists()
    resumed = reaches(client, running.id, "completed")
    assert resumed.request_counts is not None and resumed.request_counts.completed == 20
    again.stop()


def test_the_files_list_pages_as_openais_does(
    sims: list[SimNode], serve_fleet: Callable[..., Any], tmp_path: Path
) -> None:
    """`limit`, `after` and `order` (a month of a team's batch files is thousands):
    the SDK's auto-pagination walks every file once."""
    _, server = serve_fleet([sims[0].url], serve={"options": ProxyOptions(jobs_dir=tmp_path)})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    made = [client.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose="batch").id for i in range(5)]
    first = client.files.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    walked = [f.id for f in client.files.list(limit=2)]  # the SDK follows `after`
    assert sorted(walked) == sorted(made) and len(walked) == 5
    assert [f.id for f in client.files.list(order="asc")] == walked[::-1]
    with pytest.raises(openai.BadRequestError, match="order must be"):
        client.files.list(order="sideways")  # type: ignore[arg-type]
