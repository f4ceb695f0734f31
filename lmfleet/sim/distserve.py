"""DistServe roles for the emulated node: LMDeploy's `/distserve/*` routes, prefill
caches, and an emulated KV migration that a router cannot fake.

LMDeploy moves the KV cache with one-sided RDMA reads: the decode engine reads
the prefill engine's blocks directly, using what it learnt at p2p_connect. The
simulator emulates that read with one HTTP call from the decode node to the
prefill node (`POST /sim/distserve/migrate`), so both sides check the hand-over
for real:

- the decode node refuses a `migration_request` from a prefill engine it has not
  been `p2p_connect`ed to;
- the prefill node refuses the read unless *it* is connected to that decode
  engine and holds exactly those block ids (and token) for that session, i.e.
  a cache it preserved and has not freed;
- a successful read frees the prefill's blocks (LMDeploy frees them once the
  decode side has them); `/distserve/free_cache` frees them otherwise;
- a `migration_request` with `is_dummy_prefill: true` (LMDeploy's proxy with
  `--dummy-prefill`) needs no connection and reads nothing: LMDeploy's engine
  skips the migration of such a request (`_migration_loop_migrate`) and decodes
  from its `remote_token_id`.

`GET /sim/stats` shows what the router sent, so tests can check the wire values:
each `p2p_initialize`'s `protocol` and `rdma_config` / `nvlink_config` per remote
engine (`initialized`), each `p2p_connect`'s protocol (`connect_protocols`), and
the last `migration_request` (`last_migration`).

Roles: a prefill (or hybrid) node honours `with_cache` / `preserve_cache` and
answers with `id` (the session id, as LMDeploy's completions do),
`cache_block_ids` and `remote_token_ids`; a decode node accepts
`migration_request`. Either still serves a plain request (LMDeploy's engines are
all hybrid underneath), counted as `local`.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections import Counter
from typing import Any

import httpx2

from lmfleet.sim import asgi
from lmfleet.sim.engine import count_tokens
from lmfleet.sim.options import SimOptions
from lmfleet.sim.protocol import GenRequest, RequestError, dumps

BLOCK_TOKENS = 64
NUM_GPU_BLOCKS = 4096
MIGRATE_PATH = "/sim/distserve/migrate"
RDMA = 2  # MigrationProtocol.RDMA
MIGRATION_PROTOCOLS = (1, 2, 3)  # MigrationProtocol: TCP, RDMA, NVLINK
SUCCESS = 1  # DistServeConnectionStatus.SUCCESS
INIT_FIELDS = ("local_engine_id", "local_engine_config", "remote_engine_id", "protocol")
MIGRATION_FIELDS = ("remote_engine_id", "remote_session_id", "remote_block_ids", "remote_token_id")


def _require(body: dict[str, Any], fields: tuple[str, ...]) -> None:
    for name in fields:
        if name not in body:
            raise ValueError(f"{name}: Field required")


class SimDistServe:
    """One node's DistServe state: connections, preserved caches, counters."""

    def __init__(self, options: SimOptions) -> None:
        self.role = options.role
        self.port = options.port
        self.counters: Counter[str] = Counter()
        self.local_engine_id: str | None = None
        self.initialized: dict[str, dict[str, Any]] = {}
        self.connected: dict[str, dict[str, Any]] = {}
        self.preserved: dict[int, tuple[list[int], int]] = {}
        self.last_migration: dict[str, Any] | None = None
        self._sessions = itertools.count(1)
        self._blocks = itertools.count(0)
        self._http: httpx2.AsyncClient | None = None

    def routes(self) -> dict[str, dict[str, Any]]:
        return {
            "/distserve/engine_info": {"GET": self.engine_info},
            "/distserve/p2p_initialize": {"POST": self.p2p_initialize},
            "/distserve/p2p_connect": {"POST": self.p2p_connect},
            "/distserve/p2p_drop_connect": {"POST": self.p2p_drop_connect},
            "/distserve/free_cache": {"POST": self.free_cache},
            MIGRATE_PATH: {"POST": self.migrate},
        }

    def stats(self) -> dict[str, Any]:
        return {
            "role": self.role,
            **{
                k: self.counters[k]
                for k in (
                    "prefills",
                    "decodes",
                    "dummy_decodes",
                    "local",
                    "refused",
                    "migrations_served",
                    "p2p_initialize",
                    "p2p_connect",
                    "p2p_drop_connect",
                    "free_cache",
                    "freed",
                )
            },
            "preserved": len(self.preserved),
            "connected": sorted(self.connected),
            "initialized": {
                remote: {k: body.get(k) for k in ("protocol", "rdma_config", "nvlink_config")}
                for remote, body in self.initialized.items()
            },
            "connect_protocols": {
                remote: body.get("protocol") for remote, body in self.connected.items()
            },
            "last_migration": self.last_migration,
        }

    def reset(self) -> None:
        self.counters.clear()

    # -- the inference hook ---------------------------------------------------------

    async def admit(self, body: dict[str, Any], request: GenRequest) -> dict[str, Any] | None:
        """Run the role's side of a request before it is served; fields to add to
        a non-streamed answer, or None. Raises RequestError to refuse it."""
        migration = body.get("migration_request")
        if migration is not None:
            await self._migrate_in(migration)
            self.counters["decodes"] += 1
            if migration.get("is_dummy_prefill"):
                self.counters["dummy_decodes"] += 1
            return None
        if body.get("with_cache") and not request.stream:
            if self.role == "decode":
                self.counters["refused"] += 1
                raise RequestError(400, "with_cache is for prefill engines; this one decodes.")
            self.counters["prefills"] += 1
            return self._prefilled(request, keep=bool(body.get("preserve_cache")))
        self.counters["local"] += 1
        return None

    def _prefilled(self, request: GenRequest, *, keep: bool) -> dict[str, Any]:
        prompt = "".join(request.prompts)
        blocks = max(1, -(-count_tokens(prompt) // BLOCK_TOKENS))
        block_ids = [next(self._blocks) % NUM_GPU_BLOCKS for _ in range(blocks)]
        token = zlib.crc32(prompt.encode()) % 32000 + 3
        session = next(self._sessions)
        if keep:
            self.preserved[session] = (block_ids, token)
        return {"id": str(session), "cache_block_ids": block_ids, "remote_token_ids": [token]}

    async def _migrate_in(self, migration: Any) -> None:
        """The decode side: connected to that prefill engine? Then read its blocks."""
        if self.role != "decode":
            self.counters["refused"] += 1
            raise RequestError(400, f"migration_request sent to a {self.role} engine.")
        if not isinstance(migration, dict):
            raise RequestError(400, "migration_request: Input should be a valid dictionary")
        try:
            _require(migration, ("protocol", *MIGRATION_FIELDS))
        except ValueError as exc:
            raise RequestError(400, f"migration_request.{exc}") from None
        if migration["protocol"] not in MIGRATION_PROTOCOLS:
            raise RequestError(
                400, "migration_request.protocol: Input should be 1, 2 or 3 (MigrationProtocol)"
            )
        self.last_migration = migration
        if migration.get("is_dummy_prefill") is True:
            return  # LMDeploy's engine skips the migration of a dummy prefill
        remote = migration["remote_engine_id"]
        if remote not in self.connected:
            self.counters["refused"] += 1
            raise RequestError(
                400, f"Not connected to prefill engine {remote!r}: p2p_connect first."
            )
        read = {
            "remote_engine_id": self.local_engine_id,
            "session_id": migration["remote_session_id"],
            "block_ids": migration["remote_block_ids"],
            "token_id": migration["remote_token_id"],
        }
        if self._http is None:
            self._http = httpx2.AsyncClient(timeout=5.0)
        try:
            answer = await self._http.post(str(remote) + MIGRATE_PATH, json=read)
        except httpx2.HTTPError as exc:
            self.counters["refused"] += 1
            raise RequestError(500, f"KV migration from {remote} failed: {exc!r}") from None
        if answer.status_code != 200:
            self.counters["refused"] += 1
            raise RequestError(400, f"KV migration from {remote} refused: {answer.text[:200]}")

    # -- /distserve/* ------------------------------------------------------------------

    async def engine_info(self, rt: Any, scope: Any, receive: Any, send: Any) -> None:
        config = {
            "tp_size": 1,
            "ep_size": 1,
            "dp_size": 1,
            "pp_size": None,
            "dp_rank": 0,
            "block_size": BLOCK_TOKENS,
            "num_cpu_blocks": 0,
            "num_gpu_blocks": NUM_GPU_BLOCKS,
        }
        # LMDeploy returns model_dump_json() from a FastAPI route: a JSON string.
        await asgi.send_json(send, 200, json.dumps(config, separators=(",", ":")))

    async def p2p_initialize(self, rt: Any, scope: Any, receive: Any, send: Any) -> None:
        body = await _body(scope, receive)
        _require(body, INIT_FIELDS)
        if body["protocol"] not in MIGRATION_PROTOCOLS:
            raise ValueError("protocol: Input should be 1, 2 or 3 (MigrationProtocol)")
        self.counters["p2p_initialize"] += 1
        self.local_engine_id = body["local_engine_id"]
        self.initialized[body["remote_engine_id"]] = body
        endpoint = {"engine": self.local_engine_id, "port": self.port}
        await asgi.send_json(
            send,
            200,
            {
                "status": SUCCESS,
                "engine_endpoint_info": {"zmq_address": f"tcp://127.0.0.1:{self.port}"},
                "kvtransfer_endpoint_info": [
                    {
                        "protocol": body["protocol"],
                        "endpoint_info": json.dumps(endpoint),
                        "cache_pools": None,
                    }
                ],
            },
        )

    async def p2p_connect(self, rt: Any, scope: Any, receive: Any, send: Any) -> None:
        body = await _body(scope, receive)
        _require(body, ("protocol", "remote_engine_id", "remote_engine_endpoint_info"))
        remote = body["remote_engine_id"]
        if remote not in self.initialized:
            raise ValueError(f"p2p_initialize with {remote!r} first")
        self.counters["p2p_connect"] += 1
        self.connected[remote] = body
        await asgi.send_json(send, 200, {"status": SUCCESS})

    async def p2p_drop_connect(self, rt: Any, scope: Any, receive: Any, send: Any) -> None:
        body = await _body(scope, receive)
        _require(body, ("engine_id", "remote_engine_id"))
        self.counters["p2p_drop_connect"] += 1
        self.connected.pop(body["remote_engine_id"], None)
        self.initialized.pop(body["remote_engine_id"], None)
        await asgi.send_json(send, 200, {"success": True})

    async def free_cache(self, rt: Any, scope: Any, receive: Any, send: Any) -> None:
        body = await _body(scope, receive)
        _require(body, ("remote_engine_id", "remote_session_id"))
        self.counters["free_cache"] += 1
        if self.preserved.pop(int(body["remote_session_id"]), None) is not None:
            self.counters["freed"] += 1
        await asgi.send_json(send, 200, {"status": "SUCCESS"})

    async def migrate(self, rt: Any, scope: Any, receive: Any, send: Any) -> None:
        """The emulated RDMA read of a preserved cache by a connected decode engine."""
        body = await _body(scope, receive)
        decode = body.get("remote_engine_id")
        if decode not in self.connected:
            await asgi.send_error(send, 400, f"Decode engine {decode!r} is not connected.")
            return
        held = self.preserved.get(body.get("session_id", -1))
        if held is None or held != (body.get("block_ids"), body.get("token_id")):
            await asgi.send_error(send, 400, "Unknown cache blocks for that session.")
            return
        del self.preserved[body["session_id"]]
        self.counters["migrations_served"] += 1
        await asgi.send_bytes(send, 200, dumps({"status": "SUCCESS"}))


async def _body(scope: Any, receive: Any) -> dict[str, Any]:
    raw = await asgi.read_body(receive)
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("Input should be a valid dictionary or object to extract fields from")
    return body
