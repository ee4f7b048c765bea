"""The OpenAI completions API as the server speaks it: requests checked, answers and errors shaped.

``POST /v1/completions`` takes ``model`` (a user id, or the base model's name), ``prompt``
(one string, the input as ``cbpo-orch generate`` takes it), ``max_tokens``,
``temperature`` (0, the default, is greedy), ``top_p`` and ``stream``. What the server
cannot honour (``n`` > 1, ``best_of`` > 1, ``echo``, ``logprobs``, ``stop``, ``suffix``) is
refused with 400 rather than ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from cbpo_orch.serving.catalog import UserAdapterEntry
from cbpo_orch.serving.generator import Chunk
from cbpo_orch.training.generation import Completion


class ApiError(Exception):
    """A request answered with an HTTP error: ``status``, a message and OpenAI's error type."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool


_UNSUPPORTED = {"suffix": None, "echo": False, "logprobs": None, "stop": None}


def parse_completion_request(raw: bytes, max_tokens_limit: int) -> CompletionRequest:
    """The request in ``raw`` (a JSON body), checked; ApiError(400) says what is wrong.
    ``max_tokens`` defaults to, and may not exceed, ``max_tokens_limit`` (the job's budget)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required: a user id, or the base model's name (see GET /v1/models)", "model")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "`prompt` must be one non-empty string", "prompt")
    max_tokens = body.get("max_tokens", max_tokens_limit)
    if type(max_tokens) is not int or not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"`max_tokens` must be an integer from 1 to {max_tokens_limit} (the job's completion budget), not {max_tokens!r}", "max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0, "from 0 (greedy) to 2")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, "in (0, 1]")
    if top_p == 0:
        raise ApiError(400, "`top_p` must be in (0, 1]", "top_p")
    for name in ("n", "best_of"):
        if body.get(name, 1) not in (1, None):
            raise ApiError(400, f"`{name}` must be 1: one completion per request", name)
    for name, default in _UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise ApiError(400, f"`{name}` is not supported by this server", name)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", "stream")
    return CompletionRequest(model, prompt, max_tokens, temperature, top_p, stream)


def _number(body: dict, name: str, default: float, low: float, high: float, what: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"`{name}` must be a number {what}, not {value!r}", name)
    return float(value)


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(completion_id: str, model: str, completion: Completion) -> dict:
    """The OpenAI ``text_completion`` object of a finished completion."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }


def sse_event(completion_id: str, model: str, chunk: Chunk) -> str:
    """One server-sent event of a streamed completion (OpenAI's chunk format); the last
    chunk carries ``finish_reason``."""
    done = chunk.completion
    body = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": chunk.text, "finish_reason": done.finish_reason if done else None, "logprobs": None}],
    }
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_body(base: str, users: list[UserAdapterEntry], owner: str) -> dict:
    """``GET /v1/models``: the base model, then the users with the number of their current
    version (``version``, as ``results --versions`` shows it), in OpenAI's list format."""
    listed = [{"id": base, "object": "model", "created": 0, "owned_by": owner}]
    listed += [{"id": user.user_id, "object": "model", "created": 0, "owned_by": owner, "version": user.version} for user in users]
    return {"object": "list", "data": listed}
