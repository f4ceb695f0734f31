"""Request parsing and response shapes of LMDeploy's api_server, as plain dicts.

Hand-written instead of pydantic models because this is the hot path of a
benchmark backend: one `json.loads`, a few isinstance checks, one `json.dumps`.
Shapes follow lmdeploy/serve/openai/protocol.py; messages follow its endpoint
checks (`check_request` and friends). Where LMDeploy's behaviour had to be
guessed it says so in README.md of this package (the table "Guesses").
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["chat", "completion", "generate"]

_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)

# LMDeploy's create_error_response derives `type` from the status code.
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error"}


def dumps(obj: Any) -> bytes:
    """Compact JSON, the way Starlette's JSONResponse renders it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def new_id(prefix: str) -> str:
    """A unique, cheap id (LMDeploy uses shortuuid; the format is not a contract)."""
    return f"{prefix}-{_ID_PREFIX}{next(_ids):08x}"


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """LMDeploy's ErrorResponse: {"message","type","code","param","object":"error"}."""
    err_type = _ERROR_TYPES.get(status) or ("server_error" if status >= 500 else None)
    return {
        "message": message,
        "type": err_type or "invalid_request_error",
        "code": status,
        "param": param,
        "object": "error",
    }


class RequestError(Exception):
    """A request LMDeploy would refuse; rendered with `error_body`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(slots=True)
class GenRequest:
    """What the generation path needs from any of the three inference routes."""

    kind: Kind
    model: str
    prompts: list[str]
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    session_id: int = -1


# LMDeploy renders FastAPI's RequestValidationError as "<loc>: <msg>" of the first
# pydantic error (loc without "body"; union members add ".str"), param null.
NOT_A_DICT = "Input should be a valid dictionary or object to extract fields from"


def validation_error(field: str, message: str) -> RequestError:
    return RequestError(400, f"{field}: {message}" if field else message)


def _invalid(field: str, expected: str) -> RequestError:
    return validation_error(field, f"Input should be {expected}")


def _missing(field: str) -> RequestError:
    return validation_error(field, "Field required")


def decode_json(raw: bytes) -> Any:
    """A request body as FastAPI reads it: empty is a missing body, bad JSON a 400."""
    if not raw:
        raise _missing("")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise validation_error(str(exc.pos), "JSON decode error") from exc


def _opt_int(body: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """Pydantic's lax int: ints, integral floats and numeric strings pass."""
    value = body.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _invalid(key, "a valid integer, got a number with a fractional part")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _invalid(key, "a valid integer, unable to parse string as an integer") from None
    raise _invalid(key, "a valid integer")


def _opt_number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _invalid(key, "a valid number, unable to parse string as a number") from None
    raise _invalid(key, "a valid number")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise _invalid("stop.str", "a valid string")


def chat_prompt(messages: Any) -> str:
    """The text a chat template would produce; counted for usage and prefix caching."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _invalid("messages", "a valid string or list of message objects")
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role', 'user')}|>{content or ''}\n")
    return "".join(parts)


def parse_generation(kind: Kind, body: Any, model_name: str) -> GenRequest:
    """Validate a JSON body the way LMDeploy does: types (400), model (404), values (400)."""
    if not isinstance(body, dict):
        raise validation_error("", NOT_A_DICT)
    if kind == "generate":
        return _parse_generate(body, model_name)
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _invalid("model", "a valid string")
    if kind == "chat":
        if "messages" not in body:
            raise _missing("messages")
        prompts = [chat_prompt(body["messages"])]
        max_tokens = _opt_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise _missing("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise _invalid("prompt.str", "a valid string")
        max_tokens = _opt_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens", 16)  # CompletionRequest's default
    n = _opt_int(body, "n", 1)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _invalid("stream_options", "a valid dictionary")
    request = GenRequest(
        kind=kind,
        model=model,
        prompts=prompts,
        n=1 if n is None else n,
        max_tokens=max_tokens,
        stop=_stop(body),
        stream=bool(body.get("stream")),
        include_usage=bool(stream_options and stream_options.get("include_usage")),
        ignore_eos=bool(body.get("ignore_eos")),
        seed=_opt_int(body, "seed"),
        session_id=_opt_int(body, "session_id", -1) or -1,
    )
    if model != model_name:
        raise RequestError(404, f"The model {model!r} does not exist.")
    _check_sampling(body, request)
    return request


def _parse_generate(body: dict[str, Any], model_name: str) -> GenRequest:
    """LMDeploy's own `/generate` (GenerateReqInput): prompt xor input_ids, no model."""
    prompt = body.get("prompt")
    input_ids = body.get("input_ids")
    if (prompt is not None) ^ (input_ids is None):
        raise RequestError(400, "You must specify exactly one of prompt or input_ids")
    if prompt is not None and not isinstance(prompt, str):
        raise _invalid("prompt", "a valid string")
    if input_ids is not None and not (
        isinstance(input_ids, list) and all(isinstance(i, int) for i in input_ids)
    ):
        raise _invalid("input_ids", "a valid list of integers")
    if prompt == "":
        raise RequestError(400, "The prompt must not be an empty string")
    if input_ids is not None and not input_ids:
        raise RequestError(400, "The input_ids must not be an empty list")
    text = prompt if prompt is not None else " ".join(f"t{i:03d}" for i in input_ids or [])
    request = GenRequest(
        kind="generate",
        model=model_name,
        prompts=[text],
        max_tokens=_opt_int(body, "max_tokens", 128),
        stop=_stop(body),
        stream=bool(body.get("stream")),
        ignore_eos=bool(body.get("ignore_eos")),
        session_id=_opt_int(body, "session_id", -1) or -1,
    )
    _check_sampling(body, request)
    return request


def _check_sampling(body: dict[str, Any], request: GenRequest) -> None:
    if request.n <= 0:
        raise RequestError(400, f"The n {request.n!r} must be a positive int.")
    if request.max_tokens is not None and request.max_tokens <= 0:
        raise RequestError(
            400, f"The max_tokens {request.max_tokens!r} must be a positive integer."
        )
    top_p = _opt_number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:  # pydantic made it a float: "2.0"
        raise RequestError(400, f"The top_p {top_p!r} must be in (0, 1].")
    top_k = _opt_int(body, "top_k")
    if top_k is not None and top_k < 0:
        raise RequestError(400, f"The top_k {top_k!r} cannot be a negative integer.")
    temperature = _opt_number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise RequestError(400, f"The temperature {temperature!r} must be in [0, 2]")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """LMDeploy's UsageInfo field order (details added by the caller where LMDeploy has them)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def chat_usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    """Chat's UsageInfo.build(): prompt_tokens_details carries the cached tokens."""
    return {
        **usage(prompt_tokens, completion_tokens),
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": None,
    }


def model_list(model_name: str, created: int) -> dict[str, Any]:
    """GET /v1/models: ModelList of one ModelCard with one ModelPermission."""
    permission = {
        "id": f"modelperm-{_ID_PREFIX}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": True,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "lmdeploy",
        "root": model_name,
        "parent": None,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}
