"""The engine's events go to Redis from a thread of their own, through a synchronous client.

Why not the worker's asyncio loop: every step's events would cross into it (``call_soon_threadsafe``, a self-pipe
wake-up, task switches, redis.asyncio's futures), and all of that is Python holding the GIL the engine needs to
launch its next step. On the H200 host, moving events here took the served stream from ITL x1.16 and TTFT +16 ms
over the engine in-process to x1.08 and +5.5 ms (BENCHMARKS.md). This thread sleeps on a queue or in the socket
(both release the GIL) and writes one pipeline per batch of steps.

A step that carries a request's first event is written by the engine's own thread when nothing is queued: the hand-off
to this thread measured about half a millisecond of time to first token there, one round trip ~50 us.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from shared import names, wire
from shared.redis_streams import entry

log = logging.getLogger("inference_worker.publisher")

PUBLISH_RETRY_S = 5.0  # events that cannot reach Redis for this long are dropped and their requests aborted
RETRY_PAUSE_S = 0.2

Event = tuple[str, dict]


def publisher_client(redis_url: str) -> redis.Redis:
    """A synchronous client that fails fast: ``EventPublisher`` retries on its own schedule (redis-py's default
    retries with backoff would hold one batch for seconds per attempt)."""
    return redis.Redis.from_url(
        redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1.0, socket_timeout=PUBLISH_RETRY_S
    )


class EventPublisher:
    """Writes (request_id, event) batches to ``out:{request_id}``; acks and cleans up after terminal events.

    ``entry_of(request_id)`` gives the request's entry id in the requests stream, or None for a request the worker no
    longer holds (its non-terminal events are dropped). ``on_finished(ids)`` is called after the terminal events of
    ``ids`` are written and acked (on whichever thread wrote them); ``on_lost(ids)`` when their events could not be
    written for ``retry_s`` (on the publisher's thread).
    """

    def __init__(
        self,
        client: redis.Redis,
        requests_stream: str,
        output_ttl: int,
        entry_of: Callable[[str], bytes | None],
        on_finished: Callable[[list[str]], None],
        on_lost: Callable[[set[str]], None],
        retry_s: float = PUBLISH_RETRY_S,
    ) -> None:
        self.client = client
        self.requests_stream = requests_stream
        self.output_ttl = output_ttl
        self.entry_of = entry_of
        self.on_finished = on_finished
        self.on_lost = on_lost
        self.retry_s = retry_s
        self._queue: queue.SimpleQueue[list[Event] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the two fields below
        self._queued = 0  # batches queued or being written by the thread
        self._started: set[str] = set()  # requests with an event written or queued, until their terminal one

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EventPublisher already started")
        self._thread = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        self._thread.start()

    def submit(self, events: list[Event]) -> None:
        """One step's events, in step order: from a single thread (the engine's). Queued for the thread, except a
        step with a request's first event while nothing is queued: written at once, which keeps the order (this
        caller is the only other writer, and the thread has nothing older to write)."""
        with self._lock:
            first = any(request_id not in self._started for request_id, _ in events)
            self._started.update(request_id for request_id, _ in events)
            inline = first and self._queued == 0
            if not inline:
                self._queued += 1
        if inline:
            try:
                self._written(self._write(events))
                return
            except (RedisConnectionError, RedisTimeoutError):
                with self._lock:
                    self._queued += 1  # the thread retries it
        self._queue.put(events)

    def _written(self, finished: list[str]) -> None:
        with self._lock:
            self._started.difference_update(finished)
        if finished:
            self.on_finished(finished)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("event publisher did not stop within %s s", timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            stop = False
            batches = 1
            while not self._queue.empty():  # coalesce whatever else is ready into one round trip
                more = self._queue.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.extend(more)
                batches += 1
            try:
                self._deliver(batch)
            except Exception:  # a bug here must not silence every later event
                log.exception("publishing %d events failed", len(batch))
            with self._lock:
                self._queued -= batches
            if stop:
                return

    def _deliver(self, batch: list[Event]) -> None:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                finished = self._write(batch)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() <= deadline:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                # The gateway has already ended these streams with an error; stop spending compute on them.
                lost = {request_id for request_id, _ in batch}
                log.error("redis unreachable for %.0f s (%s): aborting %d requests", self.retry_s, exc, len(lost))
                with self._lock:
                    self._started.difference_update(lost)
                self.on_lost(lost)
                return
            self._written(finished)
            return

    def _write(self, batch: list[Event]) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        finished: list[str] = []
        for request_id, event in batch:
            terminal = event["type"] in wire.TERMINAL_EVENTS
            if not terminal and self.entry_of(request_id) is None:
                continue  # a request the worker gave up on
            stream = names.output_stream(request_id)
            pipe.xadd(stream, entry(event))
            if terminal:
                pipe.expire(stream, self.output_ttl)
                finished.append(request_id)
        for request_id in finished:
            entry_id = self.entry_of(request_id)
            if entry_id is not None:
                pipe.xack(self.requests_stream, names.WORKER_GROUP, entry_id)
            pipe.delete(names.cancel_key(request_id))
        pipe.execute()
        return finished
