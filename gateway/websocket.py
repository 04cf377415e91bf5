"""GET /v1/ws: many generations over one websocket, interleaved, each named by the client's own id.

Protocol (docs/websocket.md): the client sends ``{"id", "type": "completions" | "chat.completions", "body"}`` or
``{"type": "cancel", "id"}``; the server answers each id with ``delta`` frames and exactly one ``final`` frame, or
one ``error`` frame. Each request runs in its own task; frames are written under one lock so they never interleave
mid-frame. Closing the socket cancels every request still running on it (``cancel:{id}`` for the workers).

Limits: a frame over ``ws_max_frame_bytes`` closes the socket (1009); more than ``ws_max_messages`` frames from the
client close it (1008); a socket with no frame and no running request for ``ws_idle_seconds`` is closed (1000).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admission import Admitted, admit
from gateway.api_keys import ApiKey
from gateway.auth import USER, principal_of, require_scope
from gateway.generation import FirstTokenTimer, response_builder
from gateway.inflight import InFlight
from gateway.openai_api import ENDPOINTS, parse_generation
from gateway.responses import ResponseBuilder
from gateway.state import GatewayState, state_of
from shared import wire

log = logging.getLogger("gateway.websocket")

MAX_ACTIVE_PER_SOCKET = 64  # one socket must not monopolize the queue
MAX_CLIENT_ID_CHARS = 256


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    require_scope(request, USER)  # before the upgrade: a refused client gets a plain 401/403 JSON response
    state = state_of(request)
    ws = web.WebSocketResponse(
        max_msg_size=state.settings.ws_max_frame_bytes, heartbeat=state.settings.keepalive_seconds
    )
    if not ws.can_prepare(request).ok:
        raise errors.invalid(
            "GET /v1/ws is a websocket endpoint: connect with a websocket client (Upgrade: websocket).",
            code="websocket_upgrade_required",
        )
    await ws.prepare(request)
    state.websockets.add(ws)
    session = WebSocketSession(ws, state, principal_of(request))
    try:
        await session.read_frames()
    finally:
        state.websockets.discard(ws)
        await session.cancel_all()
    return ws


class WebSocketSession:
    def __init__(self, ws: web.WebSocketResponse, state: GatewayState, key: ApiKey | None = None) -> None:
        self.ws = ws
        self.state = state
        self.key = key
        self.frames_received = 0
        self.tasks: dict[str, asyncio.Task] = {}
        self.builders: dict[str, tuple[Admitted, ResponseBuilder]] = {}
        self._send_lock = asyncio.Lock()

    # -- incoming --------------------------------------------------------------------------------------------------
    async def read_frames(self) -> None:
        """Until the socket closes, goes idle too long, or the client sends more frames than allowed."""
        settings = self.state.settings
        last_active = time.monotonic()
        while not self.ws.closed:
            # our own clock: aiohttp's receive timeout restarts on every heartbeat pong, so it never fires
            remaining = settings.ws_idle_seconds - (time.monotonic() - last_active)
            if remaining <= 0:
                if self.tasks:  # quiet, but requests are running: not idle
                    last_active = time.monotonic()
                    continue
                await self.ws.close(code=WSCloseCode.OK, message=b"idle timeout")
                return
            try:
                async with asyncio.timeout(remaining):
                    msg = await self.ws.receive()
            except TimeoutError:
                continue
            last_active = time.monotonic()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:  # e.g. a frame over ws_max_frame_bytes: aiohttp closes with 1009
                log.info("websocket closed on error: %s", self.ws.exception())
                return
            self.frames_received += 1
            if self.frames_received > settings.ws_max_messages:
                await self.send_error(
                    None,
                    errors.invalid(
                        f"This socket has sent {settings.ws_max_messages} frames, the limit per socket; reconnect.",
                        code="too_many_messages",
                    ),
                )
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many messages")
                return
            if msg.type == WSMsgType.TEXT:
                await self.on_frame(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self.send_error(None, errors.invalid("Binary frames are not accepted; send JSON text."))

    async def on_frame(self, data: str) -> None:
        received = time.monotonic()
        try:
            frame = json.loads(data)
        except ValueError as exc:
            await self.send_error(None, errors.invalid(f"The frame is not valid JSON: {exc}."))
            return
        if not isinstance(frame, dict):
            await self.send_error(None, errors.invalid("A frame must be a JSON object."))
            return
        client_id = frame.get("id")
        if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLIENT_ID_CHARS:
            await self.send_error(
                None,
                errors.invalid(
                    f"Every frame needs an 'id': a non-empty string of at most {MAX_CLIENT_ID_CHARS} characters.", "id"
                ),
            )
            return
        kind = frame.get("type")
        if kind == "cancel":
            await self.cancel(client_id)
        elif kind in ENDPOINTS:
            await self.start(client_id, kind, frame.get("body"), received)
        else:
            await self.send_error(
                client_id, errors.invalid(f"'type' must be one of {[*ENDPOINTS, 'cancel']}, got {kind!r}.", "type")
            )

    async def start(self, client_id: str, endpoint: str, body: Any, received: float) -> None:
        if client_id in self.tasks:
            await self.send_error(
                client_id, errors.invalid(f"The id {client_id!r} is already running.", "id", code="duplicate_id")
            )
            return
        if len(self.tasks) >= MAX_ACTIVE_PER_SOCKET:
            await self.send_error(
                client_id,
                errors.ApiError(
                    429,
                    f"At most {MAX_ACTIVE_PER_SOCKET} requests may run at once on one socket.",
                    code="too_many_requests",
                ),
            )
            return
        self.tasks[client_id] = asyncio.create_task(self._run(client_id, endpoint, body, received))

    async def cancel(self, client_id: str) -> None:
        task = self.tasks.get(client_id)
        if task is None:
            await self.send_error(
                client_id, errors.invalid(f"No running request has id {client_id!r}.", "id", code="unknown_id")
            )
            return
        task.cancel()  # its InFlight sets cancel:{request_id} for the worker
        await asyncio.gather(task, return_exceptions=True)
        admitted_builder = self.builders.pop(client_id, None)
        if admitted_builder is not None:
            admitted, builder = admitted_builder
            await self.send(self._final_frame(client_id, admitted, builder, cancelled=True))
        else:  # cancelled before it was admitted
            await self.send({"id": client_id, "type": "final", "cancelled": True, "choices": [], "usage": None})

    async def cancel_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one request -----------------------------------------------------------------------------------------------
    async def _run(self, client_id: str, endpoint: str, body: Any, received: float) -> None:
        try:
            if not isinstance(body, dict):
                raise errors.invalid("'body' must be a JSON object holding the REST request body.", "body")
            # a websocket always streams and always reports usage: the REST streaming switches do not apply
            body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
            parsed = parse_generation(endpoint, body, self.state.settings)
            admitted = await admit(parsed, self.state, received, self.key)
            with self.state.metrics.open_streams.labels("websocket").track_inprogress():
                await self._relay(client_id, admitted)
        except errors.ApiError as exc:
            self.state.metrics.rejected.labels(exc.code).inc()
            await self.send_error(client_id, exc)
        except RedisError as exc:
            error = errors.redis_unavailable(str(exc), self.state.settings.retry_after_seconds)
            self.state.metrics.rejected.labels(error.code).inc()
            await self.send_error(client_id, error)
        except Exception:
            log.exception("unexpected error in websocket request %s", client_id)
            await self.send_error(client_id, errors.ApiError(500, "internal error"))
        finally:
            self.tasks.pop(client_id, None)

    async def _relay(self, client_id: str, admitted: Admitted) -> None:
        builder = response_builder(admitted)
        self.builders[client_id] = (admitted, builder)
        first_token = FirstTokenTimer(admitted.parsed.model, admitted.received, self.state)
        async with InFlight(self.state, admitted.meta, request=admitted.request) as flight:
            async for ev in flight.events():
                if ev is None:
                    if self.ws.closed:
                        return
                    continue
                if ev.type == wire.EVENT_DELTA:
                    choice, text, logprobs, offset = builder.apply_delta(ev.event)
                    first_token.on_delta()
                    frame = {"id": client_id, "type": "delta", "index": choice.index, "text": text}
                    if builder.want_logprobs:
                        frame["logprobs"] = builder.format_logprobs(logprobs, offset)
                    await self.send(frame)
                elif ev.type == wire.EVENT_FINISH:
                    builder.apply_finish(ev.event)
                elif ev.type == wire.EVENT_DONE:
                    builder.apply_done(ev.event)
                    self.builders.pop(client_id, None)
                    await self.send(self._final_frame(client_id, admitted, builder, cancelled=False))
                elif ev.type == wire.EVENT_ERROR:
                    self.builders.pop(client_id, None)
                    raise errors.from_worker_event(ev.event)

    # -- outgoing --------------------------------------------------------------------------------------------------
    def _final_frame(self, client_id: str, admitted: Admitted, builder: ResponseBuilder, cancelled: bool) -> dict:
        choices = [
            {
                "index": c.index,
                "finish_reason": c.finish_reason or ("abort" if cancelled else None),
                "stop_reason": c.stop_reason,
            }
            for c in builder.choices
        ]
        frame = {
            "id": client_id,
            "type": "final",
            "request_id": admitted.id,
            "model": admitted.parsed.model,
            "choices": choices,
            "usage": builder.usage,
        }
        if cancelled:
            frame["cancelled"] = True
        return frame

    async def send_error(self, client_id: str | None, error: errors.ApiError) -> None:
        frame = {"id": client_id, "type": "error", "status": error.status, **error.body()}
        if "Retry-After" in error.headers:  # what the REST response would say in its header
            frame["retry_after"] = int(error.headers["Retry-After"])
        await self.send(frame)

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_str(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))
            except ConnectionResetError:
                pass  # the socket is closing; the reader loop ends and cancels what is left
