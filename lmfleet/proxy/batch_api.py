"""OpenAI's Files and Batch APIs on the proxy: batch jobs run on the fleet in the background.

`client.files.create(file=..., purpose="batch")`, `client.batches.create(...)`,
`client.batches.retrieve(id)` and `client.files.content(output_file_id)` of the real
`openai` SDK work unchanged. A batch runs through the same routing as every other
request (the fleet's transport) and the same batch machinery as `chat_many`
(notebook/batch.py: bounded concurrency, retries, a journal), so each line's answer
is recorded as it finishes and a proxy restarted with the same state directory
resumes its running batches without asking a finished line again.

Lines are checked one by one: a malformed line (not JSON, no `custom_id`, another
`url`, a `custom_id` used twice) goes to the batch's error file with its reason, and
so does a line a node refuses (its status and body, as OpenAI reports it); the other
lines run. Batch jobs run `batch_concurrency` lines at a time; by default ("auto")
as many as the nodes run at once, from their own `/metrics` (jobs/adaptive.py), so
that interactive requests beside a batch do not wait behind a queue it filled.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
from anyio.abc import TaskGroup, TaskStatus

from lmfleet.errors import ConfigError, UnknownObjectError
from lmfleet.jobs.adaptive import START_PER_NODE, AdaptiveConcurrency
from lmfleet.jobs.batches import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    RUNNING,
    BatchStore,
    Line,
    new_batch,
    parse_lines,
)
from lmfleet.jobs.files import FileStore, expiry
from lmfleet.jobs.journal import Journal, item_key
from lmfleet.jobs.owners import OWNER, owner_of, shown, visible
from lmfleet.jobs.results import Answered, ItemError
from lmfleet.notebook.batch import (
    DEFAULT_MAX_CONCURRENCY,
    answer_versions,
    fleet_signals,
    run_batch,
)
from lmfleet.proxy.asgi import Receive, Scope, Send, header, read_body, send_bytes, send_json
from lmfleet.surface import FleetSurface
from lmfleet.transport import AsyncFleetTransport
from lmfleet.transport.plan import OWN_TIMEOUT

log = logging.getLogger("lmfleet.proxy")

MAX_FILE_BYTES = 200 * 1024 * 1024
"""OpenAI's limit on a batch input file."""
PLACEHOLDER = "http://lmfleet.invalid"
FINISHED = ("completed", "failed", "expired", "cancelled")
WATCH_EVERY = 1.0
"""Seconds between two looks at the shared directory (`BatchJobs._watch`, `--workers`)."""
SWEEP_EVERY = 60.0
"""Seconds between two deletions of expired files (`BatchJobs._sweep`)."""
EXPIRED = "This request could not be executed before the completion window expired."
"""OpenAI's message for a line its batch's window ended before."""


class BatchJobs:
    """The proxy's files and batches under `root`, and the tasks that run the batches."""

    def __init__(
        self,
        root: Path,
        fleet: FleetSurface,
        transport: AsyncFleetTransport,
        concurrency: int | str,
        timeout: float | None,
        *,
        shared: bool = False,
    ) -> None:
        self.files = FileStore(root / "files")
        self._fleet = fleet
        self.batches = BatchStore(root / "batches")
        self._transport = transport
        self._concurrency = concurrency
        self._timeout = timeout
        self._group: TaskGroup | None = None
        self._running: dict[str, anyio.CancelScope] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._shared = shared
        """Other processes share `root` (`--workers`): see `_watch`."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve batch jobs until cancelled (the proxy's lifespan): first resume every
        batch a previous run of the proxy left unfinished."""
        async with anyio.create_task_group() as group:
            self._group = group
            self._adopt()
            if self._shared:
                group.start_soon(self._watch)
            group.start_soon(self._sweep)
            task_status.started()
            await anyio.sleep_forever()

    def _adopt(self) -> None:
        """Run every unfinished batch no process runs (a previous run of the proxy's,
        or a worker's that died): its journal says which lines are done."""
        assert self._group is not None
        for batch in self.batches.list():
            batch_id = batch["id"]
            if batch["status"] not in RUNNING or self.batches.holds(batch_id):
                continue
            if not self.batches.claim(batch_id):
                continue  # another worker runs it
            if self.batches.get(batch_id)["status"] not in RUNNING:  # finished meanwhile
                self.batches.release(batch_id)
                continue
            log.info("resuming batch %s (%s)", batch_id, batch["status"])
            self._group.start_soon(self._run, batch_id)

    async def _watch(self) -> None:
        """With other workers on the same directory, every `WATCH_EVERY` s: publish the
        live counts of the batches run here (the others answer from the files), cancel
        those another worker was asked to cancel, adopt those a dead worker left."""
        shown: dict[str, dict[str, int]] = {}
        while True:
            await anyio.sleep(WATCH_EVERY)
            for batch_id in list(self._running):
                if self.batches.cancel_asked(batch_id):
                    self._cancel_here(batch_id)
                    continue
                live = self._counts.get(batch_id)
                if live is not None and shown.get(batch_id) != live:
                    batch = self.batches.get(batch_id)
                    if batch["status"] == "in_progress":
                        batch["request_counts"] = shown[batch_id] = dict(live)
                        self.batches.save(batch)
            for gone in set(shown) - set(self._running):
                del shown[gone]
            self._adopt()

    async def _sweep(self) -> None:
        """Delete the files past their time (lmfleet/jobs/files.py) now and every
        `SWEEP_EVERY` s, but the inputs of the batches that still run (a restart
        reads them again), and the journals finished batches left behind (a proxy
        killed between a batch's end and its journal's deletion)."""
        while True:
            try:
                self._sweep_once()
            except (OSError, KeyError, TypeError) as exc:  # a disk's or a hand-edited file's
                log.warning("could not delete expired Batch API files: %r", exc)
            await anyio.sleep(SWEEP_EVERY)

    def _sweep_once(self) -> None:
        running: set[str] = set()
        for batch in self.batches.list():
            if batch["status"] in RUNNING:
                running.add(batch["input_file_id"])
            elif self.batches.journal_path(batch["id"]).exists():
                self.batches.drop_journal(batch["id"])
        gone = self.files.expire(keep=frozenset(running))
        if gone:
            log.info("deleted %d expired file(s): %s", len(gone), ", ".join(gone))

    # -- the routes' side -------------------------------------------------------------

    def create(self, asked: Any, owner: str | None = None) -> dict[str, Any]:
        """A new batch of `owner`'s (lmfleet/jobs/owners.py), on a file of theirs."""
        if not isinstance(asked, dict):
            raise ConfigError("the body must be a JSON object")
        file_id, endpoint = asked.get("input_file_id"), asked.get("endpoint")
        window = asked.get("completion_window")
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        if window not in COMPLETION_WINDOWS:
            raise ConfigError(f"completion_window must be '24h', got {window!r}")
        if not isinstance(file_id, str):
            raise ConfigError("input_file_id must be the id of an uploaded file")
        purpose = self.files.get(file_id, owner)["purpose"]
        if purpose != "batch":
            raise ConfigError(f"the input file must have purpose 'batch', not {purpose!r}")
        metadata = asked.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ConfigError("metadata must be an object")
        keep = asked.get("output_expires_after")
        expiry(keep, "output_expires_after")  # checked now; its files are made at the end
        batch = new_batch(file_id, endpoint, window, metadata)
        if keep is not None:
            batch["output_expires_after"] = keep
        if owner is not None:
            batch[OWNER] = owner  # its output and error files are theirs too (`_output`)
        self.batches.claim(batch["id"])  # before the file exists: no other worker adopts it
        self.batches.save(batch)
        assert self._group is not None, "BatchJobs.run is the proxy's lifespan task"
        self._group.start_soon(self._run, batch["id"])
        return batch

    def get(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        """The batch, its counts live while it runs; another owner's is unknown."""
        batch = self.batches.get(batch_id)
        if not visible(batch, owner):
            raise UnknownObjectError(f"No such Batch object: {batch_id}")
        return self.live(batch)

    def live(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` as read from its file, with what is newer than the file: the counts
        of a batch run here, a cancel asked through another worker."""
        live = self._counts.get(batch["id"])
        if live is not None and batch["status"] not in FINISHED:
            batch["request_counts"] = dict(live)
        if batch["status"] in RUNNING and self.batches.cancel_asked(batch["id"]):
            batch["status"] = "cancelling"  # asked through another worker: on its way
        return batch

    def cancel(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        batch = self.get(batch_id, owner)
        if batch["status"] in FINISHED or batch["status"] == "cancelling":
            raise ConfigError(f"cannot cancel a batch that is {batch['status']}")
        if self.batches.holds(batch_id) or not self._shared:
            self._cancel_here(batch_id)
            return self.get(batch_id)
        # Another worker runs it: ask, and answer as OpenAI does (it is cancelling).
        self.batches.ask_cancel(batch_id)
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        return batch

    def _cancel_here(self, batch_id: str) -> None:
        """Cancel a batch this process runs (or that nobody runs: it ends as cancelled
        when it is next run)."""
        batch = self.batches.get(batch_id)
        if batch["status"] != "cancelling":
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(time.time())
            self.batches.save(batch)
        scope = self._running.get(batch_id)
        if scope is not None:
            scope.cancel()  # its task finalizes it as cancelled

    # -- running one batch --------------------------------------------------------------

    async def _run(self, batch_id: str) -> None:
        try:
            if self.batches.cancel_asked(batch_id):  # asked while no process ran it
                self._cancel_here(batch_id)
            batch = self.batches.get(batch_id)
            lines = self._lines(batch)  # read once: run, then written out
            left = batch["expires_at"] - time.time()
            with anyio.CancelScope(deadline=anyio.current_time() + left) as scope:
                self._running[batch_id] = scope
                if batch["status"] != "cancelling" and left > 0:
                    await self._execute(batch, lines)
            self._finalize(batch_id, lines, expired=left <= 0 or scope.cancelled_caught)
        except ConfigError as exc:  # its input's doing: one line, no traceback
            log.warning("batch %s failed: %s", batch_id, exc)
            self._fail(batch_id, str(exc))
        except Exception as exc:
            log.exception("batch %s failed", batch_id)
            self._fail(batch_id, str(exc))
        finally:
            self._running.pop(batch_id, None)
            self._counts.pop(batch_id, None)
            self.batches.release(batch_id)

    def _lines(self, batch: dict[str, Any]) -> list[Line]:
        try:
            data = self.files.content(batch["input_file_id"], expired_too=True)
        except UnknownObjectError:
            raise ConfigError(f"the input file {batch['input_file_id']} is gone") from None
        lines = parse_lines(data, batch["endpoint"])
        if not lines:
            raise ConfigError("the input file has no request lines")
        return lines

    async def _execute(self, batch: dict[str, Any], lines: list[Line]) -> None:
        batch_id, endpoint = batch["id"], batch["endpoint"]
        keys = [item_key(endpoint, None, line.raw, {}) for line in lines]
        with Journal(self.batches.journal_path(batch_id), create=True) as journal:
            done = journal.begin(endpoint, keys)
            counts = self._counts[batch_id] = {"total": len(lines), "completed": 0, "failed": 0}
            for line in lines:
                if line.error is not None and line.index not in done:
                    journal.record_error(
                        line.index, keys[line.index], _error("invalid", line.error), 0
                    )
            answered, failed = journal.counts()
            counts["completed"], counts["failed"] = answered, failed
            if batch["status"] == "validating":
                batch.update(status="in_progress", in_progress_at=int(time.time()))
                batch["request_counts"] = dict(counts)
                self.batches.save(batch)
            runnable = [line for line in lines if line.error is None and line.index not in done]

            def finished(index: int, outcome: Answered[Any] | ItemError) -> None:
                key = keys[runnable[index].index]
                if isinstance(outcome, ItemError):
                    journal.record_error(
                        runnable[index].index, key, _failure(outcome), outcome.attempts
                    )
                    counts["failed"] += 1
                    return
                journal.record(
                    runnable[index].index, key, outcome.value, outcome.tokens, outcome.versions
                )
                counts["completed"] += 1

            async with self._client() as client:  # ended by a cancel or the window's end
                await run_batch(
                    runnable,
                    _sender(client, endpoint),
                    concurrency=self._limit(),
                    progress=False,
                    finished=finished,
                    signals=fleet_signals(self._fleet, None),
                )

    def _limit(self) -> int | AdaptiveConcurrency:
        """The batch's in-flight limit: the proxy's number, or one that adapts to the
        nodes (`concurrency="auto"`, shared with `chat_many`)."""
        if isinstance(self._concurrency, int):
            return self._concurrency
        nodes = sum(1 for n in self._fleet.registry.snapshot() if n.routable)
        return AdaptiveConcurrency(DEFAULT_MAX_CONCURRENCY, START_PER_NODE * max(nodes, 1))

    def _client(self) -> openai.AsyncOpenAI:
        http = httpx2.AsyncClient(transport=_LineTransport(self._transport))
        return openai.AsyncOpenAI(
            base_url=PLACEHOLDER + "/v1",
            api_key="lmfleet",
            http_client=http,
            max_retries=0,  # the batch retries its lines
            timeout=self._timeout,
        )

    def _finalize(self, batch_id: str, lines: list[Line], expired: bool = False) -> None:
        """Write the output and error files and mark the batch done, cancelled, or
        expired (its completion window ended first: the lines not run are errors)."""
        batch = self.batches.get(batch_id)
        cancelled = batch["status"] == "cancelling"
        expired = expired and not cancelled
        if not cancelled:
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            self.batches.save(batch)
        path = self.batches.journal_path(batch_id)
        entries = {}
        if path.exists():
            with Journal(path) as journal:
                entries = {e.index: e for e in journal.entries()}
        out: list[bytes] = []
        errors: list[bytes] = []
        for line in lines:
            entry = entries.get(line.index)
            if entry is not None and entry.ok:
                result: dict[str, Any] = {"response": entry.answer, "error": None}
            elif entry is not None:
                result = json.loads(entry.error or "{}")
            elif expired:
                result = json.loads(_error("batch_expired", EXPIRED))
            else:
                continue  # not run (cancelled before it)
            digest = hashlib.sha256(f"{batch_id}:{line.index}".encode()).hexdigest()
            row = {"id": "batch_req_" + digest[:24], "custom_id": line.custom_id}
            row.update(response=result.get("response"), error=result.get("error"))
            (out if entry is not None and entry.ok else errors).append(json.dumps(row).encode())
        if out:
            batch["output_file_id"] = self._output(batch, "output", out)
        if errors:
            batch["error_file_id"] = self._output(batch, "error", errors)
        now = int(time.time())
        batch["request_counts"] = {
            "total": len(lines),
            "completed": len(out),
            "failed": len(errors),
        }
        if cancelled:
            batch.update(status="cancelled", cancelled_at=now)
            self.batches.cancel_answered(batch_id)
        elif expired:
            batch.update(status="expired", expired_at=now)
        else:
            batch.update(status="completed", completed_at=now)
        self.batches.save(batch)
        self.batches.drop_journal(batch_id)  # after the save: a restart before it resumes

    def _output(self, batch: dict[str, Any], kind: str, rows: list[bytes]) -> str:
        data = b"\n".join(rows) + b"\n"
        name = f"{batch['id']}_{kind}.jsonl"
        keep = expiry(batch.get("output_expires_after"))
        made = self.files.create(
            data, filename=name, purpose="batch_output", owner=batch.get(OWNER), keep=keep
        )
        return str(made["id"])

    def _fail(self, batch_id: str, message: str) -> None:
        try:
            batch = self.batches.get(batch_id)
        except UnknownObjectError:
            return
        batch.update(status="failed", failed_at=int(time.time()))
        batch["errors"] = {
            "object": "list",
            "data": [{"code": "batch_failed", "message": message, "param": None, "line": None}],
        }
        self.batches.save(batch)


class _LineTransport(httpx2.AsyncBaseTransport):
    """The proxy's own transport, as a batch's lines go by it.

    Its timeout is the proxy's (`--upstream-timeout`), the fleet's bound on its
    nodes, not a caller's: a line that runs past it counts against its node
    (`OWN_TIMEOUT`), as a forwarded request's does. And it is shared: a batch's
    client, closed when the batch ends, must not close the proxy's upstream pool
    (which would stop keeping connections alive for every later request); the
    proxy closes it when it stops.
    """

    def __init__(self, shared: AsyncFleetTransport) -> None:
        self._shared = shared

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.extensions[OWN_TIMEOUT] = True
        return await self._shared.handle_async_request(request)

    async def aclose(self) -> None:
        """Nothing to close here: the transport is the proxy's."""


def _sender(
    client: openai.AsyncOpenAI, endpoint: str
) -> Callable[[Line], Awaitable[Answered[dict[str, Any]]]]:
    path = endpoint.removeprefix("/v1")

    async def send(line: Line) -> Answered[dict[str, Any]]:
        raw = await client.post(path, body=line.body, cast_to=httpx2.Response)
        body = raw.json()
        usage = body.get("usage") if isinstance(body, dict) else None
        tokens = int((usage or {}).get("completion_tokens") or 0)
        answer = {
            "status_code": raw.status_code,
            "request_id": raw.headers.get("x-lmfleet-request-id", ""),
            "body": body,
        }
        return Answered(answer, tokens, answer_versions(raw.headers, tokens))

    return send


def _error(code: str, message: str, response: dict[str, Any] | None = None) -> str:
    return json.dumps({"error": {"code": code, "message": message}, "response": response})


def _failure(outcome: ItemError) -> str:
    """A failed line as its error-file row needs it: a node's refusal keeps its status
    and body (`response`), as OpenAI reports one."""
    exc = outcome.error
    if isinstance(exc, openai.APIStatusError):
        try:
            body: Any = exc.response.json()
        except ValueError:
            body = exc.response.text
        response = {"status_code": exc.status_code, "request_id": "", "body": body}
        return _error(f"http_{exc.status_code}", str(exc.message), response)
    return _error(type(exc).__name__, str(exc))


# -- the routes ---------------------------------------------------------------------


def _jobs(rt: Any) -> BatchJobs:
    jobs: BatchJobs | None = rt.jobs
    if jobs is None:
        raise ConfigError("the Batch API is not running on this proxy")
    return jobs


def _tail(scope: Scope, prefix: str) -> list[str]:
    return [part for part in scope["path"][len(prefix) :].split("/") if part]


def _owner(scope: Scope, rt: Any) -> str | None:
    """Whom the request acts for (lmfleet/jobs/owners.py): its client key's owner."""
    return owner_of(header(scope, b"authorization"), bool(rt.options.api_keys))


async def files_root(scope: Scope, receive: Receive, send: Send, rt: Any) -> None:
    jobs, owner = _jobs(rt), _owner(scope, rt)
    if scope["method"] == "GET":
        found = jobs.files.list(_query(scope).get("purpose"), owner)
        await send_json(send, 200, _page(found, scope, limit=10_000, most=10_000, ordered=True))
        return
    data, filename, purpose, keep = _upload(scope, await read_body(scope, receive, MAX_FILE_BYTES))
    made = jobs.files.create(data, filename=filename, purpose=purpose, owner=owner, keep=keep)
    await send_json(send, 200, made)


async def one_file(scope: Scope, receive: Receive, send: Send, rt: Any) -> None:
    jobs, owner = _jobs(rt), _owner(scope, rt)
    parts = _tail(scope, "/v1/files/")
    file_id = parts[0]
    if len(parts) == 2 and parts[1] == "content" and scope["method"] == "GET":
        data = jobs.files.content(file_id, owner)
        await send_bytes(send, 200, data, [(b"content-type", b"application/octet-stream")])
    elif len(parts) == 1 and scope["method"] == "GET":
        await send_json(send, 200, jobs.files.get(file_id, owner))
    elif len(parts) == 1 and scope["method"] == "DELETE":
        await send_json(send, 200, jobs.files.delete(file_id, owner))
    else:
        raise UnknownObjectError(f"No route {scope['method']} {scope['path']}")


async def batches_root(scope: Scope, receive: Receive, send: Send, rt: Any) -> None:
    jobs, owner = _jobs(rt), _owner(scope, rt)
    if scope["method"] == "GET":
        mine = [shown(jobs.live(b)) for b in jobs.batches.list() if visible(b, owner)]
        await send_json(send, 200, _page(mine, scope))
        return
    body = await read_body(scope, receive, rt.options.max_body_bytes)
    try:
        asked = json.loads(body)
    except ValueError:
        raise ConfigError("the body is not JSON") from None
    await send_json(send, 200, shown(jobs.create(asked, owner)))


async def one_batch(scope: Scope, receive: Receive, send: Send, rt: Any) -> None:
    jobs, owner = _jobs(rt), _owner(scope, rt)
    parts = _tail(scope, "/v1/batches/")
    if len(parts) == 2 and parts[1] == "cancel" and scope["method"] == "POST":
        await send_json(send, 200, shown(jobs.cancel(parts[0], owner)))
    elif len(parts) == 1 and scope["method"] == "GET":
        await send_json(send, 200, shown(jobs.get(parts[0], owner)))
    else:
        raise UnknownObjectError(f"No route {scope['method']} {scope['path']}")


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode()))


def _page(
    items: list[dict[str, Any]],
    scope: Scope,
    *,
    limit: int = 20,
    most: int = 100,
    ordered: bool = False,
) -> dict[str, Any]:
    """OpenAI's cursor page of `items` (newest first): `after` an id, `limit` (1 to
    `most`); with `ordered`, `order=asc` for oldest first (the files list's)."""
    query = _query(scope)
    if ordered:
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ConfigError(f"order must be 'asc' or 'desc', got {order!r}")
        if order == "asc":
            items = items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = max(1, min(most, int(query.get("limit", str(limit)))))
    except ValueError:
        raise ConfigError("limit must be a number") from None
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _upload(scope: Scope, body: bytes) -> tuple[bytes, str, str, int]:
    """The file, purpose and seconds to keep of a `multipart/form-data` upload
    (`client.files.create`; `expires_after` comes as `expires_after[anchor]` and
    `expires_after[seconds]` fields)."""
    kind = header(scope, b"content-type") or b""
    if not kind.lower().startswith(b"multipart/form-data"):
        raise ConfigError("upload a file as multipart/form-data (file, purpose)")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + kind + b"\r\n\r\n" + body
    )
    data: bytes | None = None
    filename, purpose = "upload.jsonl", None
    expires: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if name == "file":
            data = payload if isinstance(payload, bytes) else b""
            filename = part.get_filename() or filename
        elif name == "purpose" and isinstance(payload, bytes):
            purpose = payload.decode().strip()
        elif isinstance(name, str) and name.startswith("expires_after["):
            field = name.removeprefix("expires_after[").removesuffix("]")
            expires[field] = payload.decode().strip() if isinstance(payload, bytes) else None
    if data is None:
        raise ConfigError("the upload has no 'file' part")
    if purpose is None:
        raise ConfigError("the upload has no 'purpose' part")
    return data, filename, purpose, expiry(expires or None)
