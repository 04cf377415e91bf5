"""The one place access control plugs in. Today the gateway is open; every route already says what it needs.

Scopes: ``inference`` (generate, tokenize, list models) and ``admin`` (worker details, future operator routes). An
auth layer replaces ``require_scope`` (API keys, per-key scopes) and raises ``ApiError(401/403)``; no handler changes.
"""

from __future__ import annotations

from aiohttp import web

INFERENCE = "inference"
ADMIN = "admin"


def require_scope(request: web.Request, scope: str) -> None:
    """Raise ApiError(401/403) if the caller may not use ``scope``; open access until auth lands."""
    del request, scope
