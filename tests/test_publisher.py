"""The worker's event publisher against a real redis-server: delivery, acks, dropped requests, Redis down."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from inference_worker.publisher import EventPublisher, publisher_client
from shared import names, wire
from shared.redis_server import free_port
from shared.redis_streams import entry, payload

STREAM = names.requests_stream("publisher-test")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url, db=13)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


def pending_entry(client: redis.Redis, request_id: str) -> bytes:
    """A request entry handed to this worker (pending in the group), as the intake leaves it."""
    client.xgroup_create(STREAM, names.WORKER_GROUP, id="0", mkstream=True)
    client.xadd(STREAM, entry({"id": request_id}))
    [[_stream, [(entry_id, _fields)]]] = client.xreadgroup(names.WORKER_GROUP, "w1", {STREAM: ">"}, count=1)
    client.set(names.cancel_key(request_id), b"1")
    return entry_id


class Recorder:
    def __init__(self) -> None:
        self.finished: list[str] = []
        self.lost: set[str] = set()
        self.called = threading.Event()

    def on_finished(self, ids: list[str]) -> None:
        self.finished += ids
        self.called.set()

    def on_lost(self, ids: set[str]) -> None:
        self.lost |= ids
        self.called.set()


def publisher(client: redis.Redis, held: dict[str, bytes], rec: Recorder, retry_s: float = 5.0) -> EventPublisher:
    return EventPublisher(client, STREAM, 60, held.get, rec.on_finished, rec.on_lost, retry_s=retry_s)


def delta(text: str) -> dict:
    return {"type": wire.EVENT_DELTA, "index": 0, "text": text, "token_ids": [1]}


def test_events_reach_the_output_stream_and_the_final_one_acks(client: redis.Redis) -> None:
    held = {"r1": pending_entry(client, "r1")}
    rec = Recorder()
    pub = publisher(client, held, rec)
    pub.start()
    pub.submit([("r1", delta("Hel"))])
    pub.submit([("r1", delta("lo")), ("r1", {"type": wire.EVENT_DONE})])
    assert rec.called.wait(10)
    pub.stop()
    out = [payload(f) for _, f in client.xrange(names.output_stream("r1"))]
    assert [e["type"] for e in out] == [wire.EVENT_DELTA, wire.EVENT_DELTA, wire.EVENT_DONE]
    assert "".join(e.get("text", "") for e in out) == "Hello"
    assert rec.finished == ["r1"]
    assert 0 < client.ttl(names.output_stream("r1")) <= 60
    assert client.xpending(STREAM, names.WORKER_GROUP)["pending"] == 0  # acked
    assert not client.exists(names.cancel_key("r1"))


def test_a_request_given_up_on_gets_only_its_final_event(client: redis.Redis) -> None:
    pending_entry(client, "r2")
    rec = Recorder()
    pub = publisher(client, {}, rec)  # the worker no longer holds r2
    pub.start()
    pub.submit([("r2", delta("late")), ("r2", {"type": wire.EVENT_ERROR, "code": "x", "message": "gone"})])
    assert rec.called.wait(10)
    pub.stop()
    out = [payload(f) for _, f in client.xrange(names.output_stream("r2"))]
    assert [e["type"] for e in out] == [wire.EVENT_ERROR]
    assert client.xpending(STREAM, names.WORKER_GROUP)["pending"] == 1  # not ours to ack any more


def test_stop_writes_what_is_still_queued(client: redis.Redis) -> None:
    rec = Recorder()
    pub = publisher(client, {"r3": b"0-1"}, rec)
    for i in range(50):  # queued before the thread even starts
        pub.submit([("r3", delta(str(i)))])
    pub.start()
    pub.stop()
    assert client.xlen(names.output_stream("r3")) == 50


def test_events_that_cannot_reach_redis_abort_their_requests() -> None:
    dead = publisher_client(f"redis://127.0.0.1:{free_port()}/0")
    rec = Recorder()
    pub = publisher(dead, {"r4": b"0-1"}, rec, retry_s=0.5)
    pub.start()
    pub.submit([("r4", delta("x"))])
    assert rec.called.wait(10)
    pub.stop()
    assert rec.lost == {"r4"} and rec.finished == []


def test_a_requests_first_event_is_written_at_once_and_later_ones_by_the_thread(client: redis.Redis) -> None:
    rec = Recorder()
    pub = publisher(client, {"r5": b"0-1", "r6": b"0-2"}, rec)  # not started: only inline writes happen
    pub.submit([("r5", delta("a"))])
    assert client.xlen(names.output_stream("r5")) == 1  # the first token does not wait for the thread
    pub.submit([("r5", delta("b"))])
    pub.submit([("r6", delta("c"))])  # a new request, but something is queued: it queues behind it (order)
    assert client.xlen(names.output_stream("r5")) == 1 and client.xlen(names.output_stream("r6")) == 0
    pub.start()
    pub.stop()
    assert [payload(f)["text"] for _, f in client.xrange(names.output_stream("r5"))] == ["a", "b"]
    assert client.xlen(names.output_stream("r6")) == 1
