"""Server-sent events on an aiohttp StreamResponse: ``id:`` + ``data:`` events, ``: keep-alive`` comments, [DONE]."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web


def client_disconnected(request: web.Request) -> bool:
    """True once the client's connection is closed (aiohttp does not cancel the handler for us)."""
    transport = request.transport
    return transport is None or transport.is_closing()


class SseWriter:
    """Write errors (the client went away) surface as ``ConnectionResetError``."""

    def __init__(self, request: web.Request, keepalive_seconds: float, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.keepalive_seconds = keepalive_seconds
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # stop nginx-style proxies from holding events back
                **(headers or {}),
            },
        )
        self._last_write = time.monotonic()

    async def open(self) -> None:
        await self.response.prepare(self.request)
        self._last_write = time.monotonic()

    async def send(self, data: dict[str, Any] | str, event_id: str | None = None) -> None:
        """One event; ``event_id`` becomes the ``id:`` field a client echoes back as Last-Event-ID."""
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        head = f"id: {event_id}\n" if event_id else ""
        await self._write(f"{head}data: {payload}\n\n")

    async def send_done(self) -> None:
        await self._write("data: [DONE]\n\n")

    async def keepalive_if_due(self) -> None:
        """A comment line when nothing was written for ``keepalive_seconds``: proxies keep the connection open."""
        if time.monotonic() - self._last_write >= self.keepalive_seconds:
            await self._write(": keep-alive\n\n")

    async def close(self) -> None:
        await self.response.write_eof()

    async def _write(self, text: str) -> None:
        await self.response.write(text.encode("utf-8"))
        self._last_write = time.monotonic()
