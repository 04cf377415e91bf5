"""``InFlight``: one request from its enqueue (or a resume) to its last event, and the promises it keeps on the way.

    async with InFlight(state, admitted.meta, request=admitted.request, resumable=True) as flight:
        async for ev in flight.events():
            ...

- Entering takes its place in the model's queue ledger and enqueues it, in one round trip (429 when the queue is
  full). The place is given back when the first event arrives (the request started) or when the relay loop ends,
  whichever comes first.
- Its token quota is settled once, by whichever gateway sees the end: the usage of ``done``, what was seen of a
  failed request, nothing for one dropped from the queue.
- A loop that ends before the request did (client gone, gateway stopping, a bug) cancels the request, or, for a
  resumable SSE stream, *detaches* it: it keeps running for ``resume_grace_seconds`` so the client can resume it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable

from redis.exceptions import RedisError

from gateway.key_limits import QuotaHold
from gateway.queue_budget import queue_cost
from gateway.relay import OutputEvent
from gateway.state import GatewayState
from gateway.stream_meta import RequestMeta
from shared import wire

log = logging.getLogger("gateway.inflight")

# Errors the gateway itself ends a request with, after which the request is already stopped or withdrawn.
_ENDED_BY_GATEWAY = ("worker_lost", "queue_timeout")


class InFlight:
    def __init__(
        self,
        state: GatewayState,
        meta: RequestMeta,
        *,
        request: wire.GenerationRequest | None = None,
        resumable: bool = False,
    ) -> None:
        self.state = state
        self.meta = meta
        self.request = request  # None: a resume of a request some gateway already enqueued
        self.resumable = resumable and state.settings.resume_grace_seconds > 0
        self.entry_id = meta.entry_id
        self.started = False
        self.finished = False  # the request has ended for good: nothing to cancel or detach
        self.completion_seen = 0
        self._queue_released = False
        self._settled = False
        self._reader = uuid.uuid4().hex  # this connection, among the stream's readers (gateway/detach.py)

    @property
    def id(self) -> str:
        return self.meta.request_id

    async def __aenter__(self) -> InFlight:
        if self.request is not None:
            try:
                # the queue ledger's place and the stream entry in one round trip; 429 (nothing enqueued) when full
                self.entry_id = await self.state.queue.reserve_and_enqueue(
                    self.meta.model,
                    self.id,
                    queue_cost(self.request),
                    self.meta.queue_deadline,
                    self.state.relay.enqueue_call(self.request, self.meta),
                )
            except BaseException:
                await _quietly(self._leave_queue(started=False), "release the queue place of", self.id)
                hold = QuotaHold(self.meta.quota_key, self.meta.reserved_tokens)
                await _quietly(self.state.limits.refund(hold), "refund the quota of", self.id)
                raise
        if self.resumable:
            await self.state.detached.attach(self.id, self._reader)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await _quietly(self._leave_queue(started=False), "release the queue place of", self.id)
        if self.finished:
            if self.resumable:
                await _quietly(self.state.detached.forget(self.id), "forget the readers of", self.id)
            return
        if self.resumable:
            await _quietly(self.state.detached.detach(self.id, self._reader), "detach", self.id)
            return
        await _quietly(self._settle(self._charged_prompt(), self.completion_seen), "settle", self.id)
        await _quietly(self.state.relay.cancel(self.id), "cancel", self.id)

    async def events(self, after: str = "0-0") -> AsyncIterator[OutputEvent | None]:
        """The request's events after entry ``after`` (see ``Relay.follow``), keeping the books as they pass."""
        follow = self.state.relay.follow(
            self.id, self.meta.model, after, queue_deadline=self.meta.queue_deadline, entry_id=self.entry_id
        )
        async for ev in follow:
            if ev is not None:
                await self._account(ev)
            yield ev

    async def _account(self, ev: OutputEvent) -> None:
        if ev.entry_id is not None and not self.started:
            self.started = True
            # off the first token's path: the ledger may learn of the start a moment after the client does
            self.state.background(_quietly(self._leave_queue(started=True), "release the queue place of", self.id))
        if ev.type == wire.EVENT_DELTA:
            self.completion_seen += len(ev.event.get("token_ids") or ())
        if not ev.terminal:
            return
        code = ev.event.get("code")
        if ev.entry_id is None and code not in _ENDED_BY_GATEWAY:
            return  # e.g. shutting_down: the request goes on; leaving decides between cancel and detach
        self.finished = True
        if ev.type == wire.EVENT_DONE:
            usage = ev.event.get("usage") or {}
            await self._settle(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        elif code == "queue_timeout":
            await self._settle(0, 0)  # it never ran: the whole hold comes back
        else:
            await self._settle(self._charged_prompt(), self.completion_seen)

    def _charged_prompt(self) -> int:
        return self.meta.prompt_tokens if self.started else 0

    def _leave_queue(self, started: bool) -> Awaitable[object]:
        """Give the queue place back, once. The claim is made at the call, not when the returned Redis call runs:
        the start's release goes off in the background, and leaving must not release it again as "not started"
        before that task has had its turn."""
        if self._queue_released:
            return _nothing()
        self._queue_released = True
        return self.state.queue.release(self.meta.model, self.id, started)

    async def _settle(self, prompt: int, completion: int) -> None:
        if self._settled:
            return
        self._settled = True
        await self.state.limits.settle(self.id, self.meta.key_id, self.meta.quota_key, prompt, completion)


async def _nothing() -> None:
    return None


async def _quietly(step: Awaitable[object], what: str, request_id: str) -> None:
    """Bookkeeping on the way out must not turn a finished response into an error (Redis may be down)."""
    try:
        await step
    except (RedisError, OSError) as exc:
        log.warning("could not %s %s: %s", what, request_id, exc)
