"""What a caller may give as weights, turned into each node's bucket bodies.

The bodies are in LMDeploy's shape; each engine's profile turns them into its own
calls (`EngineProfile.push`: SGLang's `/update_weights_from_tensor`, vLLM's
`update_info`, whose body a vLLM node's payload gives as a mapping of its own).

A body is LMDeploy's `UpdateParamsRequest` (`serialized_named_tensors`, a string,
or a list with one string per tensor-parallel rank, or a dict for the flattened
format; `load_format`; `finished`), or just the serialized string. A payload is one
body, a sequence of bodies (buckets, in order), a mapping from node URL to bodies,
or a function `node -> bodies` (a different payload per node and rank). The last
bucket each node gets is sent with `finished: true`, which makes LMDeploy finish
loading; the caller may set it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from lmfleet.errors import ConfigError, WeightUpdateError
from lmfleet.registry import normalize_url
from lmfleet.weights.session import UpdateTarget

Body = Mapping[str, Any] | str
Bodies = Body | Iterable[Body]
Payload = Bodies | Mapping[str, Bodies] | Callable[[UpdateTarget], Bodies]

FIELD = "serialized_named_tensors"


def as_body(item: object, engine: str | None = None) -> dict[str, Any]:
    """One bucket's body: LMDeploy's and SGLang's need the serialized tensors
    (`UpdateParamsRequest`, `UpdateWeightsFromTensorReqInput`), vLLM's is whatever its
    weight-transfer engine takes (`update_info`); `WeightUpdateError` for anything else."""
    if isinstance(item, str):
        return {FIELD: item}
    if isinstance(item, Mapping) and (FIELD in item or engine == "vllm"):
        return dict(item)
    raise WeightUpdateError(
        f"a weight-update body is a serialized string or a mapping with {FIELD!r} "
        f"(vLLM: its update_info mapping), got {type(item).__name__}"
    )


def _is_body(payload: object) -> bool:
    return isinstance(payload, str) or (isinstance(payload, Mapping) and FIELD in payload)


def _for_node(payload: Payload, target: UpdateTarget) -> Bodies:
    if callable(payload):
        return payload(target)
    if isinstance(payload, Mapping) and not _is_body(payload):
        for key, bodies in payload.items():
            if key == target.url or normalize_url(str(key)) == target.url:
                return bodies
        raise WeightUpdateError(f"the payload has no bodies for {target.url}")
    return payload


def node_bodies(payload: Payload, target: UpdateTarget) -> Iterator[dict[str, Any]]:
    """`target`'s bodies in order, the last one marked `finished`. Lazy: a payload
    function's generator makes each bucket only when the previous one is sent."""
    return _in_order(_for_node(payload, target), target)


def check_payload(payload: Payload, targets: Iterable[UpdateTarget]) -> None:
    """Refuse, before an update touches any node, a payload given as data that has
    no bodies for one of `targets` or a body that is none (`ConfigError`): its nodes
    would be put to sleep for nothing, then quarantined. A payload function, or a
    one-pass iterable, is made as it is sent and judged then, node by node."""
    if callable(payload):
        return
    for target in targets:
        try:
            bodies = _for_node(payload, target)
            if isinstance(bodies, (str, Mapping, list, tuple)):
                for _ in _in_order(bodies, target):
                    pass
        except WeightUpdateError as exc:
            raise ConfigError(f"{exc}; no node was touched") from None


def _in_order(bodies: Bodies, target: UpdateTarget) -> Iterator[dict[str, Any]]:
    one = _is_body(bodies) or (target.engine == "vllm" and isinstance(bodies, Mapping))
    items: Iterable[object] = [bodies] if one else bodies
    if not isinstance(items, Iterable):
        raise WeightUpdateError(f"bodies for {target.url} must be iterable, got {items!r}")
    iterator = iter(items)
    try:
        current = as_body(next(iterator), target.engine)
    except StopIteration:
        raise WeightUpdateError(f"the payload gave no bodies for {target.url}") from None
    for item in iterator:
        yield current
        current = as_body(item, target.engine)
    current["finished"] = True
    yield current
