"""LMDeploy 0.18.0's DistServe wire format, as plain dicts (no I/O).

Read from `lmdeploy/serve/proxy/proxy.py` (the DistServe branches of the chat
and completions handlers), `lmdeploy/pytorch/disagg/conn/proxy_conn.py`
(`PDConnectionPool.connect` / `drop`), `lmdeploy/pytorch/disagg/conn/protocol.py`
and `config.py` (the pydantic messages), and
`lmdeploy/serve/openai/endpoints/distserve.py` (the node's `/distserve/*` routes).

LMDeploy's enums are `enum.Enum` with `enum.auto()` values, and pydantic's
`model_dump(mode="json")` (and FastAPI) write them as those integers: the RDMA
protocol travels as `2`, a successful connection status as `1`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

MIGRATION_PROTOCOL = {"TCP": 1, "RDMA": 2, "NVLINK": 3}
"""`MigrationProtocol` values (LMDeploy's proxy offers RDMA and NVLINK)."""

RDMA_LINK_TYPE = {"IB": 1, "RoCE": 2}
"""`RDMALinkType` values."""

CONNECTION_SUCCESS = 1
"""`DistServeConnectionStatus.SUCCESS`."""

DISAGGREGATED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""The routes LMDeploy's proxy runs prefill -> decode; every other route is Hybrid."""

ENGINE_INFO = "/distserve/engine_info"
P2P_INITIALIZE = "/distserve/p2p_initialize"
P2P_CONNECT = "/distserve/p2p_connect"
P2P_DROP_CONNECT = "/distserve/p2p_drop_connect"
FREE_CACHE = "/distserve/free_cache"

N_REJECTED = "n > 1 is not supported with the DistServe serving strategy."
"""LMDeploy's proxy answers this with HTTP 400."""


@dataclass(frozen=True, slots=True)
class Prefilled:
    """What a prefill node's answer tells the decode node (`MigrationRequest` inputs)."""

    session_id: int
    block_ids: tuple[int, ...]
    token_id: int


def prefill_body(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The prefill copy of a request: one token, no stream, KV cache kept for migration.

    LMDeploy sets `max_completion_tokens=1` only on chat; a completions request
    that carries `max_completion_tokens` gets it set to 1 as well (LMDeploy would
    let such a prefill generate the whole answer). `stream_options` goes with
    `stream`, which the prefill turns off.
    """
    out = copy.deepcopy(body)
    out["max_tokens"] = 1
    if path == "/v1/chat/completions" or "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["with_cache"] = True
    out["preserve_cache"] = True
    return out


def parse_prefill(answer: Any) -> Prefilled:
    """Read `id`, `cache_block_ids` and `remote_token_ids` from a prefill answer.

    As LMDeploy's proxy: `remote_session_id = int(id)`, the block ids default to
    [], the token is the last of `remote_token_ids` (0 when absent). Raises
    ValueError for an answer that cannot be migrated (LMDeploy's own `int()`
    would raise there too, e.g. on a chat id like "chatcmpl-...").
    """
    if not isinstance(answer, dict):
        raise ValueError(f"prefill answer is not a JSON object: {answer!r:.200}")
    raw_id = answer.get("id")
    try:
        session_id = int(raw_id) if raw_id else 0
    except (TypeError, ValueError):
        raise ValueError(f"prefill answer id {raw_id!r} is not a session id") from None
    blocks = answer.get("cache_block_ids") or []
    tokens = answer.get("remote_token_ids") or []
    if not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks):
        raise ValueError(f"prefill answer cache_block_ids is not a list of ints: {blocks!r:.200}")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ValueError(f"prefill answer remote_token_ids is not a list of ints: {tokens!r:.200}")
    return Prefilled(session_id, tuple(blocks), tokens[-1] if tokens else 0)


DUMMY_ENGINE_ID = "dummy:dummy"
"""`remote_engine_id` of a dummy prefill (LMDeploy's proxy with `--dummy-prefill`)."""

DUMMY_PREFILLED = Prefilled(session_id=0, block_ids=(), token_id=0)
"""What LMDeploy's proxy reads from the empty prefill answer of a dummy prefill."""


def decode_body(
    body: dict[str, Any],
    protocol: int,
    prefill_url: str,
    prefilled: Prefilled,
    *,
    dummy: bool = False,
) -> dict[str, Any]:
    """The original request plus `migration_request` (LMDeploy's `MigrationRequest`).

    `dummy`: LMDeploy's `--dummy-prefill`, for profiling decode alone: no prefill
    ran, so the request names `DUMMY_ENGINE_ID` with `DUMMY_PREFILLED` and says
    `is_dummy_prefill`, and the decode engine skips the migration.
    """
    return {
        **body,
        "migration_request": {
            "protocol": protocol,
            "remote_engine_id": prefill_url,
            "remote_session_id": prefilled.session_id,
            "remote_block_ids": list(prefilled.block_ids),
            "remote_token_id": prefilled.token_id,
            "is_dummy_prefill": dummy,
        },
    }


def dummy_decode_body(body: dict[str, Any], protocol: int) -> dict[str, Any]:
    """The decode request of a dummy prefill (`decode_body` as LMDeploy's proxy builds it)."""
    return decode_body(body, protocol, DUMMY_ENGINE_ID, DUMMY_PREFILLED, dummy=True)


def engine_config(answer: Any) -> dict[str, Any]:
    """`DistServeEngineConfig` from `/distserve/engine_info`.

    The route returns `model_dump_json()` through FastAPI, so the body is a JSON
    *string* holding the JSON object; a plain object is accepted too.
    """
    if isinstance(answer, str):
        answer = json.loads(answer)
    if not isinstance(answer, dict) or "tp_size" not in answer:
        raise ValueError(f"engine_info is not a DistServeEngineConfig: {answer!r:.200}")
    return answer


def rdma_config(link_type: str, with_gdr: bool) -> dict[str, Any]:
    """`DistServeRDMAConfig`. LMDeploy's proxy sends it whatever the migration protocol
    (NVLINK included, with `nvlink_config: null`), and so does lmfleet."""
    return {"with_gdr": with_gdr, "link_type": RDMA_LINK_TYPE[link_type]}


def init_request(
    protocol: int,
    local: tuple[str, dict[str, Any]],
    remote: tuple[str, dict[str, Any]],
    rdma: dict[str, Any],
) -> dict[str, Any]:
    """`DistServeInitRequest` for the `local` (engine id, config) side of a pair."""
    return {
        "local_engine_id": local[0],
        "local_engine_config": local[1],
        "remote_engine_id": remote[0],
        "remote_engine_config": remote[1],
        "protocol": protocol,
        "rank": None,
        "tcp_config": None,
        "rdma_config": rdma,
        "nvlink_config": None,
    }


def check_status(answer: Any, what: str) -> dict[str, Any]:
    """An init/connect answer whose `status` is SUCCESS; ValueError otherwise."""
    if not isinstance(answer, dict):
        raise ValueError(f"{what} answer is not a JSON object: {answer!r:.200}")
    status = answer.get("status")
    if status not in (CONNECTION_SUCCESS, "SUCCESS"):
        raise ValueError(f"{what} answered status {status!r}: {answer!r:.200}")
    return answer


def connect_request(protocol: int, remote_url: str, remote_init: dict[str, Any]) -> dict[str, Any]:
    """`DistServeConnectionRequest` carrying the other side's `DistServeInitResponse`."""
    return {
        "protocol": protocol,
        "remote_engine_id": remote_url,
        "remote_engine_endpoint_info": remote_init.get("engine_endpoint_info"),
        "remote_kvtransfer_endpoint_info": remote_init.get("kvtransfer_endpoint_info"),
    }


def free_cache_request(prefill_url: str, session_id: int) -> dict[str, Any]:
    """`DistServeCacheFreeRequest` (sent to the prefill node itself)."""
    return {"remote_engine_id": prefill_url, "remote_session_id": session_id}


def drop_request(engine_id: str, remote_engine_id: str) -> dict[str, Any]:
    """`DistServeDropConnectionRequest`."""
    return {"engine_id": engine_id, "remote_engine_id": remote_engine_id}
