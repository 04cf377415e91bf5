"""OpenAI-style error bodies, and the one exception type every handler raises for a request it will not serve.

Body shape: ``{"error": {"message", "type", "param", "code"}}``. ``code`` doubles as the ``reason`` label of the
gateway's rejected-requests metric, so keep codes few, stable and snake_case.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"
SERVER_ERROR = "server_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
RATE_LIMIT = "rate_limit_error"

_TYPE_BY_STATUS = {
    401: AUTHENTICATION,
    403: PERMISSION,
    404: NOT_FOUND,
    429: RATE_LIMIT,
    503: SERVICE_UNAVAILABLE,
    500: SERVER_ERROR,
}

# A worker's "error" event names a code; this is the HTTP status a non-streaming client sees for it.
# Unknown codes are the server's fault (500), never the client's.
_STATUS_BY_WORKER_CODE = {
    "invalid_request": 400,
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "bad_prompt": 400,
    "overloaded": 503,
    "worker_lost": 503,
    "no_worker": 503,
    "shutting_down": 503,
    "queue_timeout": 503,
    "redis_unavailable": 503,
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """A request the gateway refuses or could not complete; becomes an OpenAI error body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or ("invalid_request" if status < 500 else "server_error")
        self.type = type_ or _TYPE_BY_STATUS.get(status, INVALID_REQUEST if status < 500 else SERVER_ERROR)
        self.headers = dict(headers or {})
        if retry_after is not None:  # whole seconds, at least 1: "retry now" would only make things worse
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    """400: the client's request breaks a rule; ``param`` names the offending field."""
    return ApiError(400, message, param=param, code=code)


def unknown_model(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist on this server.", param="model", code="model_not_found")


def no_worker(model: str) -> ApiError:
    return ApiError(
        503,
        f"No live worker is serving model '{model}'; try again once one is running.",
        param="model",
        code="no_worker",
    )


def redis_unavailable(detail: str, retry_after: float = 2) -> ApiError:
    return ApiError(
        503, f"The request queue (Redis) is unavailable: {detail}", code="redis_unavailable", retry_after=retry_after
    )


def too_many(message: str, code: str, retry_after: float) -> ApiError:
    """429 with Retry-After: a rate limit, a quota or a full queue; ``code`` says which."""
    return ApiError(429, message, code=code, retry_after=retry_after)


def queue_timeout(withdrawn: bool) -> ApiError:
    """503: the request did not start within its queue timeout (``withdrawn``: it was still queued and never ran)."""
    how = "it was removed from the queue and never ran" if withdrawn else "its worker was told to drop it"
    return ApiError(
        503,
        f"The request did not start within its queue timeout; {how}. Retry later, or allow a longer 'queue_timeout'.",
        code="queue_timeout",
    )


def from_worker_event(event: dict[str, Any]) -> ApiError:
    """An ``error`` event written by a worker (or synthesized by the relay) as an ApiError."""
    code = str(event.get("code") or "worker_error")
    message = str(event.get("message") or "the worker failed to complete the request")
    return ApiError(_STATUS_BY_WORKER_CODE.get(code, 500), message, code=code)
