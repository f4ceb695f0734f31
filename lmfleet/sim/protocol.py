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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lmfleet.sim.logprobs import FIRST_WORD_ID, text_ids
from lmfleet.sim.textgen import WORDS

if TYPE_CHECKING:
    from lmfleet.sim.options import SimOptions

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
    # Logprobs (lmfleet/sim/logprobs.py). `logprobs`: the top-n the engine is asked
    # for per position (LMDeploy's GenerationConfig.logprobs; 0 = none).
    logprobs: int = 0
    chat_logprobs: bool = False  # chat `logprobs: true`: choices[].logprobs.content
    return_logprob: bool = False  # chat `output_token_logprobs`; /generate's logprob lists
    top_logprobs_num: int = 0  # /generate's output/input top lists
    logprob_start_len: int = -1  # /generate: score the prompt from here (max_tokens 0)
    input_ids: list[int] | None = field(default=None, repr=False)  # /generate's ids
    resumed: int = 0  # /generate: the sim's own output ids that end `input_ids` (textgen)


# LMDeploy renders FastAPI's RequestValidationError as "<loc>: <msg>" of the first
# pydantic error (loc without "body"; union members add ".str"), param null.
NOT_A_DICT = "Input should be a valid dictionary or object to extract fields from"
PREPROCESS_FAILED = "Request preprocessing failed."  # ErrorCode.PREPROCESS_FAILED (400)


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


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _opt_bool(body: dict[str, Any], key: str) -> bool | None:
    """Pydantic's lax bool: bools, 0/1 and the usual strings ("yes", "off", ...)."""
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, (int, str)):
        raise _invalid(key, "a valid boolean, unable to interpret input")
    raise _invalid(key, "a valid boolean")


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


def parse_generation(
    kind: Kind, body: Any, model_name: str, options: SimOptions | None = None
) -> GenRequest:
    """Validate a JSON body the way LMDeploy does: types (400), model (404), values (400).

    `options`: the node's engine (`--backend`, `--logprobs-mode`, `--role`), which
    decides whether logprobs may be asked for; None is LMDeploy's default engine.
    """
    if not isinstance(body, dict):
        raise validation_error("", NOT_A_DICT)
    engine = _Engine.of(options)
    if kind == "generate":
        return _parse_generate(body, model_name, engine)
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _invalid("model", "a valid string")
    raw_prompts: list[Any] = []
    if kind == "chat":
        if "messages" not in body:
            raise _missing("messages")
        prompts = [chat_prompt(body["messages"])]
        # ChatCompletionRequest defaults both to False (an explicit null stays None).
        logprobs_flag = _opt_bool(body, "logprobs") if "logprobs" in body else False
        top_logprobs = _opt_int(body, "top_logprobs")
        return_logprob = _opt_bool(body, "return_logprob") if "return_logprob" in body else False
        max_tokens = _opt_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise _missing("prompt")
        # CompletionRequest.prompt is `str | list[Any]`: a list of anything passes
        # validation; AsyncEngine.preprocess then fails on what is not a string
        # (token ids, as lm-eval sends by default), and `[]` makes no choice at all.
        if isinstance(prompt, str):
            raw_prompts = [prompt]
        elif isinstance(prompt, list):
            raw_prompts = prompt
        else:
            raise _invalid("prompt.str", "a valid string")
        prompts = [p for p in raw_prompts if isinstance(p, str)]
        completion_logprobs = _opt_int(body, "logprobs")
        _opt_bool(body, "echo")  # parsed (a type error is a 400), never read by LMDeploy
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
    if kind == "chat":
        _check_chat_logprobs(engine, request, logprobs_flag, top_logprobs, return_logprob)
    else:
        _check_completion_logprobs(engine, request, completion_logprobs)
    _check_sampling(body, request)
    if kind == "chat":
        _check_chat_lengths(body, top_logprobs)
    else:  # AsyncEngine.preprocess, per prompt: the first prompt's failure answers
        preprocess_failed = RequestError(400, PREPROCESS_FAILED)
        if raw_prompts and not isinstance(raw_prompts[0], str):
            raise preprocess_failed
        if raw_prompts and request.max_tokens is not None and request.max_tokens < 1:
            # /v1/completions has no check of its own on max_tokens.
            raise RequestError(400, f"max_new_tokens must be at least 1, got {request.max_tokens}.")
        if len(prompts) < len(raw_prompts):
            raise preprocess_failed
    return request


@dataclass(frozen=True, slots=True)
class _Engine:
    """What of the engine configuration LMDeploy's logprobs checks read."""

    pytorch: bool = False  # TurbomindEngineConfig has no logprobs_mode: checks skipped
    logprobs_mode: str | None = None
    hybrid: bool = True

    @staticmethod
    def of(options: SimOptions | None) -> _Engine:
        if options is None:
            return _Engine()
        pytorch = options.backend == "pytorch"
        return _Engine(pytorch, options.logprobs_mode, options.role == "hybrid")


def _check_chat_logprobs(
    engine: _Engine,
    request: GenRequest,
    logprobs: bool | None,
    top_logprobs: int | None,
    return_logprob: bool | None,
) -> None:
    """chat_completions/validation.py `check_request`'s logprobs part, and the
    engine's top-n (`_normalize_runner_gen_config_kwargs`: top_logprobs or 1)."""
    top = top_logprobs or 0
    if engine.pytorch and engine.logprobs_mode is None:
        if logprobs or top > 0:
            raise RequestError(
                400,
                f"Logprobs({logprobs})/top_logprobs({top}) requested "
                "but not enabled logprobs_mode in engine configuration",
            )
        if return_logprob:
            raise RequestError(
                400,
                f"return_logprob({return_logprob}) requested "
                "but not enabled logprobs_mode in engine configuration.",
            )
    enabled = engine.pytorch and engine.logprobs_mode is not None
    if enabled and (top < 0 or (not logprobs and top > 0)):
        raise RequestError(
            400,
            f"Invalid logprobs({logprobs})/top_logprobs({top}) requested "
            "when logprobs_mode is enabled in engine configuration.",
        )
    request.chat_logprobs = bool(logprobs)
    request.return_logprob = bool(return_logprob)
    if logprobs:
        request.logprobs = max(top_logprobs or 1, 1)
    elif return_logprob:
        request.logprobs = 1


def _check_completion_logprobs(engine: _Engine, request: GenRequest, logprobs: int | None) -> None:
    """endpoints/completions.py `check_request`'s logprobs part. The engine is asked
    for `logprobs` per position, but 0.18 never returns them on /v1/completions."""
    value = logprobs or 0
    if engine.pytorch and value > 0 and engine.logprobs_mode is None:
        raise RequestError(
            400,
            f"logprobs({value}) requested but not enabled logprobs_mode in engine configuration.",
        )
    if engine.pytorch and engine.logprobs_mode is not None and value < 0:
        raise RequestError(
            400,
            "logprobs must be non-negative when logprobs_mode is enabled in engine configuration.",
        )
    request.logprobs = max(value, 0)


def _check_chat_lengths(body: dict[str, Any], top_logprobs: int | None) -> None:
    """The rest of chat's check_request, in its order (after the sampling checks)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = _opt_int(body, key)
        if value is not None and value <= 0:
            raise RequestError(400, f"The {key} {value!r} must be a positive integer.")
    if top_logprobs is not None and top_logprobs > 20:
        raise RequestError(400, f"The top_logprobs {top_logprobs!r} must be in [0, 20].")


def _parse_generate(body: dict[str, Any], model_name: str, engine: _Engine) -> GenRequest:
    """LMDeploy's own `/generate` (GenerateReqInput): prompt xor input_ids, no model."""
    prompt = body.get("prompt")
    input_ids = body.get("input_ids")
    if prompt is not None and not isinstance(prompt, str):
        raise _invalid("prompt", "a valid string")
    if input_ids is not None and not (
        isinstance(input_ids, list) and all(isinstance(i, int) for i in input_ids)
    ):
        raise _invalid("input_ids", "a valid list of integers")
    return_logprob = _opt_bool(body, "return_logprob")
    top_logprobs_num = _opt_int(body, "top_logprobs_num")
    start = _opt_int(body, "logprob_start_len", -1)
    start = -1 if start is None else start
    if start < -1:
        raise validation_error("logprob_start_len", "Input should be greater than or equal to -1")
    max_tokens = _opt_int(body, "max_tokens", 128)
    # endpoints/generate.py check_request, in its order
    top = top_logprobs_num or 0
    if top < 0:
        raise RequestError(
            400, f"The top_logprobs_num {top_logprobs_num!r} cannot be a negative integer."
        )
    if top > 0 and return_logprob is not True:
        raise RequestError(400, "top_logprobs_num requires return_logprob=True.")
    if engine.pytorch and engine.logprobs_mode is None and return_logprob:
        raise RequestError(
            400,
            f"return_logprob({return_logprob}) requested "
            "but not enabled logprobs_mode in engine configuration.",
        )
    if (prompt is not None) ^ (input_ids is None):
        raise RequestError(400, "You must specify exactly one of prompt or input_ids")
    if prompt == "":
        raise RequestError(400, "The prompt must not be an empty string")
    if input_ids is not None and not input_ids:
        raise RequestError(400, "The input_ids must not be an empty list")
    if max_tokens is not None and max_tokens < 0:
        raise RequestError(400, f"The max_tokens {max_tokens!r} must be non-negative.")
    if start >= 0:
        if not (engine.pytorch and engine.hybrid):
            raise RequestError(
                400, "input logprobs are supported only by the PyTorch hybrid engine."
            )
        if return_logprob is not True:
            raise RequestError(400, "logprob_start_len requires return_logprob=True.")
        if engine.logprobs_mode not in ("raw_logits", "raw_logprobs"):
            raise RequestError(400, "logprob_start_len requires raw_logits or raw_logprobs mode.")
        if max_tokens != 0:
            raise RequestError(400, "logprob_start_len requires max_tokens=0.")
    elif max_tokens == 0:
        raise RequestError(400, f"The max_tokens {max_tokens!r} must be a positive integer.")
    resumed = own_output_suffix(input_ids) if input_ids is not None else 0
    if input_ids is None:  # AsyncEngine.preprocess: the text's ids, as /v1/encode gives them
        input_ids = text_ids(str(prompt), add_bos=True)
    prompt_ids = input_ids[: len(input_ids) - resumed]
    text = " ".join(f"t{i:03d}" for i in prompt_ids)
    request = GenRequest(
        kind="generate",
        model=model_name,
        prompts=[text],
        max_tokens=max_tokens,
        stop=_stop(body),
        stream=bool(body.get("stream")),
        ignore_eos=bool(body.get("ignore_eos")),
        session_id=_opt_int(body, "session_id", -1) or -1,
        logprobs=(top or 1) if return_logprob else 0,
        return_logprob=bool(return_logprob),
        top_logprobs_num=top,
        logprob_start_len=start,
        input_ids=list(input_ids),
        resumed=resumed,
    )
    _check_sampling(body, request)
    if start >= 0:  # AsyncEngine.preprocess, once the prompt is tokenized
        length = len(input_ids)
        if start >= length:
            raise RequestError(
                400,
                f"logprob_start_len({start}) exceeds the last source position for "
                f"processed input_ids length({length}).",
            )
    return request


def own_output_suffix(input_ids: list[int]) -> int:
    """How many ids at the end of `input_ids` are the sim's own output words (ids
    `FIRST_WORD_ID`...), at least one prompt id kept: a continuation of a cut
    generation (the prompt's ids plus the output so far) then continues the same
    output, as a real model continues its own greedy text. Prompt ids the caller
    makes up in that range count as output too (a convention of the simulator)."""
    words = range(FIRST_WORD_ID, FIRST_WORD_ID + len(WORDS))
    count = 0
    for token in reversed(input_ids[1:]):
        if token not in words:
            break
        count += 1
    return count


def _check_sampling(body: dict[str, Any], request: GenRequest) -> None:
    if request.n <= 0:
        raise RequestError(400, f"The n {request.n!r} must be a positive int.")
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


def model_list(model_name: str, created: int, engine: str = "lmdeploy") -> dict[str, Any]:
    """GET /v1/models: ModelList of one ModelCard with one ModelPermission, owned by
    the engine (`owned_by`: "lmdeploy", "vllm", "sglang", as each one's card says)."""
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
        "owned_by": engine,
        "root": model_name,
        "parent": None,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}
