"""Two middlewares: every response is counted, and every failure leaves as an OpenAI-style JSON error body
(with ``Retry-After`` when Redis is unreachable). Authentication is gateway/auth.py's middleware, inside these."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from gateway import errors
from gateway.metrics import route_label
from gateway.state import state_of

log = logging.getLogger("gateway.middleware")

_CODE_BY_HTTP_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        state_of(request).metrics.requests.labels(route_label(request), request.method, str(status)).inc()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ApiError as exc:
        return _reject(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        error = errors.ApiError(
            exc.status, _http_error_message(request, exc), code=_CODE_BY_HTTP_STATUS.get(exc.status, "http_error")
        )
        return _reject(request, error)
    except (RedisError, ConnectionRefusedError) as exc:
        log.warning("redis unavailable for %s %s: %s", request.method, request.path, exc)
        retry_after = state_of(request).settings.retry_after_seconds
        return _reject(request, errors.redis_unavailable(str(exc) or type(exc).__name__, retry_after))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _reject(
            request,
            errors.ApiError(500, "The server had an internal error; it has been logged.", code="internal_error"),
        )


def _reject(request: web.Request, error: errors.ApiError) -> web.Response:
    state_of(request).metrics.rejected.labels(error.code).inc()
    return error.response()


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"There is no route {request.method} {request.path}."
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return f"{request.path} does not accept {request.method}" + (f"; use {allowed}." if allowed else ".")
    if exc.status == 413:
        limit = state_of(request).settings.max_body_bytes
        return f"The request body is larger than the limit of {limit} bytes (TRELLIS_MAX_BODY_BYTES)."
    return exc.reason or f"HTTP {exc.status}"
