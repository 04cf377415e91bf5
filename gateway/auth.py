"""Access control: ``auth_middleware`` authenticates ``Authorization: Bearer <key>``; handlers call
``require_scope`` for what they need.

With keys configured every route but /health (and /metrics when ``TRELLIS_METRICS_AUTH=none``) needs a valid key:
401 without one, 403 when the key's scope is too small. With no keys configured access is open, and ``gateway.app``
only allows that on a loopback address. Scopes: ``user`` (generate, tokenize, models, own usage, resume) and
``admin`` (everything, plus workers and operator routes).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import errors
from gateway.api_keys import ADMIN, USER, ApiKey
from gateway.state import state_of

__all__ = ["ADMIN", "USER", "auth_middleware", "principal_of", "require_scope"]

# aiohttp >= 3.12 wants typed request keys; older versions take the plain string
PRINCIPAL = web.RequestKey("trellis_principal", ApiKey) if hasattr(web, "RequestKey") else "trellis_principal"
ALWAYS_OPEN = frozenset({"/health"})


def open_paths(metrics_auth: str) -> frozenset[str]:
    return ALWAYS_OPEN | ({"/metrics"} if metrics_auth == "none" else set())


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = state_of(request)
    if state.keys.configured and request.path not in open_paths(state.settings.metrics_auth):
        request[PRINCIPAL] = authenticate(request)
    return await handler(request)


def authenticate(request: web.Request) -> ApiKey:
    """The key presented as ``Authorization: Bearer``; 401 when it is missing or unknown (never echoed back)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            "missing_api_key",
        )
    key = state_of(request).keys.authenticate(token)
    if key is None:
        raise _unauthorized("Invalid API key.", "invalid_api_key")
    return key


def principal_of(request: web.Request) -> ApiKey | None:
    """The caller's key; None when the gateway runs without keys (open, loopback only)."""
    return request.get(PRINCIPAL)


def require_scope(request: web.Request, scope: str) -> None:
    """403 unless the caller's key has ``scope`` (admin has every scope); a no-op when no keys are configured."""
    if not state_of(request).keys.configured:
        return
    key = principal_of(request)
    if key is None:  # an open path that still asks for a scope (e.g. /metrics set to 'none')
        return
    if not key.allows(scope):
        raise errors.ApiError(
            403,
            f"This API key has the '{key.scope}' scope; {request.method} {request.path} needs '{scope}'.",
            code="insufficient_scope",
            type_=errors.PERMISSION,
        )


def _unauthorized(message: str, code: str) -> errors.ApiError:
    return errors.ApiError(
        401, message, code=code, type_=errors.AUTHENTICATION, headers={"WWW-Authenticate": 'Bearer realm="trellis"'}
    )
